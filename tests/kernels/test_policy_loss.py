"""clipped_policy_loss / fused_policy_loss / linear_policy_loss against the textbook objective."""

from __future__ import annotations

import pytest
import torch

from rlfuse.kernels import (
    PolicyLossConfig,
    PolicyLossOutput,
    aggregation_weights,
    clipped_policy_loss,
    fused_policy_loss,
    linear_policy_loss,
    token_logprobs,
)
from rlfuse.kernels.policy_loss import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    clipped_policy_loss_reference,
    fused_policy_loss_reference,
)

STATS = ("pg_loss", "clipfrac", "approx_kl", "ratio_mean", "kl", "dual_clipfrac")


def _batch(B, T, device, masked_row=True):
    lp = (torch.randn(B, T, device=device) * 0.3 - 2.0).requires_grad_()
    old = lp.detach() + torch.randn(B, T, device=device) * 0.3  # ratios spread over the clip range
    adv = torch.randn(B, T, device=device)
    ref = lp.detach() + torch.randn(B, T, device=device) * 0.5
    mask = torch.rand(B, T, device=device) > 0.3
    if masked_row:
        mask[1] = False  # an all-masked sequence
    ent = (torch.rand(B, T, device=device) * 3).requires_grad_()
    return lp, old, adv, ref, mask, ent


def _check(out: PolicyLossOutput, ref_loss, ref_stats, atol=1e-6):
    torch.testing.assert_close(out.loss, ref_loss, atol=atol, rtol=1e-5)
    for name in STATS:
        torch.testing.assert_close(
            getattr(out, name), ref_stats[name], atol=atol, rtol=1e-5, msg=name
        )
    if "entropy" in ref_stats:
        torch.testing.assert_close(out.entropy, ref_stats["entropy"], atol=atol, rtol=1e-5)
    assert not out.clipfrac.requires_grad


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
def test_clipped_loss_matches_reference(backend, device, aggregation, kl_estimator):
    lp, old, adv, ref, mask, ent = _batch(4, 7, device)
    cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.1,
                           kl_estimator=kl_estimator, kl_clamp=1.0, entropy_coef=0.01,
                           aggregation=aggregation, norm_length=10)  # fmt: skip
    out = clipped_policy_loss(
        lp, old, adv, mask, cfg, ref_logprobs=ref, entropy=ent, backend=backend
    )
    ref_loss, ref_stats = clipped_policy_loss_reference(
        lp, old, adv, mask, cfg, ref_logprobs=ref, entropy=ent
    )
    _check(out, ref_loss, ref_stats)
    g = torch.autograd.grad(out.loss, (lp, ent))
    g_ref = torch.autograd.grad(ref_loss, (lp, ent))
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert (g[0][~mask] == 0).all()


@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_clipping_branches_and_stats(backend, device, dual_clip):
    """Hand-picked ratios: inside, above and below the clip range, both advantage signs."""
    logr = torch.tensor([[0.0, 0.5, -0.5, 0.5, -0.5, 2.0]], device=device)
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0]], device=device)
    old = torch.full_like(logr, -1.0)
    lp = (old + logr).requires_grad_()
    out = clipped_policy_loss(
        lp, old, adv, clip_low=0.2, clip_high=0.2, dual_clip=dual_clip, backend=backend
    )
    ref_loss, ref_stats = clipped_policy_loss_reference(lp, old, adv, clip_low=0.2, clip_high=0.2,
                                                        dual_clip=dual_clip)  # fmt: skip
    _check(out, ref_loss, ref_stats)
    # clipped: (r=e^.5, A>0) and (r=e^-.5, A<0); dual-clipped: r=e^2 > 2 with A<0
    assert out.clipfrac.item() == pytest.approx(2 / 6)
    assert out.dual_clipfrac.item() == pytest.approx((1 / 6) if dual_clip else 0.0)
    g = torch.autograd.grad(out.loss, lp)[0]
    torch.testing.assert_close(g, torch.autograd.grad(ref_loss, lp)[0], atol=1e-6, rtol=1e-5)


def test_no_ref_no_entropy(backend, device):
    lp, old, adv, _, mask, _ = _batch(3, 5, device)
    out = clipped_policy_loss(lp, old, adv, mask, kl_coef=0.5, entropy_coef=0.1, backend=backend)
    ref_loss, ref_stats = clipped_policy_loss_reference(lp, old, adv, mask)
    _check(out, ref_loss, ref_stats)
    assert out.kl.item() == 0.0 and out.entropy is None
    assert set(out.metrics()) == set(STATS)


def test_kl_stat_without_kl_coef(backend, device):
    lp, old, adv, ref, mask, _ = _batch(3, 5, device)
    out = clipped_policy_loss(lp, old, adv, mask, ref_logprobs=ref, kl_coef=0.0, backend=backend)
    ref_loss, ref_stats = clipped_policy_loss_reference(lp, old, adv, mask, ref_logprobs=ref)
    _check(out, ref_loss, ref_stats)
    assert out.kl.item() > 0


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batch_invariance(backend, device, aggregation):
    """Summing the op over micro-batches with global normalisers == the op on the whole batch."""
    lp, old, adv, ref, mask, ent = _batch(6, 5, device)
    cfg = PolicyLossConfig(aggregation=aggregation, kl_coef=0.2, entropy_coef=0.05)
    full = clipped_policy_loss(
        lp, old, adv, mask, cfg, ref_logprobs=ref, entropy=ent, backend=backend
    )
    g_full = torch.autograd.grad(full.loss, (lp, ent))
    num_tokens, num_seqs = mask.sum().float(), float(mask.shape[0])
    total = 0.0
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        part = clipped_policy_loss(lp[rows], old[rows], adv[rows], mask[rows], cfg, ref_logprobs=ref[rows],
                                   entropy=ent[rows], num_tokens=num_tokens, num_seqs=num_seqs,
                                   backend=backend)  # fmt: skip
        total = total + part.loss
    g_parts = torch.autograd.grad(total, (lp, ent))
    torch.testing.assert_close(total, full.loss, atol=1e-6, rtol=1e-5)
    for a, b in zip(g_parts, g_full, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_per_sequence_advantages_and_1d_inputs(backend, device):
    lp, old, _, _, mask, _ = _batch(4, 6, device)
    adv = torch.randn(4, 1, device=device)  # GRPO: one advantage per sequence
    out = clipped_policy_loss(lp, old, adv, mask, backend=backend)
    ref_loss, ref_stats = clipped_policy_loss_reference(lp, old, adv.expand(4, 6), mask)
    _check(out, ref_loss, ref_stats)
    flat = clipped_policy_loss(lp.reshape(-1), old.reshape(-1), adv.expand(4, 6).reshape(-1), mask.reshape(-1),
                               backend=backend)  # fmt: skip
    torch.testing.assert_close(flat.loss, out.loss, atol=1e-6, rtol=1e-5)  # token-mean: layout-free


def test_all_masked_is_zero_not_nan(backend, device):
    lp, old, adv, ref, _, ent = _batch(2, 4, device)
    mask = torch.zeros(2, 4, dtype=torch.bool, device=device)
    for agg in AGGREGATIONS:
        out = clipped_policy_loss(lp, old, adv, mask, ref_logprobs=ref, entropy=ent, aggregation=agg,
                                  kl_coef=0.1, entropy_coef=0.1, backend=backend)  # fmt: skip
        assert out.loss.item() == 0.0 and out.clipfrac.item() == 0.0
        assert (torch.autograd.grad(out.loss, lp)[0] == 0).all()


def test_garbage_at_masked_positions_is_ignored(backend, device):
    lp, old, adv, ref, mask, _ = _batch(3, 5, device)
    old2, adv2 = old.clone(), adv.clone()
    old2[~mask] = -1e4  # exp(lp - old) would overflow
    adv2[~mask] = float("nan")
    a = clipped_policy_loss(lp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, backend=backend)
    b = clipped_policy_loss(lp, old2, adv2, mask, ref_logprobs=ref, kl_coef=0.1, backend=backend)
    torch.testing.assert_close(a.loss, b.loss)
    assert torch.isfinite(torch.autograd.grad(b.loss, lp)[0]).all()


def test_bf16_logprobs_in_fp32_out(backend, device):
    lp, old, adv, ref, mask, _ = _batch(3, 5, device)
    lp16 = lp.detach().bfloat16().requires_grad_()
    out = clipped_policy_loss(lp16, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, backend=backend)
    ref_loss, _ = clipped_policy_loss_reference(
        lp16.float(), old, adv, mask, ref_logprobs=ref, kl_coef=0.1
    )
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-6, rtol=1e-5)
    g = torch.autograd.grad(out.loss, lp16)[0]
    assert g.dtype == torch.bfloat16


def test_config_validation_and_overrides():
    with pytest.raises(ValueError, match="aggregation"):
        PolicyLossConfig(aggregation="mean")
    with pytest.raises(ValueError, match="kl_estimator"):
        PolicyLossConfig(kl_estimator="k4")
    with pytest.raises(ValueError, match="dual_clip"):
        PolicyLossConfig(dual_clip=0.5)
    lp, old, adv = torch.zeros(2, 3, requires_grad=True), torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(TypeError, match="clip_hgih"):
        clipped_policy_loss(lp, old, adv, clip_hgih=0.3)
    a = clipped_policy_loss(lp, old, adv, PolicyLossConfig(clip_high=0.3))
    b = clipped_policy_loss(lp, old, adv, clip_high=0.3)
    torch.testing.assert_close(a.loss, b.loss)


# ---- fused and chunked-linear variants against the unfused composition ----------------------------


def _fused_inputs(B, T, V, device):
    y = torch.randint(0, V, (B, T), device=device)
    y[0, 2] = -100
    old = -torch.rand(B, T, device=device) * 2 - 6.0  # near log(1/V): ratios around 1
    adv = torch.randn(B, 1, device=device)
    ref = old + 0.2 * torch.randn(B, T, device=device)
    mask = torch.rand(B, T, device=device) > 0.2
    return y, old, adv, ref, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "aggregation,entropy_coef",
    [("token-mean", 0.0), ("seq-mean-token-mean", 0.01), ("seq-mean-token-sum-norm", 0.01)],
)
def test_fused_matches_unfused(backend, device, dtype, aggregation, entropy_coef):
    B, T, V = 3, 5, 1003
    x = torch.randn(B, T, V, device=device).to(dtype).requires_grad_()
    y, old, adv, ref, mask = _fused_inputs(B, T, V, device)
    cfg = PolicyLossConfig(clip_low=0.1, clip_high=0.1, dual_clip=3.0, kl_coef=0.05, kl_estimator="k3",
                           entropy_coef=entropy_coef, aggregation=aggregation)  # fmt: skip
    kw = dict(ref_logprobs=ref, temperature=0.9, num_seqs=4.0)
    out = fused_policy_loss(x, y, old, adv, mask, cfg, backend=backend, **kw)
    ref_loss, ref_stats = fused_policy_loss_reference(x, y, old, adv, mask, cfg, **kw)
    _check(out, ref_loss, ref_stats, atol=1e-5)
    g = torch.autograd.grad(out.loss, x)[0]
    g_ref = torch.autograd.grad(ref_loss, x)[0]
    assert g.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)
    else:
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1.6e-2)
    # and against our own unfused ops
    lp = token_logprobs(x, y, temperature=0.9, backend=backend)
    m = mask & (y != -100)
    unfused = clipped_policy_loss(
        lp, old, adv, m, cfg, ref_logprobs=ref, num_seqs=4.0, backend=backend
    )
    two = torch.autograd.grad(unfused.loss, x)[0]
    if entropy_coef == 0.0:
        torch.testing.assert_close(
            g, two, atol=1e-6, rtol=1.6e-2 if dtype == torch.bfloat16 else 1e-5
        )
    torch.testing.assert_close(out.logprobs, lp.detach(), atol=1e-6, rtol=1e-6)


def test_fused_inplace_backward(backend, device):
    B, T, V = 2, 4, 517
    h = torch.randn(B, T, 16, device=device, requires_grad=True)
    w = torch.randn(V, 16, device=device)
    y, old, adv, ref, mask = _fused_inputs(B, T, V, device)
    out = fused_policy_loss(h @ w.t(), y, old, adv, mask, inplace_backward=True, backend=backend)
    g = torch.autograd.grad(out.loss, h)[0]
    ref_loss, _ = fused_policy_loss_reference(h @ w.t(), y, old, adv, mask)
    torch.testing.assert_close(g, torch.autograd.grad(ref_loss, h)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "chunk_size,bias", [(None, False), (4, True)], ids=["whole-nobias", "chunk4-bias"]
)
def test_linear_policy_loss_matches_unfused(backend, device, dtype, chunk_size, bias):
    B, T, H, V = 3, 5, 32, 1003
    h = torch.randn(B, T, H, device=device).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=device) * 0.2).to(dtype).requires_grad_()
    b = (torch.randn(V, device=device) * 0.2).to(dtype).requires_grad_() if bias else None
    y, old, adv, ref, mask = _fused_inputs(B, T, V, device)
    cfg = PolicyLossConfig(kl_coef=0.05, entropy_coef=0.01, aggregation="seq-mean-token-sum")
    kw = dict(ref_logprobs=ref, temperature=1.3, num_seqs=3.0)
    out = linear_policy_loss(
        h, w, y, old, adv, mask, cfg, bias=b, chunk_size=chunk_size, backend=backend, **kw
    )
    logits = torch.nn.functional.linear(h, w, b)
    ref_loss, ref_stats = fused_policy_loss_reference(logits, y, old, adv, mask, cfg, **kw)
    params = [t for t in (h, w, b) if t is not None]
    g = torch.autograd.grad(out.loss, params)
    g_ref = torch.autograd.grad(ref_loss, params)
    if dtype == torch.float32:
        _check(out, ref_loss, ref_stats, atol=1e-5)
        for a, r in zip(g, g_ref, strict=True):
            torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4)
    else:
        torch.testing.assert_close(out.loss, ref_loss, atol=2e-2, rtol=2e-2)
        for a, r in zip(g, g_ref, strict=True):
            assert a.dtype == dtype
            err = ((a.float() - r.float()).norm() / r.float().norm()).item()
            assert err < 3e-2


def test_fused_all_ignored(backend, device):
    x = torch.randn(2, 3, 129, device=device, requires_grad=True)
    y = torch.full((2, 3), -100, device=device)
    z = torch.zeros(2, 3, device=device)
    out = fused_policy_loss(x, y, z, z + 1, entropy_coef=0.1, backend=backend)
    assert out.loss.item() == 0.0
    assert (torch.autograd.grad(out.loss, x)[0] == 0).all()


def test_linear_policy_loss_no_grad_and_single_backward(backend, device):
    h = torch.randn(2, 5, 16, device=device, requires_grad=True)
    w = torch.randn(301, 16, device=device, requires_grad=True)
    y, old, adv, ref, mask = _fused_inputs(2, 5, 301, device)
    with torch.no_grad():
        a = linear_policy_loss(h, w, y, old, adv, mask, backend=backend)
    b = linear_policy_loss(h, w, y, old, adv, mask, backend=backend)
    torch.testing.assert_close(a.loss, b.loss.detach())
    torch.testing.assert_close(a.logprobs, b.logprobs)
    (2 * b.loss).backward(retain_graph=True)  # upstream gradient != 1 is applied
    ref_loss, _ = fused_policy_loss_reference(h @ w.t(), y, old, adv, mask)
    g_ref = torch.autograd.grad(2 * ref_loss, (h, w))
    torch.testing.assert_close(h.grad, g_ref[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad, g_ref[1], atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="twice"):
        b.loss.backward()


def test_linear_policy_loss_under_autocast_matches_the_logits_path():
    """Under bf16 autocast the chunked linear loss runs its matmuls in bf16, keeps fp32
    accumulation, and puts d(W) into the fp32 master weight: same as the logits path."""
    from rlfuse.kernels import fused_policy_loss, linear_policy_loss

    torch.manual_seed(0)
    h = torch.randn(2, 5, 16)
    w = (torch.randn(40, 16) * 0.3).requires_grad_()
    labels = torch.randint(0, 40, (2, 5))
    old, adv = -torch.rand(2, 5) * 3, torch.randn(2, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_policy_loss(h, w, labels, old, adv, chunk_size=3, backend="torch")
    got.loss.backward()
    assert got.loss.dtype == torch.float32 and w.grad.dtype == torch.float32
    g_lin = w.grad.clone()
    w.grad = None
    logits = (h.bfloat16() @ w.bfloat16().t())  # what autocast gives the logits path
    want = fused_policy_loss(logits, labels, old, adv, backend="torch")
    want.loss.backward()
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_lin, w.grad, rtol=3e-2, atol=3e-3)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_flat_selection_with_weights_equals_batch_layout(backend, device, aggregation):
    """The training path hands the fused ops only the scored tokens, flattened (N,), with
    ``weights=aggregation_weights(mask)`` gathered the same way: equal to the (B, T) call."""
    B, T, H, V = 3, 6, 16, 259
    h = torch.randn(B, T, H, device=device, requires_grad=True)
    w = (torch.randn(V, H, device=device) * 0.3).requires_grad_()
    y, old, adv, ref, mask = _fused_inputs(B, T, V, device)
    mask &= y != -100
    adv = adv.expand(B, T)
    cfg = PolicyLossConfig(kl_coef=0.05, entropy_coef=0.01, aggregation=aggregation, norm_length=7)
    kw = dict(ref_logprobs=ref, num_tokens=20.0, num_seqs=5.0)
    full = linear_policy_loss(h, w, y, old, adv, mask, cfg, return_entropy=True, backend=backend, **kw)
    g_full = torch.autograd.grad(full.loss, (h, w))
    idx = mask.nonzero(as_tuple=True)
    wt = aggregation_weights(mask.float(), cfg, 20.0, 5.0)[idx]
    flat = dict(ref_logprobs=ref[idx], return_entropy=True, weights=wt, backend=backend)
    outs = [
        linear_policy_loss(h[idx], w, y[idx], old[idx], adv[idx], None, cfg, **flat),
        fused_policy_loss(h[idx] @ w.t(), y[idx], old[idx], adv[idx], None, cfg, **flat),
    ]
    for got in outs:
        torch.testing.assert_close(got.loss, full.loss, atol=1e-6, rtol=1e-5)
        for name in (*STATS, "entropy"):
            torch.testing.assert_close(getattr(got, name), getattr(full, name), atol=1e-6, rtol=1e-5, msg=name)
        for a, r in zip(torch.autograd.grad(got.loss, (h, w)), g_full, strict=True):
            torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-5)
