"""token_logprobs / linear_token_logprobs against log_softmax + gather (outputs and gradients)."""

from __future__ import annotations

import pytest
import torch

from rlfuse.kernels import (
    get_default_backend,
    linear_token_logprobs,
    set_default_backend,
    token_logprobs,
    triton_interpreter_active,
)
from rlfuse.kernels.logprobs import linear_token_logprobs_reference, token_logprobs_reference

ON_CUDA = torch.cuda.is_available()
INTERPRETING = triton_interpreter_active()
DTYPES = [torch.float32, torch.bfloat16]
# (label shape, vocab): one token, vocab not a multiple of any tile, flattened rows, V = 1,
# vocab an exact multiple of the tile (no ragged tail)
SHAPES = [((1, 1), 7), ((3, 5), 1003), ((9,), 1000), ((2, 3), 1), ((5,), 512)]


def _close(actual, expected, dtype=torch.float32, what=""):
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5, msg=what)
    else:  # one bf16 rounding of the same fp32 value
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1.6e-2, msg=what)


def _labels(shape, V, device, ignore=True):
    y = torch.randint(0, V, shape, device=device)
    if ignore and y.numel() > 2:
        y.view(-1)[1] = -100
        y.view(-1)[-1] = -100
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,V", SHAPES, ids=[f"{s}x{v}" for s, v in SHAPES])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", [False, True], ids=["lp", "lp+ent"])
def test_token_logprobs_matches_reference(backend, device, dtype, shape, V, temperature, entropy):
    x = (torch.randn(*shape, V, device=device) * 3).to(dtype).requires_grad_()
    y = _labels(shape, V, device)
    ours = token_logprobs(x, y, temperature=temperature, return_entropy=entropy, backend=backend)
    ref = token_logprobs_reference(x, y, temperature=temperature, return_entropy=entropy)
    ours, ref = (ours, ref) if entropy else ((ours,), (ref,))
    grads_out = [torch.randn(shape, device=device) for _ in ours]
    g_ours = torch.autograd.grad(ours, x, grads_out)[0]
    g_ref = torch.autograd.grad(ref, x, grads_out)[0]
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == torch.float32 and a.shape == y.shape
        _close(a, b, what="output")
    assert g_ours.dtype == dtype
    _close(g_ours, g_ref, dtype, "d logits")
    ignored = y == -100
    assert (ours[0][ignored] == 0).all()
    assert (g_ours[ignored] == 0).all()


def test_all_ignored_and_extreme_logits(backend, device):
    x = torch.randn(4, 300, device=device) * 50  # very peaked rows: exp overflow if done naively
    x[1, 7] = 1e4
    x.requires_grad_()
    y = torch.tensor([3, 7, -100, 5], device=device)
    lp, ent = token_logprobs(x, y, return_entropy=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    ref_lp, ref_ent = token_logprobs_reference(x.detach(), y, return_entropy=True)
    torch.testing.assert_close(lp, ref_lp, atol=1e-4, rtol=1e-5)
    assert torch.isfinite(ent).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(ent, ref_ent, atol=1e-4, rtol=1e-5)
    x2 = torch.randn(3, 50, device=device, requires_grad=True)
    y2 = torch.full((3,), -100, device=device)
    lp2, ent2 = token_logprobs(x2, y2, return_entropy=True, backend=backend)
    (lp2.sum() + ent2.sum()).backward()
    assert (lp2 == 0).all() and (ent2 == 0).all() and (x2.grad == 0).all()


def test_custom_ignore_index_and_int32_labels(backend, device):
    x = torch.randn(6, 130, device=device, requires_grad=True)
    y = torch.randint(0, 130, (6,), device=device, dtype=torch.int32)
    y[2] = 0
    lp = token_logprobs(x, y, ignore_index=0, backend=backend)
    ref = token_logprobs_reference(x, y.long(), ignore_index=0)
    _close(lp, ref)
    assert lp[2] == 0
    _close(torch.autograd.grad(lp.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0])


def test_non_contiguous_logits(backend, device):
    base = torch.randn(5, 4, 301, device=device, requires_grad=True)
    x = base.transpose(0, 1)  # (4, 5, 301), rows not contiguous
    y = torch.randint(0, 301, (4, 5), device=device)
    lp = token_logprobs(x, y, backend=backend)
    ref = token_logprobs_reference(x, y)
    _close(lp, ref)
    _close(torch.autograd.grad(lp.sum(), base)[0], torch.autograd.grad(ref.sum(), base)[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_inplace_backward(backend, device, dtype):
    h = torch.randn(6, 16, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(333, 16, device=device, dtype=dtype)
    y = _labels((6,), 333, device)
    logits = h @ w.t()  # an intermediate: nothing else needs it in the backward
    lp = token_logprobs(logits, y, inplace_backward=True, backend=backend)
    g = torch.autograd.grad(lp.sum(), h)[0]
    ref = token_logprobs_reference(h @ w.t(), y)
    g_ref = torch.autograd.grad(ref.sum(), h)[0]
    if dtype == torch.float32:
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-5)
    else:  # bf16 d(logits) @ W: compare as a whole (small entries cancel)
        assert _rel_err(g, g_ref) < 1e-2


def test_no_grad_and_detached_inputs(backend, device):
    x = torch.randn(2, 3, 77, device=device)
    y = torch.randint(0, 77, (2, 3), device=device)
    with torch.no_grad():
        lp = token_logprobs(x, y, backend=backend)
    assert not lp.requires_grad
    _close(lp, token_logprobs_reference(x, y))


def test_empty_batch(backend, device):
    x = torch.randn(0, 5, 64, device=device, requires_grad=True)
    y = torch.zeros(0, 5, dtype=torch.long, device=device)
    lp = token_logprobs(x, y, backend=backend)
    assert lp.shape == (0, 5)
    lp.sum().backward()
    assert x.grad.shape == x.shape


# ---- chunked linear variant ---------------------------------------------------------------------


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "bias,chunk_size,entropy",
    [(False, None, False), (True, 4, True), (False, 4, False), (True, None, True)],
    ids=["nobias-whole-lp", "bias-chunk4-ent", "nobias-chunk4-lp", "bias-whole-ent"],
)
def test_linear_token_logprobs(backend, device, dtype, bias, chunk_size, entropy):
    B, T, H, V = 3, 5, 48, 1003
    h = torch.randn(B, T, H, device=device).to(dtype).requires_grad_()
    w = (torch.randn(V, H, device=device) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(V, device=device) * 0.3).to(dtype).requires_grad_() if bias else None
    y = _labels((B, T), V, device)
    kw = dict(temperature=0.8, return_entropy=entropy)
    ours = linear_token_logprobs(h, w, y, bias=b, chunk_size=chunk_size, backend=backend, **kw)
    ref = linear_token_logprobs_reference(h, w, y, bias=b, **kw)
    ours, ref = (ours, ref) if entropy else ((ours,), (ref,))
    params = [t for t in (h, w, b) if t is not None]
    gouts = [torch.randn(B, T, device=device) for _ in ours]
    g_ours = torch.autograd.grad(ours, params, gouts)
    g_ref = torch.autograd.grad(ref, params, gouts)
    if dtype == torch.float32:
        for a, r in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-5)
        for a, r in zip(g_ours, g_ref, strict=True):
            torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)
    else:  # bf16 matmuls: chunked and full products may round differently
        for a, r in zip(ours, ref, strict=True):
            assert a.dtype == torch.float32
            assert _rel_err(a, r) < 2e-2
        for a, r in zip(g_ours, g_ref, strict=True):
            assert a.dtype == dtype
            assert _rel_err(a, r) < 3e-2


def test_linear_matches_token_logprobs_exactly_fp32(backend, device):
    h = torch.randn(7, 32, device=device, requires_grad=True)
    w = torch.randn(515, 32, device=device, requires_grad=True)
    y = _labels((7,), 515, device)
    a = linear_token_logprobs(h, w, y, chunk_size=3, backend=backend)
    b = token_logprobs(h @ w.t(), y, backend=backend)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


# ---- dispatch -----------------------------------------------------------------------------------


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(ValueError, match="auto, triton, torch"):
        set_default_backend("cuda")
    with pytest.raises(ValueError, match="valid backends"):
        token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), backend="fast")


def test_default_backend_roundtrip():
    old = get_default_backend()
    try:
        set_default_backend("torch")
        assert get_default_backend() == "torch"
        lp = token_logprobs(torch.randn(3, 9), torch.zeros(3, dtype=torch.long))
        assert lp.shape == (3,)
    finally:
        set_default_backend(old)


@pytest.mark.skipif(
    ON_CUDA or INTERPRETING, reason="only meaningful on CPU without the interpreter"
)
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), backend="triton")


def test_bad_shapes():
    with pytest.raises(ValueError, match="labels shape"):
        token_logprobs(torch.randn(2, 3, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        token_logprobs(torch.randn(2, 5), torch.zeros(2))
    with pytest.raises(ValueError, match="lm_head_weight"):
        linear_token_logprobs(
            torch.randn(2, 4), torch.randn(5, 3), torch.zeros(2, dtype=torch.long)
        )


@pytest.mark.slow
def test_large_vocab_chunked_torch(device, monkeypatch):
    """Bigger vocabulary, a few rows per chunk, against the reference."""
    import rlfuse.kernels.logprobs as m

    monkeypatch.setattr(m, "TORCH_CHUNK_ELEMS", 1 << 18)
    x = torch.randn(64, 32_771, device=device, dtype=torch.bfloat16, requires_grad=True)
    y = _labels((64,), 32_771, device)
    lp, ent = token_logprobs(x, y, return_entropy=True, backend="torch")
    rlp, rent = token_logprobs_reference(x, y, return_entropy=True)
    _close(lp, rlp)
    torch.testing.assert_close(ent, rent, atol=1e-4, rtol=1e-5)
    g = torch.autograd.grad(lp.sum() + ent.sum(), x)[0]
    g_ref = torch.autograd.grad(rlp.sum() + rent.sum(), x)[0]
    _close(g, g_ref, torch.bfloat16)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_linear_under_autocast_keeps_fp32_accumulation_and_master_grads(chunk_size):
    """Under bf16 autocast the lm_head matmul runs in bf16 in the forward *and* the
    recomputing backward, log-probs come out fp32, and dW lands in the fp32 master weight
    (accumulated over chunks in fp32): equal to the reference on bf16-rounded inputs."""
    torch.manual_seed(0)
    h = torch.randn(7, 16, requires_grad=True)  # fp32 hidden (Llama's final norm gives fp32)
    w = (torch.randn(40, 16) * 0.3).requires_grad_()
    labels = torch.randint(0, 40, (7,))
    labels[2] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = linear_token_logprobs(h, w, labels, chunk_size=chunk_size, backend="torch")
    assert lp.dtype == torch.float32
    lp.sum().backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    hb = h.detach().bfloat16().float().requires_grad_()
    wb = w.detach().bfloat16().float().requires_grad_()
    z = (hb @ wb.t()).bfloat16().float()  # the bf16 logits autocast produces
    want = torch.log_softmax(z, -1).gather(-1, labels.clamp_min(0)[:, None])[:, 0] * (labels != -100)
    torch.testing.assert_close(lp, want, rtol=0, atol=1e-5)
    want.sum().backward()
    torch.testing.assert_close(w.grad, wb.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(h.grad, hb.grad, rtol=2e-2, atol=2e-2)


def test_linear_head_grads_without_rows_are_zeros_in_the_weight_dtype(backend, device):
    """dW / db start from the first chunk's product (no zero-filled buffer): with no rows
    at all they are still zeros of the weight's shape and dtype."""
    h = torch.randn(0, 16, device=device, requires_grad=True)
    w = torch.randn(301, 16, device=device, requires_grad=True)
    b = torch.randn(301, device=device, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=device)
    out = linear_token_logprobs(h, w, y, bias=b, backend=backend)
    gw, gb = torch.autograd.grad(out.sum(), [w, b], allow_unused=True)
    assert gw is not None and gw.shape == w.shape and gw.dtype == w.dtype and not gw.any()
    assert gb is not None and gb.shape == b.shape and not gb.any()


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_linear_weight_grad_equals_a_zero_started_accumulation_bitwise(chunk_size):
    """Starting dW with the first chunk's product gives the same bits as adding every chunk
    to zeros (what the kernel did before): seeded runs do not move."""
    from rlfuse.kernels.logprobs import fold_dw

    torch.manual_seed(0)
    g, x = torch.randn(11, 203), torch.randn(11, 24)
    rows = chunk_size or 11
    acc, zero = None, torch.zeros(203, 24)
    for s in range(0, 11, rows):
        acc = fold_dw(acc, g[s : s + rows], x[s : s + rows], torch.float32)
        zero.addmm_(g[s : s + rows].t(), x[s : s + rows])
    assert torch.equal(acc, zero)
