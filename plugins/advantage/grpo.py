"""``advantage=grpo`` and ``advantage=dr_grpo``: group-normalised advantages (no critic).

Each prompt is sampled ``rollout.n`` times; the rows that share a ``group_id`` form a group
``g``. With ``R_i`` the sequence return of row i (see :mod:`rlfuse.plugins.advantage._common`)::

    grpo     (Shao et al. 2024):  A_i = (R_i - mean_g R) / (std_g R + eps)
    dr_grpo  (Liu et al. 2025):   A_i =  R_i - mean_g R               (no std scaling)

``A_i`` is put on every response token of row i. ``std_g`` is the unbiased (n - 1) standard
deviation (``unbiased_std: false`` for the population one). Dividing by the group's std gives
prompts whose answers barely differ (std near 0) the same weight as contested ones -- Dr. GRPO
drops the division for that reason (and pairs it with ``aggregation=seq-mean-token-sum-norm``).
A group whose returns are all equal gets exactly zero advantage: it carries no learning
signal, and ``advantage/zero_std_frac`` reports the fraction of such groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlfuse import hookimpl
from rlfuse.data import Advantages, Batch
from rlfuse.plugins.advantage._common import broadcast, group_stats, grouped_returns


@dataclass
class Config:
    scale_std: bool = True  # divide by the group std (GRPO); false = Dr. GRPO
    unbiased_std: bool = True  # n - 1 (true) or n (false) in the group std
    eps: float = 1e-6  # added to the std


def group_normalised(
    returns: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor, cfg: Config
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) float64 advantages and (B,) all-equal flags for returns (B,) float64."""
    mean, std, equal = group_stats(returns, inverse, counts, unbiased=cfg.unbiased_std)
    adv = returns - mean
    if cfg.scale_std:
        adv = adv / (std + cfg.eps)
    adv = torch.where(equal, torch.zeros_like(adv), adv)
    return adv, equal


class Plugin:
    """GRPO's group-normalised advantage (``scale_std: false`` gives Dr. GRPO's)."""

    Config = Config

    def __init__(self, cfg: Config, name: str = "grpo") -> None:
        if cfg.eps < 0:
            raise ValueError(f"advantage.eps must be >= 0, got {cfg.eps}")
        self.cfg = cfg
        self.name = name

    @hookimpl
    def advantage(self, ctx: Any, batch: Batch) -> Advantages:
        who = f"advantage={self.name}"
        returns, inverse, counts = grouped_returns(batch, who)
        adv, equal = group_normalised(returns, inverse, counts, self.cfg)
        # each row of a group adds 1/n_g, so the sum counts groups
        zero_groups = float((equal.double() / counts.double()[inverse]).sum())
        return Advantages(
            advantages=broadcast(adv, batch.response_mask),
            metrics={
                "advantage/mean": float(adv.mean()),
                "advantage/abs_mean": float(adv.abs().mean()),
                "advantage/zero_std_frac": zero_groups / len(counts),
                "advantage/group_size": float(counts.double().mean()),
            },
        )
