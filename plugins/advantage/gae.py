"""``advantage=gae``: Generalised Advantage Estimation with a learned critic.

The critic is a scalar value head on the policy's final hidden states (shared trunk); this
plugin owns it: it adds the head at setup, computes the old values and GAE advantages after
the rewards, and contributes the clipped value loss (``loss/value``) on every micro-batch.
Swapping in a critic-free estimator (``advantage=grpo``) therefore drops the critic too.

Token alignment: ``values[:, t]`` is the value of the state *before* token ``t`` is emitted,
read from the hidden state at ``t - 1`` (the same position whose logits give token ``t``).
The sequence reward is credited to the last response token; per-token rewards (a KL penalty)
are added where they occur.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rlfuse import hookimpl
from rlfuse.data import Advantages, Batch, LossOutput
from rlfuse.plugins.advantage._common import masked_whiten, token_rewards


@dataclass
class Config:
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True  # normalise advantages over the batch's response tokens
    value_coef: float = 0.5  # weight of the value loss
    value_clip: float | None = 0.2  # clip range of the value update (null = unclipped)
    value_lr: float | None = None  # learning rate of the value head (default: algo.lr)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """GAE over the masked (contiguous) response tokens of each row.

    rewards, values, mask: (B, T). Returns (advantages, returns), zero outside the mask.
    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1} * m_{t+1}
    """
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_v = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_m = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in range(T - 1, -1, -1):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_v * next_m - values[:, t]
        last = (delta + gamma * lam * last * next_m) * m
        adv[:, t] = last
        next_v, next_m = values[:, t], m
    returns = (adv + values) * mask
    return adv, returns


class Plugin:
    Config = Config

    def __init__(self, cfg: Config, name: str = "gae") -> None:
        self.cfg = cfg
        self.head: nn.Linear | None = None

    @hookimpl
    def setup(self, ctx: Any) -> None:
        hidden = ctx.policy.config.hidden_size
        head = nn.Linear(hidden, 1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        dtype = next(ctx.policy.parameters()).dtype
        self.head = ctx.add_module("value_head", head.to(dtype), lr=self.cfg.value_lr)

    def values(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) values from (B, T, H) hidden states, aligned with the tokens."""
        v = self.head(hidden[:, :-1]).squeeze(-1).float()  # (B, T-1), state before token t+1
        return torch.cat([v.new_zeros(v.shape[0], 1), v], dim=1) * mask

    @hookimpl
    def advantage(self, ctx: Any, batch: Batch) -> Advantages:
        out = batch.cache.get("rollout_forward")
        if out is None or out.hidden is None:
            with torch.no_grad():
                out = ctx.forward(batch, model=ctx.policy, hidden=True)
        with torch.no_grad():
            batch.values = self.values(out.hidden, batch.response_mask)
        r = token_rewards(batch).to(batch.values.dtype)
        adv, ret = gae(r, batch.values, batch.response_mask, self.cfg.gamma, self.cfg.lam)
        m = batch.response_mask
        metrics = {
            "critic/value_mean": (batch.values * m).sum() / m.sum().clamp_min(1),
            "critic/return_mean": (ret * m).sum() / m.sum().clamp_min(1),
        }
        if self.cfg.whiten:
            adv = masked_whiten(adv, m)
        return Advantages(advantages=adv, returns=ret, metrics=metrics)

    @hookimpl
    def loss(self, ctx: Any, batch: Batch) -> LossOutput:
        out = ctx.forward(batch, hidden=True)
        m = batch.response_mask
        v = self.values(out.hidden, m)
        old, ret = batch.values, batch.returns
        l1 = (v - ret) ** 2
        if self.cfg.value_clip is not None:
            c = self.cfg.value_clip
            v_clip = old + (v - old).clamp(-c, c)
            l2 = (v_clip - ret) ** 2
            per_tok = torch.maximum(l1, l2)
            clipfrac = ((l2 > l1).float() * m).sum() / m.sum().clamp_min(1)
        else:
            per_tok, clipfrac = l1, torch.zeros(())
        loss = 0.5 * (per_tok * m).sum() / batch.totals.get("tokens", m.sum().clamp_min(1))
        return LossOutput(
            terms={"value": self.cfg.value_coef * loss},
            metrics={"critic/value_clipfrac": clipfrac.detach(), "critic/vf_loss": loss.detach()},
        )
