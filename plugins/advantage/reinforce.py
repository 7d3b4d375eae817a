"""``advantage=reinforce``: plain REINFORCE (Williams 1992) with a moving-average baseline.

    G_t = sum_{s >= t} gamma^(s - t) r_s          (return-to-go; = R_i when gamma = 1 and the
                                                   reward is a sequence score)
    A_t = G_t - b
    b  <- decay * b + (1 - decay) * mean_i R_i    (after each batch; the first batch's mean
                                                   initialises b, so step 0 is centred too)

The baseline only reduces variance; it never uses the current row's sample within a step, so
the estimator stays unbiased from step 1 on. Needs no groups (``rollout.n = 1`` is fine). The
baseline is saved in checkpoints (``save_state``/``load_state``) so a resumed run continues
with the same ``b``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlfuse import hookimpl
from rlfuse.data import Advantages, Batch
from rlfuse.errors import require
from rlfuse.plugins.advantage._common import returns_to_go, sequence_returns, token_rewards


@dataclass
class Config:
    decay: float = 0.9  # weight of the old baseline in the moving average
    gamma: float = 1.0
    normalize: bool = False  # also divide by the batch std of the returns (not plain REINFORCE)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        require(0 <= self.decay < 1, "decay", "in [0, 1)", self.decay)
        require(0 <= self.gamma <= 1, "gamma", "in [0, 1]", self.gamma)
        require(self.eps >= 0, "eps", ">= 0", self.eps)


class Plugin:
    Config = Config

    def __init__(self, cfg: Config, name: str = "reinforce") -> None:
        self.cfg = cfg
        self.name = name
        self.baseline: float | None = None

    @hookimpl
    def advantage(self, ctx: Any, batch: Batch) -> Advantages:
        R = sequence_returns(batch, f"advantage={self.name}")
        m = batch.response_mask.double()
        batch_mean = float(R.mean())
        b = batch_mean if self.baseline is None else self.baseline
        G = returns_to_go(token_rewards(batch), m, self.cfg.gamma)
        adv = (G - b) * m
        if self.cfg.normalize and len(R) > 1:
            std = float(R.std())
            if std > 0:
                adv = adv / (std + self.cfg.eps)
        self.baseline = self.cfg.decay * b + (1 - self.cfg.decay) * batch_mean
        return Advantages(
            advantages=adv.float(),
            metrics={"advantage/baseline": b, "advantage/return_mean": batch_mean},
        )

    @hookimpl
    def save_state(self) -> dict[str, Any]:
        return {f"advantage.{self.name}": {"baseline": self.baseline}}

    @hookimpl
    def load_state(self, state: dict[str, Any]) -> None:
        saved = state.get(f"advantage.{self.name}")
        if saved is not None:
            self.baseline = saved["baseline"]
