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


AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


class Plugin:
    Config = Config

    def __init__(self, cfg: Config, name: str = "ppo") -> None:
        if cfg.aggregation not in AGGREGATIONS:
            raise ValueError(f"loss.{name}.aggregation must be one of {AGGREGATIONS}, got '{cfg.aggregation}'")
        if cfg.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"loss.{name}.kl_estimator must be k1, k2 or k3, got '{cfg.kl_estimator}'")
        if cfg.dual_clip is not None and cfg.dual_clip <= 1:
            raise ValueError(f"loss.{name}.dual_clip must be > 1, got {cfg.dual_clip}")
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
    def loss(self, ctx: Any, batch: Batch) -> LossOutput:
        on_policy = batch.old_logprobs is None and batch.extras.get("on_policy", False)
        if batch.advantages is None or (batch.old_logprobs is None and not on_policy):
            raise ValueError("loss=ppo needs advantages and old log-probs (an advantage plugin and an online rollout)")
        out = ctx.forward(batch)
        ref = ctx.ref_logprobs(batch) if self.cfg.kl_coef > 0 else None
        # on-policy (one update per rollout): the old policy IS the current one -> ratio = 1
        old = out.logprobs.detach() if on_policy else batch.old_logprobs
        res = clipped_policy_loss(
            out.logprobs,
            old,
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
