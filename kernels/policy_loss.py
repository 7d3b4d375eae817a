"""Clipped policy-gradient loss (PPO / GRPO / DAPO family) with KL and entropy terms.

Naive equivalent, per token (``clipped_policy_loss_reference`` below)::

    ratio = exp(logp - old)
    pg    = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))
    pg    = min(pg, -A * dual_clip)            where A < 0          (dual clip, optional)
    tok   = pg + kl_coef * k(logp, ref) - entropy_coef * H
    loss  = sum(tok * w)                                             (w: aggregation weights)

with the KL estimators k1 = logp - ref, k2 = 0.5 (logp - ref)^2,
k3 = exp(ref - logp) - (ref - logp) - 1 (optionally clamped to ``kl_clamp``), and the
aggregation weights (``m`` = mask, rows = sequences)::

    token-mean                 w = m / num_tokens                       (default m.sum())
    seq-mean-token-mean        w = m / (m.sum(-1) * num_seqs)           (default rows)
    seq-mean-token-sum         w = m / num_seqs
    seq-mean-token-sum-norm    w = m / (norm_length * num_seqs)         (Dr. GRPO; norm_length=T)

Because the loss is linear in the weights, passing the *mini-batch* ``num_tokens`` /
``num_seqs`` to every micro-batch call makes the sum over micro-batches equal the loss of the
whole mini-batch (the trainer sums micro-batch losses without averaging).

The backward is hand-written: d loss / d logp = w * (1[not clipped] * -A * ratio
+ kl_coef * k'(logp)) and d loss / d H = -entropy_coef * w; old/ref/advantages are constants.

Three entry points share the per-token math:

* :func:`clipped_policy_loss` — from per-token log-probs (N-sized work only);
* :func:`fused_policy_loss`   — from logits: log-prob gathering, ratio, clip, KL and the masked
  aggregation in one pass over the logits (one Triton kernel), the backward writes d(logits);
* :func:`linear_policy_loss`  — from hidden states and the lm_head weight, chunked over tokens
  so the (tokens x vocab) logits never exist (recomputed in the backward).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from ._dispatch import HAS_TRITON, resolve_backend
from .logprobs import (
    LogprobOptions,
    _cast,
    _check_labels,
    _chunk_logits,
    _prep_rows,
    _torch_lp_backward,
    _triton_lp_backward,
    fold_db,
    fold_dw,
    head_grads_or_zeros,
    linear_chunk_rows,
    lp_backward,
    lp_forward,
    token_logprobs_reference,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .logprobs import _launch_cfg, _row_lse

__all__ = [
    "PolicyLossConfig",
    "PolicyLossOutput",
    "clipped_policy_loss",
    "fused_policy_loss",
    "linear_policy_loss",
    "clipped_policy_loss_reference",
    "aggregation_weights",
]

AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass
class PolicyLossConfig:
    """Static options of the clipped policy loss (one per run; from the loss plugin's config).

    ``num_tokens`` / ``num_seqs`` change every mini-batch, so they are keyword arguments of the
    ops, not fields here.
    """

    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2
    dual_clip: float | None = None  # c > 1: for A < 0 the token loss is min(pg, -A * c)
    kl_coef: float = 0.0  # weight of the KL(pi || ref) term (needs ref_logprobs)
    kl_estimator: str = "k3"  # k1 | k2 | k3
    kl_clamp: float | None = None  # clamp the estimator value to [-kl_clamp, kl_clamp] (e.g. 10)
    entropy_coef: float = 0.0  # loss -= entropy_coef * entropy (where the entropy is known)
    aggregation: str = "token-mean"  # see AGGREGATIONS
    norm_length: int | None = None  # seq-mean-token-sum-norm constant (default: T)

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation {self.aggregation!r} not in {AGGREGATIONS}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator {self.kl_estimator!r} not in {KL_ESTIMATORS}")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1, got {self.dual_clip}")
        if self.kl_clamp is not None and not self.kl_clamp > 0:
            raise ValueError(f"kl_clamp must be > 0, got {self.kl_clamp}")
        if self.norm_length is not None and not self.norm_length > 0:
            raise ValueError(f"norm_length must be > 0, got {self.norm_length}")


@dataclass
class PolicyLossOutput:
    """Result of the policy-loss ops.

    ``loss`` carries the gradient; every other field is a detached fp32 scalar tensor, a masked
    token mean over the tokens of *this call* (independent of num_tokens/num_seqs):

    * ``pg_loss``: the clipped surrogate ``pg`` (no KL / entropy terms);
    * ``clipfrac``: fraction of tokens whose clipped branch is active (gradient cut by the clip);
    * ``dual_clipfrac``: fraction cut by the dual clip (0 without it);
    * ``approx_kl``: KL(old || new) estimate ``(ratio - 1) - log ratio`` (the k3 form, as cleanrl);
    * ``ratio_mean``: mean of ``exp(logp - old)``;
    * ``kl``: mean of the configured estimator k(logp, ref) (0 without ref_logprobs);
    * ``entropy``: mean entropy (None when not available);
    * ``logprobs``: the per-token log-probs (fused / linear variants only, detached, fp32).
    """

    loss: torch.Tensor
    pg_loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    kl: torch.Tensor
    entropy: torch.Tensor | None = None
    dual_clipfrac: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None

    def metrics(self) -> dict[str, torch.Tensor]:
        """Scalar statistics by name (no loss, no per-token tensors), for logging."""
        names = _STAT_NAMES
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


_STAT_NAMES = ("pg_loss", "clipfrac", "approx_kl", "ratio_mean", "kl", "entropy", "dual_clipfrac")
_NSTAT = len(_STAT_NAMES)  # per-token stat columns; +1 column for the weighted loss in kernels


def _make_config(config: PolicyLossConfig | None, options: dict) -> PolicyLossConfig:
    if config is not None and not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(config).__name__}")
    cfg = config if config is not None else PolicyLossConfig()
    if options:
        names = {f.name for f in fields(PolicyLossConfig)}
        bad = sorted(set(options) - names)
        if bad:
            raise TypeError(f"unknown policy-loss option(s) {bad}; valid: {sorted(names)}")
        cfg = replace(cfg, **options)
    return cfg


# ----------------------------------------------------------------------------------------------
# Plain torch reference (autograd through textbook ops)
# ----------------------------------------------------------------------------------------------


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (S, T); a 1-D tensor is one sequence."""
    return t.reshape(1, -1) if t.dim() == 1 else t.reshape(-1, t.shape[-1])


def clipped_policy_loss_reference(
    logprobs, old_logprobs, advantages, mask=None, config=None, *, ref_logprobs=None, entropy=None,
    num_tokens=None, num_seqs=None, **options,
):  # fmt: skip
    """The textbook objective with torch autograd (for tests). Returns (loss, stats dict)."""
    if isinstance(mask, PolicyLossConfig):  # op(..., cfg) without a mask
        mask, config = None, mask
    cfg = _make_config(config, options)
    lp = _as_rows(logprobs).float()
    old = _as_rows(old_logprobs).float()
    adv = torch.broadcast_to(advantages, logprobs.shape).reshape(lp.shape).float()
    m = torch.ones_like(lp) if mask is None else _as_rows(mask).float()
    ratio = torch.exp(lp - old)
    s1 = -adv * ratio
    s2 = -adv * torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high)
    pg = torch.maximum(s1, s2)
    dual = torch.zeros_like(pg, dtype=torch.bool)
    if cfg.dual_clip is not None:
        cap = -adv * cfg.dual_clip
        dual = (adv < 0) & (pg > cap)
        pg = torch.where(adv < 0, torch.minimum(pg, cap), pg)
    tok = pg
    kl = torch.zeros_like(lp)
    if ref_logprobs is not None:
        ref = _as_rows(ref_logprobs).float()
        if cfg.kl_estimator == "k1":
            kl = lp - ref
        elif cfg.kl_estimator == "k2":
            kl = 0.5 * (lp - ref) ** 2
        else:
            kl = torch.exp(ref - lp) - (ref - lp) - 1
        if cfg.kl_clamp is not None:
            kl = torch.clamp(kl, -cfg.kl_clamp, cfg.kl_clamp)
        tok = tok + cfg.kl_coef * kl
    ent = None
    if entropy is not None:
        ent = _as_rows(entropy).float()
        tok = tok - cfg.entropy_coef * ent
    S, T = lp.shape
    if cfg.aggregation == "token-mean":
        loss = (tok * m).sum() / (m.sum().clamp_min(1) if num_tokens is None else num_tokens)
    else:
        ns = S if num_seqs is None else num_seqs
        per_seq = (tok * m).sum(-1)
        if cfg.aggregation == "seq-mean-token-mean":
            per_seq = per_seq / m.sum(-1).clamp_min(1)
        elif cfg.aggregation == "seq-mean-token-sum-norm":
            per_seq = per_seq / (cfg.norm_length or T)
        loss = per_seq.sum() / ns
    cnt = m.sum().clamp_min(1)

    def mean(v):
        return ((v.float() * m).sum() / cnt).detach()

    stats = dict(
        pg_loss=mean(pg), clipfrac=mean(s2 > s1), approx_kl=mean((ratio - 1) - (lp - old)),
        ratio_mean=mean(ratio), kl=mean(kl), dual_clipfrac=mean(dual),
    )  # fmt: skip
    if ent is not None:
        stats["entropy"] = mean(ent)
    return loss, stats


# ----------------------------------------------------------------------------------------------
# Aggregation weights (shared by every backend)
# ----------------------------------------------------------------------------------------------


def aggregation_weights(
    mask: torch.Tensor,
    config: PolicyLossConfig,
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """(..., T) mask -> fp32 weights ``w`` of the same shape with ``loss = sum(tok * w)``.

    For callers that hand the fused ops the tokens in another layout than (sequences, T)
    -- only the scored tokens, flattened -- and pass ``weights=aggregation_weights(...)``
    gathered the same way: the seq-mean aggregations need the sequence structure.
    """
    rows = (1, mask.shape[0]) if mask.dim() == 1 else (-1, mask.shape[-1])
    return _weights(mask.reshape(rows).float(), config, num_tokens, num_seqs).reshape(mask.shape)


def _weights(m: torch.Tensor, cfg: PolicyLossConfig, num_tokens, num_seqs) -> torch.Tensor:
    """(S, T) float mask -> (S, T) fp32 weights w with loss = sum(tok * w)."""
    S, T = m.shape
    if cfg.aggregation == "token-mean":
        denom = m.sum().clamp_min(1) if num_tokens is None else num_tokens
        return m / denom
    ns = S if num_seqs is None else num_seqs
    if cfg.aggregation == "seq-mean-token-mean":
        return m / (m.sum(-1, keepdim=True).clamp_min(1) * ns)
    if cfg.aggregation == "seq-mean-token-sum":
        return m / ns
    return m / (ns * float(cfg.norm_length or T))


# ----------------------------------------------------------------------------------------------
# Per-token terms: torch backend
# ----------------------------------------------------------------------------------------------


def _torch_terms(lp, old, adv, ref, ent, m, w, cfg):
    """All inputs flat (N,) fp32 (ref/ent may be None).

    :returns: loss (0-d), d loss/d lp (N,), d loss/d H (N,)|None, stat sums (NSTAT,), count.
    """
    live = m != 0
    zero = torch.zeros((), dtype=torch.float32, device=lp.device)
    logratio = torch.where(live, lp - old, zero)
    ratio = logratio.exp()
    s1 = -adv * ratio
    s2 = -adv * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    clipped = s2 > s1
    pg = torch.maximum(s1, s2)
    dtok = torch.where(clipped, zero, s1)  # d(-A ratio)/d lp = -A ratio
    dual = None
    if cfg.dual_clip is not None:
        cap = adv * -cfg.dual_clip
        dual = (adv < 0) & (pg > cap)
        pg = torch.where(dual, cap, pg)
        dtok = torch.where(dual, zero, dtok)
    tok = pg
    k = None
    if ref is not None:
        d = torch.where(live, lp - ref, zero)
        if cfg.kl_estimator == "k1":
            k, dk = d, torch.ones_like(d)
        elif cfg.kl_estimator == "k2":
            k, dk = 0.5 * d * d, d
        else:
            e = torch.exp(-d)
            k, dk = e + d - 1.0, 1.0 - e
        if cfg.kl_clamp is not None:
            dk = torch.where(k.abs() > cfg.kl_clamp, zero, dk)
            k = k.clamp(-cfg.kl_clamp, cfg.kl_clamp)
        if cfg.kl_coef != 0.0:
            tok = tok + cfg.kl_coef * k
            dtok = dtok + cfg.kl_coef * dk
    dent = None
    if ent is not None and cfg.entropy_coef != 0.0:
        tok = tok - cfg.entropy_coef * ent
        dent = w * -cfg.entropy_coef
    loss = torch.where(live, tok * w, zero).sum()
    dlp = torch.where(live, dtok * w, zero)
    cols = [pg, clipped.float(), ratio - 1.0 - logratio, ratio]
    cols.append(k if k is not None else torch.zeros_like(lp))
    cols.append(ent if ent is not None else torch.zeros_like(lp))
    cols.append(dual.float() if dual is not None else torch.zeros_like(lp))
    stats = torch.where(live, torch.stack(cols), zero) @ m  # (NSTAT,) masked sums
    return loss, dlp, dent, stats


# ----------------------------------------------------------------------------------------------
# Per-token terms: Triton (a device function shared by the elementwise and the fused kernel)
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _token_terms(
        lp, old, adv, ref, ent, m, w,
        clip_lo, clip_hi, dual_c, kl_coef, kl_clamp, ent_coef,
        HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr, ADD_KL: tl.constexpr, KL_EST: tl.constexpr,
        HAS_CLAMP: tl.constexpr, HAS_ENT: tl.constexpr,
    ):  # fmt: skip
        """Scalars or blocks alike. Returns (tok*w, dtok*w, dent, pg, clipped, approx, ratio, k, dual)."""
        live = m != 0.0
        logratio = tl.where(live, lp - old, 0.0)
        ratio = tl.exp(logratio)
        s1 = -adv * ratio
        s2 = -adv * tl.minimum(tl.maximum(ratio, clip_lo), clip_hi)
        clipped = s2 > s1
        pg = tl.maximum(s1, s2)
        dtok = tl.where(clipped, 0.0, s1)
        dual = live & (adv != adv)  # all False, same shape/type as ``live``
        if HAS_DUAL:
            cap = -adv * dual_c
            dual = (adv < 0.0) & (pg > cap)
            pg = tl.where(dual, cap, pg)
            dtok = tl.where(dual, 0.0, dtok)
        tok = pg
        k = 0.0 * lp
        if HAS_REF:
            d = tl.where(live, lp - ref, 0.0)
            if KL_EST == 1:
                k = d
                dk = 1.0 + 0.0 * d
            elif KL_EST == 2:
                k = 0.5 * d * d
                dk = d
            else:
                e = tl.exp(-d)
                k = e + d - 1.0
                dk = 1.0 - e
            if HAS_CLAMP:
                dk = tl.where(tl.abs(k) > kl_clamp, 0.0, dk)
                k = tl.minimum(tl.maximum(k, -kl_clamp), kl_clamp)
            if ADD_KL:
                tok = tok + kl_coef * k
                dtok = dtok + kl_coef * dk
        dent = 0.0 * lp
        if HAS_ENT:
            tok = tok - ent_coef * ent
            dent = -ent_coef * w
        tok_w = tl.where(live, tok * w, 0.0)
        dlp = tl.where(live, dtok * w, 0.0)
        approx = ratio - 1.0 - logratio
        return tok_w, dlp, dent, pg, clipped.to(tl.float32), approx, ratio, k, dual.to(tl.float32)

    @triton.jit
    def _terms_kernel(
        LP, OLD, ADV, REF, ENT, M, W, DLP, DENT, PART, N,
        clip_lo, clip_hi, dual_c, kl_coef, kl_clamp, ent_coef,
        HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr, ADD_KL: tl.constexpr, KL_EST: tl.constexpr,
        HAS_CLAMP: tl.constexpr, HAS_ENT: tl.constexpr, HAS_ENT_IN: tl.constexpr,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Elementwise terms over BLOCK tokens; per-block partial sums into PART[pid, 0:8]."""
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        msk = offs < N
        lp = tl.load(LP + offs, mask=msk, other=0.0).to(tl.float32)
        old = tl.load(OLD + offs, mask=msk, other=0.0).to(tl.float32)
        adv = tl.load(ADV + offs, mask=msk, other=0.0).to(tl.float32)
        m = tl.load(M + offs, mask=msk, other=0.0).to(tl.float32)
        w = tl.load(W + offs, mask=msk, other=0.0).to(tl.float32)
        ref = lp
        if HAS_REF:
            ref = tl.load(REF + offs, mask=msk, other=0.0).to(tl.float32)
        ent = 0.0 * lp
        if HAS_ENT_IN:
            ent = tl.load(ENT + offs, mask=msk, other=0.0).to(tl.float32)
        tok_w, dlp, dent, pg, clipped, approx, ratio, k, dual = _token_terms(
            lp, old, adv, ref, ent, m, w, clip_lo, clip_hi, dual_c, kl_coef, kl_clamp, ent_coef,
            HAS_DUAL, HAS_REF, ADD_KL, KL_EST, HAS_CLAMP, HAS_ENT,
        )  # fmt: skip
        tl.store(DLP + offs, dlp, mask=msk)
        if HAS_ENT:
            tl.store(DENT + offs, dent, mask=msk)
        live = m != 0.0
        mm = tl.where(live, m, 0.0)
        base = PART + pid * 8
        tl.store(base + 0, tl.sum(tok_w, axis=0))
        tl.store(base + 1, tl.sum(tl.where(live, pg, 0.0) * mm, axis=0))
        tl.store(base + 2, tl.sum(clipped * mm, axis=0))
        tl.store(base + 3, tl.sum(tl.where(live, approx, 0.0) * mm, axis=0))
        tl.store(base + 4, tl.sum(tl.where(live, ratio, 0.0) * mm, axis=0))
        tl.store(base + 5, tl.sum(tl.where(live, k, 0.0) * mm, axis=0))
        tl.store(base + 6, tl.sum(tl.where(live, ent, 0.0) * mm, axis=0))
        tl.store(base + 7, tl.sum(dual * mm, axis=0))

    @triton.jit
    def _fused_fwd_kernel(
        X, stride_x, LBL, OLD, ADV, REF, M, W,
        LOGP, LSE, ENTOUT, DLP, DENT, PART,
        V, inv_temp, ignore_index,
        clip_lo, clip_hi, dual_c, kl_coef, kl_clamp, ent_coef,
        HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr, ADD_KL: tl.constexpr, KL_EST: tl.constexpr,
        HAS_CLAMP: tl.constexpr, HAS_ENT: tl.constexpr, NEED_ENT: tl.constexpr,
        BLOCK_V: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        """One program per token: online logsumexp over the vocabulary, then the loss terms."""
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_x
        label = tl.load(LBL + row)
        m = tl.load(M + row).to(tl.float32)
        valid = label != ignore_index
        m = tl.where(valid, m, 0.0)
        n_cols = tl.where(valid, V, 0)
        lse, pz = _row_lse(x_row, V, n_cols, inv_temp, BLOCK_V, NEED_ENT, STAGES)
        safe = tl.where(valid, label, 0)
        z_y = tl.load(x_row + safe).to(tl.float32) * inv_temp
        lp = tl.where(valid, z_y - lse, 0.0)
        ent = tl.where(valid, lse - pz, 0.0)
        tl.store(LOGP + row, lp)
        tl.store(LSE + row, tl.where(valid, lse, 0.0))
        if NEED_ENT:
            tl.store(ENTOUT + row, ent)
        old = tl.load(OLD + row).to(tl.float32)
        adv = tl.load(ADV + row).to(tl.float32)
        w = tl.load(W + row).to(tl.float32)
        ref = lp
        if HAS_REF:
            ref = tl.load(REF + row).to(tl.float32)
        tok_w, dlp, dent, pg, clipped, approx, ratio, k, dual = _token_terms(
            lp, old, adv, ref, ent, m, w, clip_lo, clip_hi, dual_c, kl_coef, kl_clamp, ent_coef,
            HAS_DUAL, HAS_REF, ADD_KL, KL_EST, HAS_CLAMP, HAS_ENT,
        )  # fmt: skip
        tl.store(DLP + row, dlp)
        if HAS_ENT:
            tl.store(DENT + row, dent)
        live = m != 0.0
        base = PART + row * 8
        tl.store(base + 0, tok_w)
        tl.store(base + 1, tl.where(live, pg * m, 0.0))
        tl.store(base + 2, tl.where(live, clipped * m, 0.0))
        tl.store(base + 3, tl.where(live, approx * m, 0.0))
        tl.store(base + 4, tl.where(live, ratio * m, 0.0))
        tl.store(base + 5, tl.where(live, k * m, 0.0))
        tl.store(base + 6, tl.where(live, ent * m, 0.0))
        tl.store(base + 7, tl.where(live, dual * m, 0.0))


def _kernel_cfg_args(cfg: PolicyLossConfig, has_ref: bool, has_ent: bool):
    """(runtime scalars, constexpr flags) of the loss terms for the Triton kernels."""
    scal = (
        1.0 - cfg.clip_low, 1.0 + cfg.clip_high, float(cfg.dual_clip or 0.0), float(cfg.kl_coef),
        float(cfg.kl_clamp or 0.0), float(cfg.entropy_coef),
    )  # fmt: skip
    flags = dict(
        HAS_DUAL=cfg.dual_clip is not None, HAS_REF=has_ref, ADD_KL=has_ref and cfg.kl_coef != 0.0,
        KL_EST=int(cfg.kl_estimator[1]), HAS_CLAMP=cfg.kl_clamp is not None,
        HAS_ENT=has_ent and cfg.entropy_coef != 0.0,
    )  # fmt: skip
    return scal, flags


def _split_part(part: torch.Tensor):
    """(rows, 8) partial sums -> loss (0-d), stat sums (NSTAT,)."""
    tot = part.sum(0)
    return tot[0], tot[1:]


def _triton_terms(lp, old, adv, ref, ent, m, w, cfg):
    N = lp.numel()
    scal, flags = _kernel_cfg_args(cfg, ref is not None, ent is not None)
    BLOCK = 1024
    nblk = max(1, triton.cdiv(N, BLOCK))
    dlp = torch.empty_like(lp)
    dent = torch.empty_like(lp) if flags["HAS_ENT"] else None
    part = torch.empty((nblk, 8), dtype=torch.float32, device=lp.device)
    if N == 0:
        part.zero_()
    else:
        _terms_kernel[(nblk,)](
            lp, old, adv, ref if ref is not None else lp, ent if ent is not None else lp, m, w,
            dlp, dent if dent is not None else dlp, part, N, *scal,
            HAS_ENT_IN=ent is not None, BLOCK=BLOCK, num_warps=4, **flags,
        )  # fmt: skip
    loss, stats = _split_part(part)
    return loss, dlp, dent, stats


def _terms(backend, *args):
    return (_triton_terms if backend == "triton" else _torch_terms)(*args)


# ----------------------------------------------------------------------------------------------
# autograd Functions
# ----------------------------------------------------------------------------------------------


class ClippedPolicyLossFunction(torch.autograd.Function):
    """Flat (N,) logp [, entropy] + constants -> (loss, stat sums). Hand-written backward."""

    @staticmethod
    def forward(ctx, lp, ent, old, adv, ref, m, w, cfg, backend):
        loss, dlp, dent, stats = _terms(backend, lp.float(), old, adv, ref,
                                        ent.float() if ent is not None else None, m, w, cfg)  # fmt: skip
        ctx.save_for_backward(dlp, dent)
        ctx.dtypes = (lp.dtype, ent.dtype if ent is not None else None)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g, _g_stats):
        dlp, dent = ctx.saved_tensors
        d_lp = (dlp * g).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        d_ent = None
        if ctx.needs_input_grad[1]:
            d_ent = (dent * g if dent is not None else torch.zeros_like(dlp)).to(ctx.dtypes[1])
        return d_lp, d_ent, None, None, None, None, None, None, None


def fused_rows_forward(backend, x, labels, old, adv, ref, m, w, lopts, cfg):
    """(N, V) logits -> logp, lse, ent, loss, dlp, dent, stat sums (one pass with Triton)."""
    if backend == "triton":
        return _triton_fused_forward(x, labels, old, adv, ref, m, w, lopts, cfg)
    logp, lse, ent = lp_forward(backend, x, labels, lopts)
    return (logp, lse, ent) + _torch_terms(logp, old, adv, ref, ent, m, w, cfg)


class FusedPolicyLossFunction(torch.autograd.Function):
    """(N, V) logits -> (loss, stat sums, logp): log-prob + loss terms in one pass."""

    @staticmethod
    def forward(ctx, x, labels, old, adv, ref, m, w, lopts, cfg, backend):
        out = fused_rows_forward(backend, x, labels, old, adv, ref, m, w, lopts, cfg)
        logp, lse, ent, loss, dlp, dent, stats = out
        ctx.save_for_backward(x, labels, lse, ent, dlp, dent)
        ctx.lopts, ctx.backend = lopts, backend
        ctx.mark_non_differentiable(stats, logp)
        return loss, stats, logp

    @staticmethod
    def backward(ctx, g, _g_stats, _g_logp):
        x, labels, lse, ent, dlp, dent = ctx.saved_tensors
        out = x if ctx.lopts.inplace_backward else None
        dx = lp_backward(ctx.backend, x, labels, lse, ent, dlp * g,
                         dent * g if dent is not None else None, ctx.lopts, out)  # fmt: skip
        return (dx,) + (None,) * 9


def _triton_fused_forward(x, labels, old, adv, ref, m, w, lopts, cfg):
    N, V = x.shape
    f32 = dict(dtype=torch.float32, device=x.device)
    need_ent = lopts.entropy
    scal, flags = _kernel_cfg_args(cfg, ref is not None, need_ent)
    logp, lse = torch.empty(N, **f32), torch.empty(N, **f32)
    ent = torch.empty(N, **f32) if need_ent else None
    dlp = torch.empty(N, **f32)
    dent = torch.empty(N, **f32) if flags["HAS_ENT"] else None
    part = torch.zeros((max(N, 1), 8), **f32)
    if N:
        block, warps, stages = _launch_cfg(V)
        _fused_fwd_kernel[(N,)](
            x, x.stride(0), labels, old, adv, ref if ref is not None else old, m, w,
            logp, lse, ent if ent is not None else lse, dlp, dent if dent is not None else dlp, part,
            V, 1.0 / lopts.temperature, lopts.ignore_index, *scal,
            NEED_ENT=need_ent, BLOCK_V=block, STAGES=stages, num_warps=warps, **flags,
        )  # fmt: skip
    loss, stats = _split_part(part)
    return logp, lse, ent, loss, dlp, dent, stats


def _linear_loss_with_grads(
    backend, h, wt, b, labels, old, adv, ref, m, w, lopts, cfg, rows, needs, cdt=None
):
    """Forward of the chunked linear loss that also computes d(hidden), d(W), d(b) for g = 1.

    The loss is a scalar, so d loss / d logp is known per chunk in the forward: each chunk's
    logits are turned into d(logits) in place right away and folded into the gradients (three
    matmuls per chunk, like the naive code; no recompute). ``needs`` = which grads to build.
    """
    N = h.shape[0]
    f32 = dict(dtype=torch.float32, device=h.device)
    need_h, need_w, need_b = needs
    dh = torch.empty_like(h) if need_h else None
    w_like, b_like = wt, b  # dW / db in the weight's dtype (fp32 masters)
    dw = db = None
    h, wt, b = _cast(cdt, h, wt, b)  # the matmuls in autocast's dtype, when one was active
    logp = torch.empty(N, **f32)
    loss = torch.zeros((), **f32)
    stats = torch.zeros(_NSTAT, **f32)
    valid = labels != lopts.ignore_index
    grads = need_h or need_w or (need_b and b is not None)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        sl = slice(s, e)
        logits = _chunk_logits(h[sl], wt, b)  # (n, V)
        lp_c, lse_c, ent_c, l_c, dlp_c, dent_c, st_c = fused_rows_forward(
            backend, logits, labels[sl], old[sl], adv[sl], ref[sl] if ref is not None else None,
            m[sl], w[sl], lopts, cfg,
        )  # fmt: skip
        logp[sl] = lp_c
        loss += l_c
        stats += st_c
        if not grads:
            continue
        lp_bwd = _triton_lp_backward if backend == "triton" else _torch_lp_backward
        lp_bwd(logits, labels[sl], valid[sl], lse_c, ent_c, dlp_c, dent_c, lopts, logits)
        if dh is not None:
            if dh.dtype == logits.dtype:
                torch.mm(logits, wt, out=dh[sl])  # (n, H)
            else:
                dh[sl] = logits @ wt
        if need_w:
            dw = fold_dw(dw, logits, h[sl], w_like.dtype)
        if need_b and b is not None:
            db = fold_db(db, logits, b_like.dtype)
    dw, db = head_grads_or_zeros(dw, db, w_like, b_like, needs) if grads else (dw, db)
    return logp, loss, stats, dh, dw, db


class LinearPolicyLossFunction(torch.autograd.Function):
    """(N, H) hidden, (V, H) weight -> (loss, stat sums, logp), logits chunked over tokens.

    Gradients are computed during the forward (see ``_linear_loss_with_grads``) and scaled by
    the upstream gradient in the backward, in place: the backward can run once.
    """

    @staticmethod
    def forward(ctx, h, wt, b, labels, old, adv, ref, m, w, lopts, cfg, backend, rows, grad_on, cdt=None):
        needs = tuple(bool(grad_on and n) for n in ctx.needs_input_grad[:3])
        logp, loss, stats, dh, dw, db = _linear_loss_with_grads(
            backend, h, wt, b, labels, old, adv, ref, m, w, lopts, cfg, rows, needs, cdt
        )
        ctx.save_for_backward(dh, dw, db)
        ctx.done = False
        ctx.mark_non_differentiable(stats, logp)
        return loss, stats, logp

    @staticmethod
    def backward(ctx, g, _g_stats, _g_logp):
        if ctx.done:
            raise RuntimeError(
                "linear_policy_loss: backward through the same call twice is not supported"
            )
        ctx.done = True
        grads = [t.mul_(g.to(t.dtype)) if t is not None else None for t in ctx.saved_tensors]
        return tuple(grads) + (None,) * 12


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------


def _flat_f32(t: torch.Tensor, shape: torch.Size, what: str) -> torch.Tensor:
    try:
        t = torch.broadcast_to(t, shape)
    except RuntimeError:
        raise ValueError(
            f"{what} of shape {tuple(t.shape)} does not broadcast to {tuple(shape)}"
        ) from None
    return t.reshape(-1).float().contiguous()


def _prepare(
    shape, mask, old_logprobs, advantages, ref_logprobs, cfg, num_tokens, num_seqs, device,
    weights=None,
):
    """Flat fp32 constants + aggregation weights for token shape ``shape`` (..., T)."""
    rows = (1, shape[0]) if len(shape) == 1 else (-1, shape[-1])
    if mask is None:
        m2 = torch.ones(shape, dtype=torch.float32, device=device).reshape(rows)
    else:
        m2 = torch.broadcast_to(mask, shape).reshape(rows).float()
    if weights is None:
        w = _weights(m2, cfg, num_tokens, num_seqs).reshape(-1).contiguous()
    else:  # the caller's (aggregation_weights in its own layout); unused where the mask is 0
        w = _flat_f32(weights.detach(), shape, "weights")
    m = m2.reshape(-1).contiguous()
    old = _flat_f32(old_logprobs.detach(), shape, "old_logprobs")
    adv = _flat_f32(advantages.detach(), shape, "advantages")
    ref = (
        _flat_f32(ref_logprobs.detach(), shape, "ref_logprobs")
        if ref_logprobs is not None
        else None
    )
    return m, w, old, adv, ref


def _output(loss, stats, m, has_ent, logp=None, shape=None) -> PolicyLossOutput:
    vals = (stats / m.sum().clamp_min(1)).detach()
    named = dict(zip(_STAT_NAMES, vals.unbind(0), strict=True))
    if not has_ent:
        named["entropy"] = None
    lp = logp.detach().view(shape) if logp is not None else None
    return PolicyLossOutput(loss=loss, logprobs=lp, **named)


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    config: PolicyLossConfig | None = None,
    *,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    backend: str | None = None,
    **options,
) -> PolicyLossOutput:
    """Clipped policy-gradient loss from per-token log-probs (see the module docstring).

    :param logprobs: (..., T) log-probs of the current policy (with grad), e.g. (B, T); a 1-D
        tensor is one sequence for the seq-mean aggregations.
    :param old_logprobs: (..., T) behaviour-policy log-probs (constant).
    :param advantages: broadcastable to (..., T), e.g. (B, T) or per-sequence (B, 1).
    :param mask: (..., T) bool/float, 1 on response tokens (default: all ones).
    :param config: a :class:`PolicyLossConfig`; ``**options`` override its fields
        (``clip_low=0.2, kl_coef=0.05, aggregation="seq-mean-token-mean"``...).
    :param ref_logprobs: (..., T) reference-policy log-probs for the KL term (constant).
    :param entropy: (..., T) per-token entropy (with grad) for the entropy bonus and stat.
    :param num_tokens: masked-token count of the whole mini-batch (token-mean denominator).
    :param num_seqs: sequence count of the whole mini-batch (seq-mean-* denominator).
    :param backend: ``None`` (process default) | ``"auto"`` | ``"triton"`` | ``"torch"``.
    :returns: :class:`PolicyLossOutput` (loss with grad + detached stats).
    """
    if isinstance(mask, PolicyLossConfig):  # op(..., cfg) without a mask
        mask, config = None, mask
    cfg = _make_config(config, options)
    shape = logprobs.shape
    name = resolve_backend(backend, logprobs.device)
    m, w, old, adv, ref = _prepare(shape, mask, old_logprobs, advantages, ref_logprobs, cfg,
                                   num_tokens, num_seqs, logprobs.device)  # fmt: skip
    lp = logprobs.reshape(-1)
    ent = None
    if entropy is not None:
        ent = torch.broadcast_to(entropy, shape).reshape(-1)
    loss, stats = ClippedPolicyLossFunction.apply(lp, ent, old, adv, ref, m, w, cfg, name)
    return _output(loss, stats, m, ent is not None)


def _token_mask(labels, mask, ignore_index):
    valid = labels != ignore_index
    if mask is None:
        return valid
    return torch.broadcast_to(mask, labels.shape).float() * valid


def fused_policy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    config: PolicyLossConfig | None = None,
    *,
    ref_logprobs: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    return_entropy: bool | None = None,
    inplace_backward: bool = False,
    weights: torch.Tensor | None = None,
    backend: str | None = None,
    **options,
) -> PolicyLossOutput:
    """``clipped_policy_loss(token_logprobs(logits, labels), ...)`` in one pass over the logits.

    The forward reads the logits once (log-probs, entropy, ratio, clip, KL and the weighted
    sum per token); the backward writes d(logits) directly. Positions whose label is
    ``ignore_index`` are masked out in addition to ``mask``.

    :param logits: (..., V); :param labels: (...) — e.g. (B, T, V) and (B, T).
    :param return_entropy: compute the entropy (default: only when ``entropy_coef != 0``);
        it then feeds the entropy bonus and the ``entropy`` stat.
    :param weights: per-token aggregation weights in the labels' shape (from
        :func:`aggregation_weights` on the tokens' (sequences, T) layout); when given, they
        replace ``aggregation`` / ``num_tokens`` / ``num_seqs`` (stats still average over
        the mask). For tokens passed as a flat (N,) selection of a batch.
    Other parameters as :func:`token_logprobs` and :func:`clipped_policy_loss`.
    :returns: :class:`PolicyLossOutput` with ``logprobs`` (labels' shape, detached).
    """
    if isinstance(mask, PolicyLossConfig):  # op(..., cfg) without a mask
        mask, config = None, mask
    cfg = _make_config(config, options)
    V = logits.shape[-1]
    _check_labels(labels, logits.shape[:-1], "fused_policy_loss")
    name = resolve_backend(backend, logits.device)
    need_ent = (
        cfg.entropy_coef != 0.0
        if return_entropy is None
        else bool(return_entropy or cfg.entropy_coef)
    )
    lopts = LogprobOptions(float(temperature), int(ignore_index), need_ent, bool(inplace_backward))
    shape = labels.shape
    m, w, old, adv, ref = _prepare(shape, _token_mask(labels, mask, ignore_index), old_logprobs, advantages,
                                   ref_logprobs, cfg, num_tokens, num_seqs, logits.device, weights)  # fmt: skip
    x = _prep_rows(logits.reshape(-1, V))
    loss, stats, logp = FusedPolicyLossFunction.apply(
        x, labels.reshape(-1), old, adv, ref, m, w, lopts, cfg, name
    )
    return _output(loss, stats, m, need_ent, logp, shape)


def linear_policy_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    config: PolicyLossConfig | None = None,
    *,
    bias: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | torch.Tensor | None = None,
    return_entropy: bool | None = None,
    chunk_size: int | None = None,
    weights: torch.Tensor | None = None,
    backend: str | None = None,
    **options,
) -> PolicyLossOutput:
    """``fused_policy_loss(hidden @ lm_head_weight.T + bias, labels, ...)`` without the logits.

    Tokens are processed in chunks (``chunk_size`` rows; default a few tens of MiB of logits);
    the backward recomputes each chunk's logits and folds d(logits) into d(hidden), d(W), d(b).

    :param hidden: (..., H); :param lm_head_weight: (V, H); :param bias: (V,) or None.
    Other parameters as :func:`fused_policy_loss`.
    """
    if isinstance(mask, PolicyLossConfig):  # op(..., cfg) without a mask
        mask, config = None, mask
    cfg = _make_config(config, options)
    H = hidden.shape[-1]
    _check_labels(labels, hidden.shape[:-1], "linear_policy_loss")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != H:
        raise ValueError(f"lm_head_weight must be (V, {H}), got {tuple(lm_head_weight.shape)}")
    name = resolve_backend(backend, hidden.device)
    need_ent = (
        cfg.entropy_coef != 0.0
        if return_entropy is None
        else bool(return_entropy or cfg.entropy_coef)
    )
    lopts = LogprobOptions(float(temperature), int(ignore_index), need_ent, False)
    shape = labels.shape
    m, w, old, adv, ref = _prepare(shape, _token_mask(labels, mask, ignore_index), old_logprobs, advantages,
                                   ref_logprobs, cfg, num_tokens, num_seqs, hidden.device, weights)  # fmt: skip
    h = hidden.reshape(-1, H)
    rows = linear_chunk_rows(h.shape[0], lm_head_weight.shape[0], h.device, chunk_size)
    dev = h.device.type
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    with torch.autocast(dev, enabled=False):  # the Function casts explicitly (cdt); grads stay in fp32 masters
        loss, stats, logp = LinearPolicyLossFunction.apply(
            h,
            lm_head_weight,
            bias,
            labels.reshape(-1),
            old,
            adv,
            ref,
            m,
            w,
            lopts,
            cfg,
            name,
            rows,
            torch.is_grad_enabled(),
            cdt,
        )
    return _output(loss, stats, m, need_ent, logp, shape)


def fused_policy_loss_reference(logits, labels, old_logprobs, advantages, mask=None, config=None, *,
                                temperature=1.0, ignore_index=-100, **kwargs):  # fmt: skip
    """Unfused composition: reference log-probs (+ entropy) then the reference loss."""
    cfg = _make_config(
        config, {k: v for k, v in kwargs.items() if k in {f.name for f in fields(PolicyLossConfig)}}
    )
    rest = {k: v for k, v in kwargs.items() if k not in {f.name for f in fields(PolicyLossConfig)}}
    lp, ent = token_logprobs_reference(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                       return_entropy=True)  # fmt: skip
    m = _token_mask(labels, mask, ignore_index)
    return clipped_policy_loss_reference(lp, old_logprobs, advantages, m, cfg,
                                         entropy=ent if cfg.entropy_coef else None, **rest)  # fmt: skip
