"""``advantage=median_baseline``: each response's return minus the median return of its group.

The median is a baseline that one lucky (or broken) sample cannot drag: with rewards
[0, 0, 0, 10] GRPO's mean baseline gives the three zeros -2.5 each, the median gives them 0.
"""

from dataclasses import dataclass

import torch

from rlfuse import Advantages, Batch, hookimpl


@dataclass
class Config:
    scale: float = 1.0  # multiply every advantage by this


class Plugin:
    Config = Config

    def __init__(self, cfg: Config, name: str) -> None:
        self.cfg = cfg

    @hookimpl
    def advantage(self, batch: Batch) -> Advantages:
        if batch.group_ids is None:
            raise ValueError("advantage=median_baseline needs groups: set rollout.n >= 2")
        r = batch.rewards.float()  # (B,) sequence rewards
        adv = torch.zeros_like(r)
        for g in batch.group_ids.unique():
            rows = batch.group_ids == g
            adv[rows] = r[rows] - r[rows].median()
        adv = adv * self.cfg.scale
        return Advantages(
            advantages=adv[:, None] * batch.response_mask,  # (B, T): same value on every response token
            metrics={"advantage/mean": float(adv.mean()), "advantage/abs_mean": float(adv.abs().mean())},
        )
