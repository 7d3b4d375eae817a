"""``advantage=rloo``: REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024).

Each row's baseline is the mean return of the *other* rows of its group (size n >= 2)::

    A_i = R_i - (sum_{j in g, j != i} R_j) / (n - 1)  =  n / (n - 1) * (R_i - mean_g R)

The baseline does not depend on the row's own sample, so the estimator is unbiased (GRPO's
mean includes R_i itself, which shrinks A_i by (n - 1)/n). ``A_i`` is put on every response
token of row i. A group whose returns are all equal gets exactly zero advantage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlfuse import hookimpl
from rlfuse.data import Advantages, Batch
from rlfuse.plugins.advantage._common import (
    broadcast,
    group_stats,
    group_sum,
    grouped_returns,
)


@dataclass
class Config:
    scale_std: bool = False  # also divide by the group std (not part of RLOO; off by default)
    eps: float = 1e-6


def leave_one_out(returns: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B,) ``R_i - mean of the other rows of i's group``; every group needs >= 2 rows."""
    total = group_sum(returns, inverse, counts.shape[0])[inverse]
    n = counts.to(returns.dtype)[inverse]
    return returns - (total - returns) / (n - 1)


class Plugin:
    Config = Config

    def __init__(self, cfg: Config, name: str = "rloo") -> None:
        self.cfg = cfg
        self.name = name

    @hookimpl
    def advantage(self, ctx: Any, batch: Batch) -> Advantages:
        who = f"advantage={self.name}"
        returns, inverse, counts = grouped_returns(batch, who)
        if bool((counts < 2).any()):
            raise ValueError(
                f"{who} needs at least 2 responses per prompt (rollout.n >= 2); "
                f"{int((counts < 2).sum())} group(s) have a single response"
            )
        _, std, equal = group_stats(returns, inverse, counts)
        adv = leave_one_out(returns, inverse, counts)
        if self.cfg.scale_std:
            adv = adv / (std + self.cfg.eps)
        adv = torch.where(equal, torch.zeros_like(adv), adv)
        return Advantages(
            advantages=broadcast(adv, batch.response_mask),
            metrics={"advantage/mean": float(adv.mean()), "advantage/abs_mean": float(adv.abs().mean())},
        )
