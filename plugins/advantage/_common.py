"""Shared pieces of the critic-free advantage estimators (``grpo``, ``dr_grpo``, ``rloo``,
``reinforce_pp``, ``reinforce``).

All of them start from the batch's rewards:

* the *sequence return* of row i is ``R_i = rewards_i + sum_t m_it * token_rewards_it`` (a
  sequence score plus any per-token rewards, e.g. a KL penalty folded into the reward);
* the *return-to-go* at response token t is ``G_it = sum_{s >= t} gamma^(s - t) r_is`` where
  ``r_is`` is the per-token reward with the sequence score credited to the last response
  token (with gamma = 1 and no token rewards, ``G_it = R_i`` on every token).

Group statistics are computed in float64 over the rows that share a ``group_id`` (groups need
not be contiguous nor of equal size) and cast back to float32. A group whose returns are all
equal gets *exactly* zero advantage (the centred values are zeroed explicitly rather than left
to float round-off, and nothing is divided by a zero standard deviation).
"""

from __future__ import annotations

import torch

from rlfuse.data import Batch


def sequence_returns(batch: Batch, who: str) -> torch.Tensor:
    """(B,) float64 ``R_i = rewards_i + sum_t m_it token_rewards_it``."""
    if batch.rewards is None and batch.token_rewards is None:
        raise ValueError(f"{who}: the batch has no rewards (is a `reward` plugin configured?)")
    m = batch.response_mask.double()
    total = torch.zeros(len(batch), dtype=torch.float64, device=m.device)
    if batch.rewards is not None:
        total = total + batch.rewards.to(m.device).double()
    if batch.token_rewards is not None:
        total = total + (batch.token_rewards.double() * m).sum(-1)
    return total


def last_response_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) position of the last masked token of each row (0 for an empty row)."""
    T = mask.shape[1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask > 0, pos, torch.full_like(pos, -1)).max(-1).values.clamp_min(0)


def token_rewards(batch: Batch, seq_offset: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) float64 per-token rewards: token rewards plus the sequence reward (minus an
    optional per-row ``seq_offset``, a baseline) on the last response token."""
    m = batch.response_mask.double()
    r = torch.zeros_like(m) if batch.token_rewards is None else batch.token_rewards.double() * m
    seq = None
    if batch.rewards is not None:
        seq = batch.rewards.to(m.device).double()
    if seq_offset is not None:
        seq = -seq_offset if seq is None else seq - seq_offset
    if seq is not None:
        r = r.clone()
        rows = torch.arange(len(m), device=m.device)
        r[rows, last_response_index(m)] += seq * (m.sum(-1) > 0)
    return r


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B, T) ``G_t = sum_{s >= t} gamma^(s-t) r_s`` over masked tokens, zero elsewhere.

    Plain right-to-left loop (T is a response length, tens to thousands of steps).
    """
    m = mask.to(rewards.dtype)
    out = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = (rewards[:, t] + gamma * running) * m[:, t] + running * (1 - m[:, t])
        out[:, t] = running * m[:, t]
    return out


def broadcast(seq_adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) sequence advantages -> (B, T) float32 on the response tokens, zero elsewhere."""
    return (seq_adv.to(torch.float64)[:, None] * mask.double()).float()


def group_index(batch: Batch, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inverse (B,) group index 0..G-1, counts (G,)) from ``batch.group_ids``."""
    if batch.group_ids is None:
        raise ValueError(
            f"{who} needs group ids: sample several responses per prompt (rollout=generate "
            "with rollout.n >= 2 records batch.group_ids)"
        )
    gids = batch.group_ids.reshape(-1)
    if gids.shape[0] != len(batch):
        raise ValueError(f"{who}: batch.group_ids has {gids.shape[0]} entries for {len(batch)} rows")
    _, inverse, counts = torch.unique(gids, return_inverse=True, return_counts=True)
    return inverse, counts


def grouped_returns(batch: Batch, who: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(returns (B,) float64, inverse group index (B,), counts (G,)) of a grouped batch."""
    returns = sequence_returns(batch, who)
    inverse, counts = group_index(batch, who)
    return returns, inverse, counts


def group_sum(x: torch.Tensor, inverse: torch.Tensor, groups: int) -> torch.Tensor:
    """(G,) sum of ``x`` (B,) over each group."""
    return torch.zeros(groups, dtype=x.dtype, device=x.device).index_add_(0, inverse, x)


def group_stats(
    x: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor, unbiased: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (group mean, group std, group all-equal flag), each (B,) for x (B,) float64.

    ``std`` is the unbiased (n - 1) estimate by default, 0 for a group of one.
    """
    G = counts.shape[0]
    n = counts.to(x.dtype)
    mean = group_sum(x, inverse, G) / n
    centred = x - mean[inverse]
    dof = (n - 1).clamp_min(1) if unbiased else n
    std = (group_sum(centred**2, inverse, G) / dof).sqrt()
    lo = torch.full((G,), float("inf"), dtype=x.dtype, device=x.device).scatter_reduce(
        0, inverse, x, reduce="amin"
    )
    hi = torch.full((G,), float("-inf"), dtype=x.dtype, device=x.device).scatter_reduce(
        0, inverse, x, reduce="amax"
    )
    equal = (hi == lo)[inverse]
    return mean[inverse], std[inverse], equal


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, center: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """``(x - mean) / (std + eps)`` over the masked entries of the whole batch (``center=False``
    skips the mean; std is the unbiased estimate). Exactly zero everywhere when the masked
    entries are all equal and centred; no scaling when their std is 0."""
    m = mask.to(x.dtype)
    n = m.sum()
    if n == 0:
        return torch.zeros_like(x)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / (n - 1).clamp_min(1)
    vals = x[m > 0]
    if center and bool(vals.max() == vals.min()):
        return torch.zeros_like(x)
    shifted = x - mean if center else x
    std = var.sqrt()
    if bool(std == 0):  # nothing to scale by: leave the (centred) values as they are
        return shifted * m
    return shifted / (std + eps) * m
