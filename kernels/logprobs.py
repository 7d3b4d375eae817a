"""Token log-probabilities (+ entropy) without materialising ``log_softmax`` over the vocabulary.

Naive equivalent (what the tests compare against)::

    z = logits.float() / temperature                      # (N, V) fp32 copy       : 1x logits
    logsm = z.log_softmax(-1)                             # (N, V) fp32            : 1x logits
    logp = logsm.gather(-1, labels[..., None])[..., 0]    # (N,)
    entropy = -(logsm.exp() * logsm).sum(-1)              # (N,)   (another 2x logits)
    # backward: autograd keeps logsm, allocates d(logsm) (zeros + scatter) and d(z):
    # ~3x the logits beyond the logits themselves, all fp32.

Here (both backends) the forward reads the logits once and keeps only the per-row
logsumexp ``lse`` (and entropy ``H``) — N floats. The backward recomputes
``p = exp(z - lse)`` block by block and writes the logits gradient directly::

    d z_j = g_lp * (1[j == y] - p_j) - g_H * p_j * (z_j - lse + H)      d logits = d z / temperature

so the only (N, V) tensor ever allocated is the gradient itself (or none with
``inplace_backward=True``, which writes it into the logits buffer).

Layout of this file: torch reference, chunked torch backend, Triton kernels + launchers,
autograd Functions, public ops (``token_logprobs``, ``linear_token_logprobs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._dispatch import HAS_TRITON, resolve_backend

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "token_logprobs",
    "linear_token_logprobs",
    "token_logprobs_reference",
    "linear_token_logprobs_reference",
]


@dataclass(frozen=True)
class LogprobOptions:
    """Options shared by the log-prob kernels (internal; the public ops take keywords)."""

    temperature: float = 1.0
    ignore_index: int = -100
    entropy: bool = False  # also compute the entropy of softmax(logits / temperature)
    inplace_backward: bool = False  # write d(logits) into the logits buffer


# ----------------------------------------------------------------------------------------------
# Plain torch reference (materialises everything; for tests and as documentation)
# ----------------------------------------------------------------------------------------------


def token_logprobs_reference(
    logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False
):
    """``log_softmax(logits / T).gather(labels)`` in fp32, 0 at ``ignore_index`` (and the entropy)."""
    z = logits.float() / temperature  # (..., V)
    logsm = torch.log_softmax(z, dim=-1)  # (..., V)
    valid = labels != ignore_index  # (...)
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    ent = -(logsm.exp() * logsm).sum(-1)
    return logp, torch.where(valid, ent, torch.zeros_like(ent))


def linear_token_logprobs_reference(hidden, lm_head_weight, labels, *, bias=None, **kwargs):
    """``token_logprobs_reference(hidden @ W.T + b, labels)`` — the full logits tensor exists."""
    logits = torch.nn.functional.linear(hidden, lm_head_weight, bias)  # (..., V)
    return token_logprobs_reference(logits, labels, **kwargs)


# ----------------------------------------------------------------------------------------------
# Chunked torch backend (CPU default): vectorised over a block of rows at a time
# ----------------------------------------------------------------------------------------------

#: elements per row chunk of the torch backend (2 Mi elements = 8 MiB of fp32): bounds the
#: temporaries; small problems (e.g. 1024 tokens x 100 vocab) are a single chunk.
TORCH_CHUNK_ELEMS = 1 << 21


def _row_chunk(n_rows: int, V: int, budget: int) -> int:
    return max(1, min(n_rows, budget // max(V, 1)))


def _scaled_fp32(x, scale: float):
    """fp32 ``x * scale``; returns ``x`` itself when it is fp32 and scale == 1, else a new tensor."""
    if x.dtype != torch.float32:
        z = x.float()
        return z.mul_(scale) if scale != 1.0 else z
    return x * scale if scale != 1.0 else x


def _torch_lp_forward(x, labels, valid, opts, logp, lse, ent):
    """x (N, V) any float dtype -> fills logp, lse, ent (N,) fp32 (ent may be None)."""
    N, V = x.shape
    safe = torch.where(valid, labels, 0).unsqueeze(1)  # (N, 1)
    step = _row_chunk(N, V, TORCH_CHUNK_ELEMS)
    for s in range(0, N, step):
        e = min(N, s + step)
        z = _scaled_fp32(x[s:e], 1.0 / opts.temperature)  # (n, V) fp32
        logsm = torch.log_softmax(z, dim=-1)  # (n, V) chunk only
        lp = logsm.gather(1, safe[s:e]).squeeze(1)
        logp[s:e] = lp
        lse[s:e] = z.gather(1, safe[s:e]).squeeze(1) - lp
        if ent is not None:
            p = logsm.exp()
            ent[s:e] = p.mul_(logsm).sum(-1).neg_()  # -sum p log p
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    torch.where(valid, logp, zero, out=logp)
    if ent is not None:
        torch.where(valid, ent, zero, out=ent)


def _torch_lp_backward(x, labels, valid, lse, ent, g_lp, g_ent, opts, out):
    """Write d(x) into ``out`` (N, V) (``out`` may be ``x`` itself). g_lp/g_ent: (N,) fp32."""
    N, V = x.shape
    safe = torch.where(valid, labels, 0).unsqueeze(1)  # (N, 1)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    g_lp = torch.where(valid, g_lp, zero).unsqueeze(1)  # (N, 1)
    if g_ent is not None:
        g_ent = torch.where(valid, g_ent, zero).unsqueeze(1)
        h_minus_lse = (ent - lse).unsqueeze(1)  # (N, 1)
    lse = lse.unsqueeze(1)
    inv_t = 1.0 / opts.temperature
    direct = x.dtype == torch.float32 and opts.temperature == 1.0
    step = _row_chunk(N, V, TORCH_CHUNK_ELEMS)
    for s in range(0, N, step):
        e = min(N, s + step)
        if direct:  # fp32, T == 1: compute straight into the output rows (no scratch at all)
            d = out[s:e] if out.dtype == torch.float32 else torch.empty_like(x[s:e])
            if g_ent is not None:
                coef = x[s:e] + h_minus_lse[s:e]  # (n, V) scratch: z - lse + H
            torch.sub(x[s:e], lse[s:e], out=d)
        else:
            z = _scaled_fp32(x[s:e], inv_t)
            if g_ent is not None:
                coef = z + h_minus_lse[s:e]
            d = z.sub_(lse[s:e])  # (n, V) fp32 scratch
        d.exp_()  # p
        if g_ent is not None:
            d.mul_(coef.mul_(g_ent[s:e]).add_(g_lp[s:e])).neg_()  # -p * (g_lp + g_H (z - lse + H))
        else:
            d.mul_(g_lp[s:e].neg())
        d.scatter_add_(1, safe[s:e], g_lp[s:e])
        if inv_t != 1.0:
            d.mul_(inv_t)
        if d.data_ptr() != out[s:e].data_ptr():
            out[s:e].copy_(d)
    return out


# ----------------------------------------------------------------------------------------------
# Triton kernels (CUDA; CPU under TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------------------

#: largest vocabulary tile of one loop iteration (tests lower it to exercise the loop).
MAX_BLOCK_V = 8192
#: default (tile, warps) per kernel, from the H200 sweep in tests/benchmarks/bench_kernels_gpu.py:
#: the forward keeps per-lane state (small tiles, 4 warps); the backward is a plain stream.
DEFAULT_LAUNCH = {"fwd": (1024, 4), "bwd": (8192, 16)}
#: {"fwd" | "bwd": (BLOCK_V, num_warps, loop stages)} forced launch configs (benchmark sweeps).
LAUNCH_OVERRIDE: dict[str, tuple[int, int, int]] = {}


def _launch_cfg(V: int, kind: str = "fwd") -> tuple[int, int, int]:
    """(BLOCK_V, num_warps, stages) for a vocabulary of size V; one program streams one row."""
    fit = max(32, triton.next_power_of_2(V))
    if kind in LAUNCH_OVERRIDE:
        block, warps, stages = LAUNCH_OVERRIDE[kind]
        return min(block, fit), warps, stages
    block, warps = DEFAULT_LAUNCH[kind]
    block = min(block, MAX_BLOCK_V, fit)
    return block, max(1, min(warps, block // 256)), 1


if HAS_TRITON:

    @triton.jit
    def _lse_update(z, zs, m, s, t, HAS_ENT: tl.constexpr):
        """One tile of the per-lane online logsumexp (base 2): one exponential per element."""
        d = z - m
        up = d > 0.0  # this element is the lane's new max
        e = tl.exp2(-tl.abs(d))  # of 2^(z - m) and 2^(m - z) the larger is 1
        s = tl.where(up, s * e + 1.0, s + e)
        if HAS_ENT:
            t = tl.where(up, t * e + zs, t + e * zs)
        return tl.maximum(m, z), s, t

    @triton.jit
    def _row_lse(
        x_row, V, n_cols, inv_temp,
        BLOCK_V: tl.constexpr, HAS_ENT: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        """Online logsumexp of one row over ``n_cols`` (= V, or 0 to skip) columns.

        Every lane of the tile keeps its own running max ``m``, sum ``s = sum 2^(z - m)`` (and
        ``t = sum 2^(z - m) z`` for the entropy) in base 2, so the loop has no cross-thread
        reduction and needs ONE exponential per element; the lanes are combined once at the
        end. Full tiles are loaded without masks; the ragged tail once, masked.

        :returns: (lse, sum_j p_j z_j) with z = x * inv_temp (natural log units); the second is 0
            without HAS_ENT. Skipped rows return finite placeholders.
        """
        c2 = inv_temp * 1.4426950408889634  # log2(e) / T
        m = tl.full([BLOCK_V], -1e30, dtype=tl.float32)  # finite: -inf - -inf would be NaN
        s = tl.zeros([BLOCK_V], dtype=tl.float32)
        t = tl.zeros([BLOCK_V], dtype=tl.float32)
        n_full = (n_cols // BLOCK_V) * BLOCK_V
        for start in tl.range(0, n_full, BLOCK_V, num_stages=STAGES):
            z = tl.load(x_row + start + tl.arange(0, BLOCK_V)).to(tl.float32) * c2
            m, s, t = _lse_update(z, z, m, s, t, HAS_ENT)
        if n_full < n_cols:
            offs = n_full + tl.arange(0, BLOCK_V)
            msk = offs < V
            z = tl.load(x_row + offs, mask=msk, other=float("-inf")).to(tl.float32) * c2
            m, s, t = _lse_update(z, tl.where(msk, z, 0.0), m, s, t, HAS_ENT)
        mx = tl.max(m, axis=0)
        scale = tl.exp2(m - mx)
        # a non-empty row has s >= 1 (the lane holding the max contributes 2^0); skipped rows
        # (n_cols = 0) get s = 1 instead of log(0)
        s_tot = tl.maximum(tl.sum(s * scale, axis=0), 1.0)
        lse = (mx + tl.log2(s_tot)) * 0.6931471805599453
        pz = 0.0
        if HAS_ENT:
            pz = tl.sum(t * scale, axis=0) / s_tot * 0.6931471805599453
        return lse, pz

    @triton.jit
    def _lp_fwd_kernel(
        X, stride_x, LBL, LOGP, LSE, ENT,
        V, inv_temp, ignore_index,
        BLOCK_V: tl.constexpr, HAS_ENT: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        """One program per row: logp = z_y - lse, H = lse - sum p z; 0 on ignored rows."""
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_x
        label = tl.load(LBL + row)
        valid = label != ignore_index
        n_cols = tl.where(valid, V, 0)  # ignored rows skip the vocabulary loop
        lse, pz = _row_lse(x_row, V, n_cols, inv_temp, BLOCK_V, HAS_ENT, STAGES)
        safe = tl.where(valid, label, 0)
        z_y = tl.load(x_row + safe).to(tl.float32) * inv_temp
        tl.store(LOGP + row, tl.where(valid, z_y - lse, 0.0))
        tl.store(LSE + row, tl.where(valid, lse, 0.0))
        if HAS_ENT:
            tl.store(ENT + row, tl.where(valid, lse - pz, 0.0))

    @triton.jit
    def _dlogits(x, offs, label, g, c2, lse2, inv_temp, g_h, h_minus_lse, HAS_ENT: tl.constexpr):
        """d logits of one tile: (g (1[j = y] - p) - g_H p (z - lse + H)) / T."""
        p = tl.exp2(x * c2 - lse2)
        if HAS_ENT:
            dz = -p * (g + g_h * (x * inv_temp + h_minus_lse))
        else:
            dz = -p * g
        return tl.where(offs == label, dz + g, dz) * inv_temp

    @triton.jit
    def _lp_bwd_kernel(
        X, stride_x, DX, stride_dx, LBL, LSE, ENT, GLP, GENT,
        V, inv_temp, ignore_index,
        BLOCK_V: tl.constexpr, HAS_ENT: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        """One program per row: dx = (g (1[j=y] - p) - g_H p (z - lse + H)) / T (DX may alias X)."""
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_x
        dx_row = DX + row * stride_dx
        label = tl.load(LBL + row)
        valid = label != ignore_index
        if valid:
            g = tl.load(GLP + row)
            lse = tl.load(LSE + row)
            g_h = 0.0
            h_minus_lse = 0.0
            if HAS_ENT:
                g_h = tl.load(GENT + row)
                h_minus_lse = tl.load(ENT + row) - lse
            c2 = inv_temp * 1.4426950408889634  # p = 2^(x log2(e) / T - lse log2(e)): one FMA
            lse2 = lse * 1.4426950408889634
            n_full = (V // BLOCK_V) * BLOCK_V
            for start in tl.range(0, n_full, BLOCK_V, num_stages=STAGES):
                offs = start + tl.arange(0, BLOCK_V)
                x = tl.load(x_row + offs).to(tl.float32)
                dz = _dlogits(x, offs, label, g, c2, lse2, inv_temp, g_h, h_minus_lse, HAS_ENT)
                tl.store(dx_row + offs, dz.to(DX.dtype.element_ty))
            if n_full < V:
                offs = n_full + tl.arange(0, BLOCK_V)
                msk = offs < V
                x = tl.load(x_row + offs, mask=msk, other=0.0).to(tl.float32)
                dz = _dlogits(x, offs, label, g, c2, lse2, inv_temp, g_h, h_minus_lse, HAS_ENT)
                tl.store(dx_row + offs, dz.to(DX.dtype.element_ty), mask=msk)
        else:  # ignored token: zero gradient, the logits are not read
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                zeros = tl.zeros([BLOCK_V], dtype=tl.float32)
                tl.store(dx_row + offs, zeros.to(DX.dtype.element_ty), mask=offs < V)


def _triton_lp_forward(x, labels, valid, opts, logp, lse, ent):
    N, V = x.shape
    if N == 0:
        return
    block, warps, stages = _launch_cfg(V)
    _lp_fwd_kernel[(N,)](
        x, x.stride(0), labels, logp, lse, ent if ent is not None else lse,
        V, 1.0 / opts.temperature, opts.ignore_index,
        BLOCK_V=block, HAS_ENT=ent is not None, STAGES=stages, num_warps=warps,
    )  # fmt: skip


def _triton_lp_backward(x, labels, valid, lse, ent, g_lp, g_ent, opts, out):
    N, V = x.shape
    if N == 0:
        return out
    block, warps, stages = _launch_cfg(V, "bwd")
    has_ent = g_ent is not None
    _lp_bwd_kernel[(N,)](
        x, x.stride(0), out, out.stride(0), labels, lse, ent if has_ent else lse,
        g_lp, g_ent if has_ent else g_lp,
        V, 1.0 / opts.temperature, opts.ignore_index,
        BLOCK_V=block, HAS_ENT=has_ent, STAGES=stages, num_warps=warps,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# Backend-neutral row ops (also used by policy_loss.py)
# ----------------------------------------------------------------------------------------------


def _prep_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, V) view with unit column stride (copies only if the last dim is strided)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def lp_forward(backend, x, labels, opts):
    """x (N, V), labels (N,) -> (logp, lse, ent|None), each (N,) fp32. No autograd."""
    N = x.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    logp, lse = torch.empty(N, **f32), torch.empty(N, **f32)
    ent = torch.empty(N, **f32) if opts.entropy else None
    valid = labels != opts.ignore_index
    fwd = _triton_lp_forward if backend == "triton" else _torch_lp_forward
    fwd(x, labels, valid, opts, logp, lse, ent)
    return logp, lse, ent


def lp_backward(backend, x, labels, lse, ent, g_lp, g_ent, opts, out=None):
    """d(x) for upstream grads g_lp, g_ent (N,) (g_ent None: no entropy term); written to ``out``."""
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    g_lp = g_lp.float().contiguous() if g_lp is not None else torch.zeros_like(lse)
    if g_ent is not None:
        g_ent = g_ent.float().contiguous()
    valid = labels != opts.ignore_index
    bwd = _triton_lp_backward if backend == "triton" else _torch_lp_backward
    return bwd(x, labels, valid, lse, ent, g_lp, g_ent, opts, out)


# chunked hidden @ W.T --------------------------------------------------------------------------

#: logits elements per token chunk of the linear variants, per device type ...
LINEAR_CHUNK_ELEMS = {"cpu": 1 << 24, "cuda": 1 << 26}
#: ... but never fewer rows than this: every chunk re-reads the whole (V, H) weight in three
#: matmuls, so tiny chunks at a large vocabulary become weight-bandwidth bound.
LINEAR_MIN_ROWS = {"cpu": 512, "cuda": 128}


def linear_chunk_rows(n_rows: int, V: int, device: torch.device, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, min(n_rows, int(chunk_size)))
    rows = _row_chunk(n_rows, V, LINEAR_CHUNK_ELEMS.get(device.type, 1 << 24))
    return max(1, min(n_rows, max(rows, LINEAR_MIN_ROWS.get(device.type, 128))))  # >= 1: N may be 0


def _chunk_logits(h, w, b):
    return torch.addmm(b, h, w.t()) if b is not None else h @ w.t()  # (n, V)


def _cast(cdt, *xs):
    """The matmul inputs in the compute dtype (autocast's, when one was active), or as given."""
    return tuple(x if (x is None or cdt is None) else x.to(cdt) for x in xs)


def linear_lp_forward(backend, h, w, b, labels, opts, rows, cdt=None):
    """h (N, H), w (V, H), b (V,)|None -> (logp, lse, ent|None): logits exist one chunk at a time.

    ``cdt``: the matmul dtype (autocast's); the log-softmax still accumulates in fp32."""
    h, w, b = _cast(cdt, h, w, b)
    N = h.shape[0]
    f32 = dict(dtype=torch.float32, device=h.device)
    logp, lse = torch.empty(N, **f32), torch.empty(N, **f32)
    ent = torch.empty(N, **f32) if opts.entropy else None
    valid = labels != opts.ignore_index
    fwd = _triton_lp_forward if backend == "triton" else _torch_lp_forward
    for s in range(0, N, rows):
        e = min(N, s + rows)
        fwd(_chunk_logits(h[s:e], w, b), labels[s:e], valid[s:e], opts,
            logp[s:e], lse[s:e], ent[s:e] if ent is not None else None)  # fmt: skip
    return logp, lse, ent


def linear_lp_backward(backend, h, w, b, labels, lse, ent, g_lp, g_ent, opts, rows, needs, cdt=None):
    """Recompute each logits chunk, turn it into d(logits) in place, fold into dh, dW, db.

    With ``cdt`` the matmuls run in that dtype and dW / db accumulate across chunks in the
    weight's own dtype (fp32 masters under autocast)."""
    need_h, need_w, need_b = needs
    N = h.shape[0]
    dh = torch.empty_like(h) if need_h else None
    w_like, b_like = w, b  # dW / db come back in the weight's own dtype
    dw = db = None  # the first chunk's product starts them: no zero-filled (V, H) buffer
    h, w, b = _cast(cdt, h, w, b)
    g_lp = g_lp.float().contiguous() if g_lp is not None else torch.zeros_like(lse)
    if g_ent is not None:
        g_ent = g_ent.float().contiguous()
    valid = labels != opts.ignore_index
    bwd = _triton_lp_backward if backend == "triton" else _torch_lp_backward
    for s in range(0, N, rows):
        e = min(N, s + rows)
        logits = _chunk_logits(h[s:e], w, b)  # (n, V) recomputed
        bwd(logits, labels[s:e], valid[s:e], lse[s:e], ent[s:e] if ent is not None else None,
            g_lp[s:e], g_ent[s:e] if g_ent is not None else None, opts, logits)  # fmt: skip
        if dh is not None:
            if dh.dtype == logits.dtype:
                torch.mm(logits, w, out=dh[s:e])  # (n, H)
            else:
                dh[s:e] = logits @ w
        if need_w:
            dw = fold_dw(dw, logits, h[s:e], w_like.dtype)
        if need_b and b is not None:
            db = fold_db(db, logits, b_like.dtype)
    return dh, *head_grads_or_zeros(dw, db, w_like, b_like, needs)


def fold_dw(dw, dlogits, h, dtype):
    """``dw + dlogits.T @ h`` in ``dtype`` (the weight's: fp32 masters under autocast). ``None``
    starts the sum with the first chunk's product: no zero-filled (V, H) buffer (on a CPU a
    fresh 113 MB zero fill is mostly page faults)."""
    if dw is None:
        return torch.mm(dlogits.t(), h).to(dtype)  # (V, H)
    if dw.dtype == dlogits.dtype:
        return dw.addmm_(dlogits.t(), h)
    return dw.add_(dlogits.t() @ h)


def fold_db(db, dlogits, dtype):
    part = dlogits.sum(0, dtype=dtype)
    return part if db is None else db.add_(part)


def head_grads_or_zeros(dw, db, w, b, needs):
    """(dW, db) with zeros where a needed gradient had no rows to start it."""
    _, need_w, need_b = needs
    if need_w and dw is None:
        dw = torch.zeros_like(w)
    if need_b and b is not None and db is None:
        db = torch.zeros_like(b)
    return dw, db


# ----------------------------------------------------------------------------------------------
# autograd Functions
# ----------------------------------------------------------------------------------------------


class TokenLogprobsFunction(torch.autograd.Function):
    """(N, V) logits, (N,) labels -> logp (N,) fp32 [, entropy (N,) fp32]."""

    @staticmethod
    def forward(ctx, x, labels, opts: LogprobOptions, backend: str):
        logp, lse, ent = lp_forward(backend, x, labels, opts)
        ctx.save_for_backward(x, labels, lse, ent)
        ctx.opts, ctx.backend = opts, backend
        ctx.set_materialize_grads(False)
        return (logp, ent) if opts.entropy else logp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        x, labels, lse, ent = ctx.saved_tensors
        if g_lp is None and g_ent is None:
            return None, None, None, None
        out = x if ctx.opts.inplace_backward else None
        dx = lp_backward(ctx.backend, x, labels, lse, ent, g_lp, g_ent, ctx.opts, out)
        return dx, None, None, None


class LinearTokenLogprobsFunction(torch.autograd.Function):
    """(N, H) hidden, (V, H) weight, (V,)|None bias, (N,) labels -> logp (N,) [, entropy]."""

    @staticmethod
    def forward(ctx, h, w, b, labels, opts: LogprobOptions, backend: str, rows: int, cdt=None):
        logp, lse, ent = linear_lp_forward(backend, h, w, b, labels, opts, rows, cdt)
        ctx.save_for_backward(h, w, b, labels, lse, ent)
        ctx.opts, ctx.backend, ctx.rows, ctx.cdt = opts, backend, rows, cdt
        ctx.set_materialize_grads(False)
        return (logp, ent) if opts.entropy else logp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        h, w, b, labels, lse, ent = ctx.saved_tensors
        if g_lp is None and g_ent is None:
            return (None,) * 8
        needs = ctx.needs_input_grad[:3]
        dh, dw, db = linear_lp_backward(
            ctx.backend, h, w, b, labels, lse, ent, g_lp, g_ent, ctx.opts, ctx.rows, needs, ctx.cdt
        )
        return dh, dw, db, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------


def _check_labels(labels: torch.Tensor, lead: torch.Size, what: str) -> None:
    if labels.shape != lead:
        raise ValueError(
            f"{what}: labels shape {tuple(labels.shape)} must equal the leading dims {tuple(lead)}"
        )
    if labels.dtype.is_floating_point:
        raise TypeError(f"{what}: labels must be an integer tensor, got {labels.dtype}")


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    backend: str | None = None,
):
    """Log-probability of ``labels`` under ``softmax(logits / temperature)``, in fp32.

    Naive equivalent: ``log_softmax(logits.float() / T, -1).gather(-1, labels[..., None])[..., 0]``
    (and ``entropy = -(p * log p).sum(-1)``) — without ever materialising the (..., V)
    log-softmax: memory beyond the inputs is N floats forward, the logits gradient backward.

    :param logits: (..., V) float tensor (fp32/bf16/fp16), e.g. (B, T, V) or (N, V).
    :param labels: (...) integer tensor; positions equal to ``ignore_index`` give log-prob 0,
        entropy 0 and zero gradient.
    :param temperature: logits are divided by it (sampling temperature of the rollout).
    :param return_entropy: also return the per-token entropy (fp32, differentiable).
    :param inplace_backward: write d(logits) into the logits buffer itself (saves one
        logits-sized allocation). Only when nothing else needs the logits afterwards (e.g. the
        output of the lm_head); autograd raises if another node saved them.
    :param backend: ``None`` (process default), ``"auto"``, ``"triton"`` or ``"torch"``.
    :returns: logp (...) fp32, or (logp, entropy) with ``return_entropy``.
    """
    V = logits.shape[-1]
    _check_labels(labels, logits.shape[:-1], "token_logprobs")
    name = resolve_backend(backend, logits.device)
    opts = LogprobOptions(
        float(temperature), int(ignore_index), bool(return_entropy), bool(inplace_backward)
    )
    x = _prep_rows(logits.reshape(-1, V))  # (N, V)
    out = TokenLogprobsFunction.apply(x, labels.reshape(-1), opts, name)
    if return_entropy:
        return out[0].view(labels.shape), out[1].view(labels.shape)
    return out.view(labels.shape)


def linear_token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
):
    """``token_logprobs(hidden @ lm_head_weight.T + bias, labels)`` without the full logits.

    Tokens are processed in chunks of ``chunk_size`` rows (default: a few tens of MiB of
    logits); each chunk's logits are recomputed in the backward and turned into d(logits) in
    place, so the largest temporary is one (chunk, V) tensor.

    :param hidden: (..., H) final hidden states; :param lm_head_weight: (V, H);
    :param bias: optional (V,); other parameters as :func:`token_logprobs`.
    :returns: logp (...) fp32, or (logp, entropy).

    Under ``torch.autocast`` the chunk matmuls run in the autocast dtype in the forward *and*
    the recomputing backward (the weight stays in its own dtype: dW accumulates there, in fp32
    for fp32 master weights), and the log-softmax accumulates in fp32 as always.
    """
    H = hidden.shape[-1]
    _check_labels(labels, hidden.shape[:-1], "linear_token_logprobs")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != H:
        raise ValueError(f"lm_head_weight must be (V, {H}), got {tuple(lm_head_weight.shape)}")
    name = resolve_backend(backend, hidden.device)
    opts = LogprobOptions(float(temperature), int(ignore_index), bool(return_entropy), False)
    h = hidden.reshape(-1, H)  # (N, H)
    rows = linear_chunk_rows(h.shape[0], lm_head_weight.shape[0], h.device, chunk_size)
    dev = h.device.type
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    with torch.autocast(dev, enabled=False):  # the Function casts explicitly (cdt), fwd and bwd alike
        out = LinearTokenLogprobsFunction.apply(
            h, lm_head_weight, bias, labels.reshape(-1), opts, name, rows, cdt
        )
    if return_entropy:
        return out[0].view(labels.shape), out[1].view(labels.shape)
    return out.view(labels.shape)
