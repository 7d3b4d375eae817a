"""``reward=kl_penalty``: the per-token KL penalty to the reference policy, folded into the
reward as in Ziegler et al. 2019 / InstructGPT:

    r_t = -beta * (log pi_old(y_t) - log pi_ref(y_t))        on every response token

``beta`` is fixed, or adapted after every batch towards a target KL (Ziegler et al. 2019):

    e = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * batch_size / horizon)

where KL is the batch mean of the summed per-sequence log-ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlfuse import hookimpl
from rlfuse.data import Batch
from rlfuse.errors import require


@dataclass
class Config:
    beta: float = 0.05  # initial coefficient
    adaptive: bool = False
    target: float = 1.0  # target KL per sequence (nats) for the adaptive controller
    horizon: int = 10000  # samples over which beta adapts

    def __post_init__(self) -> None:
        require(self.beta >= 0, "beta", ">= 0", self.beta)
        require(self.target > 0, "target", "> 0", self.target)
        require(self.horizon > 0, "horizon", "> 0", self.horizon)


class KLController:
    """Fixed (adaptive=False) or adaptive KL coefficient."""

    def __init__(self, beta: float, adaptive: bool = False, target: float = 1.0, horizon: int = 10000) -> None:
        if beta < 0:
            raise ValueError(f"KL beta must be >= 0, got {beta}")
        if adaptive and (target <= 0 or horizon <= 0):
            raise ValueError("adaptive KL needs target > 0 and horizon > 0")
        self.beta = beta
        self.adaptive = adaptive
        self.target = target
        self.horizon = horizon

    def update(self, kl: float, n_samples: int) -> float:
        if self.adaptive:
            err = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.beta *= 1.0 + err * n_samples / self.horizon
        return self.beta


class Plugin:
    Config = Config

    def __init__(self, cfg: Config, name: str = "kl_penalty") -> None:
        self.name = name
        self.ctl = KLController(cfg.beta, cfg.adaptive, cfg.target, cfg.horizon)

    @hookimpl
    def reward(self, ctx: Any, batch: Batch) -> dict[str, torch.Tensor]:
        if batch.old_logprobs is None and batch.extras.get("on_policy"):
            from rlfuse.plugins.rollout.generate import old_policy_forward

            old_policy_forward(ctx, batch)  # skipped by the rollout (on-policy): needed here
        if batch.old_logprobs is None:
            raise ValueError("reward=kl_penalty needs old log-probs from an online rollout")
        ref = ctx.ref_logprobs(batch)
        log_ratio = (batch.old_logprobs - ref) * batch.response_mask  # (B, T), k1 per token
        kl_seq = float(log_ratio.sum(-1).mean())
        beta = self.ctl.beta
        self.ctl.update(kl_seq, len(batch))
        ctx.record({"kl/ref": kl_seq, "kl/beta": beta})
        return {self.name: -beta * log_ratio}

    @hookimpl
    def save_state(self) -> dict[str, Any]:
        return {f"reward.{self.name}": {"beta": self.ctl.beta}}

    @hookimpl
    def load_state(self, state: dict[str, Any]) -> None:
        if f"reward.{self.name}" in state:
            self.ctl.beta = state[f"reward.{self.name}"]["beta"]
