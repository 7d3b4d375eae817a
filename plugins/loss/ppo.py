"""``loss=ppo``: the clipped policy-gradient surrogate (PPO, and GRPO/RLOO/REINFORCE++ with a
critic-free advantage), computed by :func:`rlfuse.kernels.clipped_policy_loss`.

    ratio_t = exp(logp_t - old_logp_t)
    l_t     = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_low, 1 + clip_high))
    l_t     = min(l_t, -A_t * dual_clip)              for A_t < 0, when dual_clip is set
    loss    = aggregate(l_t) + kl_coef * aggregate(KL_t) - entropy_coef * aggregate(H_t)

Every option is a config value of this one plugin (see docs/plugins/ppo.md for the
aggregation modes and KL estimators).

When this plugin is the only reader of the policy's log-probs, the core's shared forward
stops before the lm_head (``ctx.require_forward(head=True)``, ``kernels.fused_loss``) and the
loss is computed by :func:`rlfuse.kernels.linear_policy_loss` from the final hidden states and
the lm_head weight -- lm_head, log-softmax, ratio, clip, KL, entropy and the masked sum in one
chunked pass, the logits never formed -- or by :func:`rlfuse.kernels.fused_policy_loss` on a
model that only yields logits. Same loss, gradients and metrics as the unfused path.
"""

from __future__ import annotations

from typing import Any

from rlfuse import hookimpl
from rlfuse.data import Batch, HeadInputs, LossOutput
from rlfuse.errors import require
from rlfuse.kernels import (
    PolicyLossConfig,
    PolicyLossOutput,
    aggregation_weights,
    clipped_policy_loss,
    fused_policy_loss,
    linear_policy_loss,
)


class Config(PolicyLossConfig):
    """The kernel's own options (:class:`rlfuse.kernels.PolicyLossConfig`): clip_low/high,
    dual_clip, aggregation, norm_length, kl_coef (KL to the reference as a loss term; PPO puts
    it in the reward instead), kl_estimator, kl_clamp, entropy_coef. Its ``__post_init__``
    checks the values, so a bad one is a config error naming the key; the ranges it leaves
    open are checked here."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.clip_low >= 0, "clip_low", ">= 0", self.clip_low)
        require(self.clip_high >= 0, "clip_high", ">= 0", self.clip_high)
        require(self.kl_coef >= 0, "kl_coef", ">= 0", self.kl_coef)
        require(self.entropy_coef >= 0, "entropy_coef", ">= 0", self.entropy_coef)


class Plugin:
    Config = Config

    def __init__(self, cfg: Config, name: str = "ppo") -> None:
        self.cfg = cfg
        self.options = cfg  # the kernel reads this dataclass directly

    @hookimpl
    def setup(self, ctx: Any) -> None:
        # entropy: logged as policy/entropy (and the entropy bonus); head: the fused kernels
        # compute log-probs, entropy and the loss in one pass when the core allows it
        ctx.require_forward(entropy=True, head=True)

    @hookimpl
    def loss(self, ctx: Any, batch: Batch) -> LossOutput:
        on_policy = batch.old_logprobs is None and batch.extras.get("on_policy", False)
        if batch.advantages is None or (batch.old_logprobs is None and not on_policy):
            raise ValueError("loss=ppo needs advantages and old log-probs (an advantage plugin and an online rollout)")
        out = ctx.forward(batch)
        ref = ctx.ref_logprobs(batch) if self.cfg.kl_coef > 0 else None
        if out.head is not None and not on_policy:  # on-policy: old = these log-probs, needed first
            res = self.fused(out.head, batch, ref)
        else:
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
            metrics["kl/ref_token"] = res.kl
        return LossOutput(terms={"policy": res.loss}, metrics=metrics)

    def fused(self, head: HeadInputs, batch: Batch, ref: Any) -> PolicyLossOutput:
        """The loss from head inputs: every (B, T) tensor taken into their layout, the
        aggregation weights computed on the batch's (B, T) mask first (the seq-mean modes need
        the rows, which the flat layout of the scored tokens no longer has)."""
        mask = batch.response_mask
        w = aggregation_weights(mask, self.options, batch.totals.get("tokens"), batch.totals.get("sequences"))
        take = head.take
        old, adv = take(batch.old_logprobs), take(batch.advantages.expand_as(mask))
        common = dict(
            config=self.options,
            ref_logprobs=take(ref) if ref is not None else None,
            temperature=head.temperature,
            return_entropy=True,
            weights=take(w),
        )
        if head.logits is not None:
            return fused_policy_loss(head.logits, head.labels, old, adv, take(mask), **common)
        return linear_policy_loss(head.hidden, head.weight, head.labels, old, adv, take(mask), bias=head.bias, **common)
