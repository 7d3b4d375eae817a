"""``loss=ppo`` against a hand-computed case (both clip sides, dual clip, masking, every
aggregation mode, fp32 and bf16); and on the fused path (the shared forward stops before the
lm_head, the loss comes from ``linear_policy_loss`` / ``fused_policy_loss``) equal to the
unfused path (``linear_token_logprobs`` then ``clipped_policy_loss``): the loss, the gradient
of every parameter and every metric, on a real tiny model with masks, padding and odd sizes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf

from rlfuse import models
from rlfuse.config import ModelConfig
from rlfuse.data import Batch, ForwardOutput
from rlfuse.manager import PluginError, instantiate, resolve
from rlfuse.plugins._sampling import left_pad
from rlfuse.trainer import Context


class FakeCtx:
    """Just what the ppo plugin uses: the policy forward and the reference."""

    def __init__(self, logprobs, entropy=None):
        self.out = ForwardOutput(logprobs=logprobs, entropy=entropy)
        self.recorded = {}

    def forward(self, batch, **_):
        return self.out

    def ref_logprobs(self, batch):
        return batch.ref_logprobs

    def record(self, metrics):
        self.recorded.update(metrics)


# Two rows, T = 5: column 0 is the prompt, row 0 has 3 response tokens (a, b, f), row 1 has
# 2 (c, d) and then a masked token e with a huge ratio and advantage that must not count.
#   token  A     ratio  clip range [0.8, 1.28]       pg      d pg / d logp
#   a     +1     1.5    upper clip: -1 * 1.28        -1.28   0 (clipped)
#   b     -1     0.5    lower clip: +1 * 0.8          0.8    0 (clipped)
#   f     +0.5   1.0    inside                       -0.5   -0.5
#   c     +2     0.9    inside                       -1.8   -1.8
#   d     -1     4.0    max(4, 1.28) = 4; dual clip 3 -> 3   0 (dual clipped)
#   e     +5     10     masked
RATIOS = [[1.0, 1.5, 0.5, 1.0, 1.0], [1.0, 0.9, 4.0, 10.0, 1.0]]
ADV = [[0.0, 1.0, -1.0, 0.5, 0.0], [0.0, 2.0, -1.0, 5.0, 0.0]]
MASK = [[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]]
PG = {"a": -1.28, "b": 0.8, "f": -0.5, "c": -1.8, "d": 3.0}
ROW0, ROW1 = PG["a"] + PG["b"] + PG["f"], PG["c"] + PG["d"]  # -0.98, 1.2
HAND = {  # loss and d loss / d logp at f (row 0, col 3) and c (row 1, col 1)
    "token-mean": ((ROW0 + ROW1) / 5, -0.5 / 5, -1.8 / 5),
    "seq-mean-token-mean": ((ROW0 / 3 + ROW1 / 2) / 2, -0.5 / 6, -1.8 / 4),
    "seq-mean-token-sum": ((ROW0 + ROW1) / 2, -0.5 / 2, -1.8 / 2),
    "seq-mean-token-sum-norm": ((ROW0 + ROW1) / (2 * 4), -0.5 / 8, -1.8 / 8),
}


def make(dtype=torch.float32, old_shift=-0.3):
    old = torch.full((2, 5), old_shift)
    lp = (old + torch.log(torch.tensor(RATIOS))).to(dtype).requires_grad_(True)
    batch = Batch(
        input_ids=torch.zeros(2, 5, dtype=torch.long),
        attention_mask=torch.ones(2, 5, dtype=torch.long),
        response_mask=torch.tensor(MASK, dtype=torch.float32),
        old_logprobs=old,
        advantages=torch.tensor(ADV),
        totals={"tokens": 5.0, "sequences": 2.0},
    )
    return lp, batch


def ppo(**options):
    return instantiate(resolve("ppo"), options, name="ppo", where="loss.ppo")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("aggregation", list(HAND))
def test_clipped_loss_hand_computed(aggregation, dtype):
    lp, batch = make(dtype)
    plugin = ppo(clip_low=0.2, clip_high=0.28, dual_clip=3.0, aggregation=aggregation, norm_length=4)
    out = plugin.loss(ctx=FakeCtx(lp), batch=batch)
    loss = out.terms["policy"]
    want, g_f, g_c = HAND[aggregation]
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 log-probs round the ratios
    assert float(loss.detach()) == pytest.approx(want, abs=tol)
    loss.backward()
    grad = lp.grad.float()
    expect = torch.zeros(2, 5)
    # d(-A ratio)/d logp = -A ratio, times the aggregation weight, only where unclipped
    expect[0, 3], expect[1, 1] = g_f * 1.0, g_c  # ratio(f) = 1, c's -1.8 already has ratio 0.9
    assert torch.allclose(grad, expect, atol=tol)
    assert float(out.metrics["policy/clipfrac"]) == pytest.approx(2 / 5)  # a and b


def test_without_dual_clip_the_negative_advantage_loss_is_unbounded():
    lp, batch = make()
    out = ppo(clip_low=0.2, clip_high=0.28).loss(ctx=FakeCtx(lp), batch=batch)
    assert float(out.terms["policy"].detach()) == pytest.approx((ROW0 + ROW1 - 3.0 + 4.0) / 5, abs=1e-5)
    out.terms["policy"].backward()
    assert float(lp.grad[1, 2]) == pytest.approx(4.0 / 5, abs=1e-5)  # d is live: -A * ratio = 4


def test_kl_term_and_entropy_bonus_hand_computed():
    lp, batch = make()
    batch.advantages = torch.zeros(2, 5)
    batch.ref_logprobs = lp.detach() - 0.5  # log(pi / ref) = 0.5 on every token
    ent = torch.full((2, 5), 2.0, requires_grad=True)
    plugin = ppo(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)
    out = plugin.loss(ctx=FakeCtx(lp, ent), batch=batch)
    k3 = math.exp(-0.5) + 0.5 - 1  # exp(ref - logp) - (ref - logp) - 1
    assert float(out.terms["policy"].detach()) == pytest.approx(0.1 * k3 - 0.01 * 2.0, abs=1e-6)
    assert float(out.metrics["kl/ref_token"]) == pytest.approx(k3, abs=1e-6)
    out.terms["policy"].backward()
    m = torch.tensor(MASK, dtype=torch.float32)
    assert torch.allclose(lp.grad, 0.1 * (1 - math.exp(-0.5)) * m / 5, atol=1e-7)
    assert torch.allclose(ent.grad, -0.01 * m / 5, atol=1e-8)


def test_ppo_bad_options_are_errors_naming_the_key():
    with pytest.raises(PluginError, match="aggregation"):
        ppo(aggregation="mean")
    with pytest.raises(PluginError, match="dual_clip"):
        ppo(dual_clip=0.5)
    with pytest.raises(PluginError, match="kl_estimator"):
        ppo(kl_estimator="k4")


# ------------------------------------------------------------------ the fused path


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
