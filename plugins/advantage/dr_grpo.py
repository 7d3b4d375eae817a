"""``advantage=dr_grpo``: Dr. GRPO (Liu et al. 2025), ``A_i = R_i - mean_g R`` -- GRPO without
the division by the group's standard deviation. Pair with
``loss.ppo.aggregation=seq-mean-token-sum-norm``. Needs groups: ``rollout.n >= 2``."""

from __future__ import annotations

from dataclasses import dataclass

from rlfuse.plugins.advantage.grpo import Config as GRPOConfig
from rlfuse.plugins.advantage.grpo import Plugin as GRPO


@dataclass
class Config(GRPOConfig):
    scale_std: bool = False


class Plugin(GRPO):
    """``advantage=dr_grpo``: ``A_i = R_i - mean_g R`` (GRPO without the std division)."""

    Config = Config

    def __init__(self, cfg: Config, name: str = "dr_grpo") -> None:
        super().__init__(cfg, name=name)
