"""``advantage=reinforce_pp``: REINFORCE++ (Hu 2025): token-level returns, normalised over the
whole batch instead of per group.

With ``r_t`` the per-token reward (the sequence reward on the last response token, plus any
per-token reward such as a KL penalty folded in by ``reward=kl_penalty``)::

    G_t = sum_{s >= t} gamma^(s - t) r_s                                (return-to-go)
    baseline: none    A_t = (G_t - mean_batch G) / (std_batch G + eps)
    baseline: group   G_t computed with R_i - mean_g R in place of R_i  (REINFORCE++-baseline)
                      A_t = G_t / (std_batch G + eps)                    (no re-centring)

mean/std run over every response token of the batch (``center`` overrides whether the mean
is subtracted; by default it is, except with the group baseline, where the group mean already
centres each prompt and re-centring would give all-equal groups a non-zero advantage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlfuse import hookimpl
from rlfuse.data import Advantages, Batch
from rlfuse.plugins.advantage._common import (
    group_stats,
    grouped_returns,
    masked_whiten,
    returns_to_go,
    sequence_returns,
    token_rewards,
)


@dataclass
class Config:
    gamma: float = 1.0
    baseline: str = "none"  # none | group
    center: bool | None = None  # subtract the batch mean (default: true unless baseline=group)
    eps: float = 1e-8


class Plugin:
    Config = Config

    def __init__(self, cfg: Config, name: str = "reinforce_pp") -> None:
        if cfg.baseline not in ("none", "group"):
            raise ValueError(f"advantage.baseline must be 'none' or 'group', got '{cfg.baseline}'")
        if not 0 <= cfg.gamma <= 1:
            raise ValueError(f"advantage.gamma must be in [0, 1], got {cfg.gamma}")
        self.cfg = cfg
        self.name = name

    @hookimpl
    def advantage(self, ctx: Any, batch: Batch) -> Advantages:
        who = f"advantage={self.name}"
        m = batch.response_mask
        offset = None
        if self.cfg.baseline == "group":
            returns, inverse, counts = grouped_returns(batch, who)
            mean, _, _ = group_stats(returns, inverse, counts)
            offset = mean
        elif batch.rewards is None and batch.token_rewards is None:
            sequence_returns(batch, who)  # raises the "no rewards" error
        r = token_rewards(batch, seq_offset=offset)
        G = returns_to_go(r, m, self.cfg.gamma)
        center = self.cfg.center if self.cfg.center is not None else self.cfg.baseline == "none"
        adv = masked_whiten(G, m.double(), center=center, eps=self.cfg.eps)
        mm = m.double()
        n = mm.sum().clamp_min(1)
        return Advantages(
            advantages=adv.float(),
            metrics={
                "advantage/return_mean": float((G * mm).sum() / n),
                "advantage/abs_mean": float((adv.abs() * mm).sum() / n),
            },
        )
