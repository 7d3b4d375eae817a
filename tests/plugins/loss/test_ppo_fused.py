"""``loss=ppo`` on the fused path (the shared forward stops before the lm_head and the loss is
computed by ``linear_policy_loss`` / ``fused_policy_loss``) equals the unfused path
(``linear_token_logprobs`` then ``clipped_policy_loss``): the loss, the gradient of every
parameter and every metric, on a real tiny model with masks, padding and odd sizes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from rlfuse import models
from rlfuse.config import ModelConfig
from rlfuse.data import Batch
from rlfuse.manager import instantiate, resolve
from rlfuse.plugins._sampling import left_pad
from rlfuse.trainer import Context


@pytest.fixture(scope="module")
def policy():
    torch.set_num_threads(1)
    cfg = ModelConfig()
    cfg.tiny.hidden_size, cfg.tiny.intermediate_size, cfg.tiny.num_layers = 24, 40, 2
    return models.build_tiny_model(cfg, models.build_tiny_tokenizer(), seed=0)


def rollout_batch(policy, seed=0, groups=3, n=2, L=7):
    """Left-padded prompts (groups of ``n`` rows share one), answers of uneven length then
    padding, old log-probs near the policy's (ratios on both sides of the clip range)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, 90, (5 + 3 * i,), generator=g).tolist() for i in range(groups)]
    ids, mask = left_pad([p for p in prompts for _ in range(n)], pad_id=0)
    B = ids.shape[0]
    lens = torch.randint(1, L + 1, (B,), generator=g)
    rmask = (torch.arange(L)[None] < lens[:, None]).long()
    resp = torch.randint(4, 90, (B, L), generator=g).masked_fill(rmask == 0, 0)
    batch = Batch(
        torch.cat([ids, resp], 1), torch.cat([mask, rmask], 1), torch.cat([torch.zeros_like(mask), rmask], 1).float()
    )
    with torch.no_grad():
        lp = models.forward(policy, batch).logprobs
    m = batch.response_mask
    batch.old_logprobs = (lp + 0.3 * torch.randn(lp.shape, generator=g)) * m
    batch.advantages = torch.randn(lp.shape, generator=g) * m
    batch.totals = {"tokens": float(m.sum()) + 3.0, "sequences": float(B) + 1.0}  # a micro-batch's share
    return batch


def bare_context(policy, reference, fused_loss):
    ctx = Context.__new__(Context)
    ctx.policy, ctx._reference = policy, reference
    ctx.cfg = OmegaConf.create({"kernels": {"backend": "torch", "fused_loss": fused_loss}})
    ctx._forward_needs = {"entropy": False, "hidden": False}
    ctx._head_readers, ctx._logprob_readers = 0, False
    return ctx


def ppo_step(policy, reference, batch, fused_loss, options, autocast=False):
    """One micro-batch of loss=ppo through the core's shared forward; loss, grads, metrics."""
    plugin = instantiate(resolve("ppo"), options, name="ppo", where="loss.ppo")
    ctx = bare_context(policy, reference, fused_loss)
    plugin.setup(ctx)
    part = batch.select(torch.arange(len(batch)))  # a fresh micro-batch (own forward cache)
    part.totals = batch.totals
    policy.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = plugin.loss(ctx=ctx, batch=part)
    out.terms["policy"].backward()
    fused = part.cache["forward"].head is not None
    grads = {k: p.grad.clone() for k, p in policy.named_parameters() if p.grad is not None}
    return out.terms["policy"].detach(), {k: float(v) for k, v in out.metrics.items()}, grads, fused


def assert_steps_equal(a, b, rtol, atol):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol, msg=lambda m: f"loss: {m}")
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert a[1][k] == pytest.approx(b[1][k], rel=rtol, abs=atol), k
    assert a[2].keys() == b[2].keys() and len(a[2]) > 0
    for k in a[2]:
        torch.testing.assert_close(a[2][k], b[2][k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"grad {k}: {m}")


OPTIONS = [
    {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0},
    {"aggregation": "seq-mean-token-mean", "kl_coef": 0.05, "kl_estimator": "k3", "kl_clamp": 10.0},
    {"aggregation": "seq-mean-token-sum-norm", "norm_length": 9, "entropy_coef": 0.01, "kl_coef": 0.1, "kl_estimator": "k2"},
    {"aggregation": "seq-mean-token-sum", "entropy_coef": 0.02},
]


@pytest.fixture(scope="module")
def reference(policy):
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    return ref


@pytest.mark.parametrize("share", [True, False], ids=["shared-prefix", "padded"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: o.get("aggregation", "token-mean"))
def test_fused_step_equals_unfused_fp32(policy, reference, options, share, monkeypatch):
    monkeypatch.setattr(models, "SHARE_PREFIX", share)
    batch = rollout_batch(policy, seed=len(options))
    fused = ppo_step(policy, reference, batch, "auto", options)
    plain = ppo_step(policy, reference, batch, "false", options)
    assert fused[3] and not plain[3]  # the two paths really ran
    assert_steps_equal(fused, plain, rtol=1e-4, atol=1e-6)


def test_fused_step_equals_unfused_bf16_mixed(policy, reference):
    batch = rollout_batch(policy, seed=11, groups=2, n=3)
    options = {"aggregation": "seq-mean-token-mean", "kl_coef": 0.05, "entropy_coef": 0.01}
    fused = ppo_step(policy, reference, batch, "auto", options, autocast=True)
    plain = ppo_step(policy, reference, batch, "false", options, autocast=True)
    assert fused[3] and not plain[3]
    assert_steps_equal(fused, plain, rtol=3e-2, atol=2e-3)


def test_logits_fallback_uses_fused_policy_loss(policy, reference, monkeypatch):
    """A model whose logits are not ``hidden @ lm_head.T`` (soft-capping, say) yields logits:
    the fused path then runs ``fused_policy_loss`` on them."""
    import rlfuse.plugins.loss.ppo as ppo_mod

    monkeypatch.setattr(models, "_from_hidden_ok", lambda model: False)
    called = []
    real = ppo_mod.fused_policy_loss
    monkeypatch.setattr(ppo_mod, "fused_policy_loss", lambda *a, **k: called.append(1) or real(*a, **k))
    batch = rollout_batch(policy, seed=5)
    options = OPTIONS[1]
    fused = ppo_step(policy, reference, batch, "auto", options)
    plain = ppo_step(policy, reference, batch, "false", options)
    assert fused[3] and not plain[3] and called == [1]
    assert_steps_equal(fused, plain, rtol=1e-4, atol=1e-6)


def test_other_reader_gets_the_same_logprobs(policy, reference):
    """With ``kernels.fused_loss=true`` and another plugin reading the log-probs, the reader
    gets them computed from the head inputs: equal to the unfused forward's, and its
    gradient adds to the fused loss's."""
    batch = rollout_batch(policy, seed=2)
    plugin = instantiate(resolve("ppo"), OPTIONS[0], name="ppo", where="loss.ppo")

    def step(mode):
        ctx = bare_context(policy, reference, mode)
        plugin.setup(ctx)
        ctx.require_forward(logprobs=True)  # e.g. loss=sft alongside
        part = batch.select(torch.arange(len(batch)))
        part.totals = batch.totals
        policy.zero_grad(set_to_none=True)
        loss = plugin.loss(ctx=ctx, batch=part).terms["policy"] + ctx.forward(part).logprobs.sum() * 1e-3
        loss.backward()
        grads = [p.grad.clone() for p in policy.parameters() if p.grad is not None]
        return part.cache["forward"].head is not None, ctx.forward(part).logprobs.detach(), grads

    (f_on, f_lp, f_g), (p_on, p_lp, p_g) = step("true"), step("auto")
    assert f_on and not p_on
    torch.testing.assert_close(f_lp, p_lp, rtol=1e-5, atol=1e-6)
    for a, b in zip(f_g, p_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_on_policy_batch_takes_the_unfused_path(policy, reference):
    """On-policy (no old log-probs: ratio = 1 from the training forward's own log-probs) the
    loss needs the log-probs first; the head inputs give them, the result is unchanged."""
    batch = rollout_batch(policy, seed=4)
    batch.old_logprobs = None
    batch.extras["on_policy"] = True
    a = ppo_step(policy, reference, batch, "auto", {})
    b = ppo_step(policy, reference, batch, "false", {})
    assert a[1]["policy/ratio_mean"] == pytest.approx(1.0) and a[1]["policy/clipfrac"] == 0.0
    assert_steps_equal(a, b, rtol=1e-5, atol=1e-7)
