"""``loss=ppo``: the clipped policy-gradient surrogate (PPO, and GRPO/RLOO/REINFORCE++ with a
critic-free advantage), computed by :func:`rlfuse.kernels.clipped_policy_loss`.

    ratio_t = exp(logp_t - old_logp_t)
    l_t     = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_low, 1 + clip_high))
    l_t     = min(l_t, -A_t * dual_clip)              for A_t < 0, when dual_clip is set
    loss    = aggregate(l_t) + kl_coef * aggregate(KL_t) - entropy_coef * aggregate(H_t)

Every option is a config value of this one plugin (see docs/plugins/ppo.md for the
aggregation modes and KL estimators).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlfuse import hookimpl
from rlfuse.data import Batch, LossOutput
from rlfuse.errors import one_of, require
from rlfuse.kernels import PolicyLossConfig, clipped_policy_loss


@dataclass
class Config:
    clip_low: float = 0.2
    clip_high: float = 0.2  # > clip_low = DAPO's clip-higher
    dual_clip: float | None = None  # c > 1 bounds the loss of negative advantages (Ye et al. 2020)
    aggregation: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    norm_length: int | None = None  # constant of seq-mean-token-sum-norm (default: padded length)
    kl_coef: float = 0.0  # KL to the reference as a loss term (0 = off; PPO puts it in the reward)
    kl_estimator: str = "k3"  # k1 | k2 | k3
    kl_clamp: float | None = None  # clamp of the k3 value
    entropy_coef: float = 0.0  # entropy bonus

    def __post_init__(self) -> None:
        require(self.clip_low >= 0, "clip_low", ">= 0", self.clip_low)
        require(self.clip_high >= 0, "clip_high", ">= 0", self.clip_high)
        require(self.dual_clip is None or self.dual_clip > 1, "dual_clip", "> 1 or null", self.dual_clip)
        one_of("aggregation", self.aggregation, AGGREGATIONS)
        require(self.norm_length is None or self.norm_length >= 1, "norm_length", ">= 1 or null", self.norm_length)
        require(self.kl_coef >= 0, "kl_coef", ">= 0", self.kl_coef)
        one_of("kl_estimator", self.kl_estimator, ("k1", "k2", "k3"))
        require(self.kl_clamp is None or self.kl_clamp > 0, "kl_clamp", "> 0 or null", self.kl_clamp)
        require(self.entropy_coef >= 0, "entropy_coef", ">= 0", self.entropy_coef)


AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


class Plugin:
    Config = Config

    def __init__(self, cfg: Config, name: str = "ppo") -> None:
        self.cfg = cfg
        self.options = PolicyLossConfig(
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip,
            kl_coef=cfg.kl_coef,
            kl_estimator=cfg.kl_estimator,
            kl_clamp=cfg.kl_clamp,
            entropy_coef=cfg.entropy_coef,
            aggregation=cfg.aggregation,
            norm_length=cfg.norm_length,
        )

    @hookimpl
    def setup(self, ctx: Any) -> None:
        ctx.require_forward(entropy=True)  # logged as policy/entropy (and the entropy bonus)

    @hookimpl
    def loss(self, ctx: Any, batch: Batch) -> LossOutput:
        if batch.advantages is None or batch.old_logprobs is None:
            raise ValueError("loss=ppo needs advantages and old log-probs (an advantage plugin and an online rollout)")
        out = ctx.forward(batch)
        ref = ctx.ref_logprobs(batch) if self.cfg.kl_coef > 0 else None
        res = clipped_policy_loss(
            out.logprobs,
            batch.old_logprobs,
            batch.advantages,
            batch.response_mask,
            config=self.options,
            ref_logprobs=ref,
            entropy=out.entropy,
            num_tokens=batch.totals.get("tokens"),
            num_seqs=batch.totals.get("sequences"),
        )
        metrics = {
            "policy/clipfrac": res.clipfrac,
            "policy/approx_kl": res.approx_kl,
            "policy/ratio_mean": res.ratio_mean,
            "policy/pg_loss": res.pg_loss,
        }
        if res.entropy is not None:
            metrics["policy/entropy"] = res.entropy
        if ref is not None:
            metrics["policy/kl_ref"] = res.kl
        return LossOutput(terms={"policy": res.loss}, metrics=metrics)
