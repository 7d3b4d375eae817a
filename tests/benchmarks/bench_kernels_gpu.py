"""GPU check + benchmark of the rlfuse Triton kernels (one run on a lent H100/H200).

Run from the repository root, no install needed (the script builds a small import shim)::

    python3 tests/benchmarks/bench_kernels_gpu.py            # ~2-3 minutes on an H200

It prints markdown and, if ``$OUT`` is set, writes it to ``$OUT/gpu_kernels.md`` (updated
after every section, so a timeout still leaves the finished parts). Sections:

1. correctness of the Triton kernels against the torch reference on the GPU, fp32 and bf16
   (log-probs, entropy, every gradient, clipped / fused / chunked-linear loss);
2. a small launch-config sweep (vocabulary tile x warps) of the forward and backward kernels;
3. achieved bandwidth of the log-prob (+ entropy) forward as a fraction of HBM peak;
4. forward + backward time and peak memory from logits: naive torch, torch.compile, ours;
5. peak memory and time of the chunked-linear policy loss against naive (matmul + log_softmax
   + gather + clipped loss) at a vocabulary of 151,936.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _shim() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kernels_shim import ensure_kernels_importable

    ensure_kernels_importable("gpu")


_shim()

import torch  # noqa: E402

import rlfuse.kernels.logprobs as lpm  # noqa: E402
from rlfuse.kernels import (  # noqa: E402
    PolicyLossConfig,
    clipped_policy_loss,
    fused_policy_loss,
    linear_policy_loss,
    linear_token_logprobs,
    token_logprobs,
)
from rlfuse.kernels.logprobs import (  # noqa: E402
    linear_token_logprobs_reference,
    token_logprobs_reference,
)
from rlfuse.kernels.policy_loss import (  # noqa: E402
    AGGREGATIONS,
    KL_ESTIMATORS,
    clipped_policy_loss_reference,
    fused_policy_loss_reference,
)

HBM_PEAK_GBS = {  # vendor peak HBM bandwidth, GB/s
    "H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 NVL": 3900, "H100 PCIe": 2000,
    "H100": 3350, "A100-SXM4-80GB": 2039, "A100": 1555, "L40S": 864,
}  # fmt: skip

LINES: list[str] = []
FAILURES: list[str] = []


def emit(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_kernels.md").write_text("\n".join(LINES) + "\n")


def bench_ms(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median wall time (ms) of ``fn`` on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def peak_extra_mib(fn) -> float:
    """Peak allocated memory above what was allocated before ``fn`` (MiB); results freed after."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    res = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del res
    return peak / 2**20


# ---- 1. correctness -----------------------------------------------------------------------------


def _err(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() if a.numel() else 0.0


def check(name: str, pairs, tol: float) -> None:
    errs = [_err(a, b) for a, b in pairs]
    worst = max(errs) if errs else 0.0
    ok = worst <= tol and all(torch.isfinite(a.float()).all().item() for a, _ in pairs)
    if not ok:
        FAILURES.append(name)
    emit(f"| {name} | {worst:.2e} | {tol:.0e} | {'PASS' if ok else '**FAIL**'} |")


def correctness(dev, small: bool = False) -> None:
    emit("## 1. Correctness of the Triton kernels vs the torch reference (max error / max |ref|)")
    emit()
    emit("| check | rel. error | tol | |")
    emit("|---|---:|---:|---|")
    torch.manual_seed(0)
    big = 1_999 if small else 151_936  # small: CPU smoke run under TRITON_INTERPRET=1
    mid = 1_001 if small else 50_257
    for dtype, tol_out, tol_g in ((torch.float32, 1e-4, 1e-4), (torch.bfloat16, 1e-4, 2e-2)):
        dn = str(dtype).split(".")[-1]
        for shape, V in (((4, 7), 1003), ((6,), big), ((2, 3), 32_000 if not small else 777)):
            for temp in (1.0, 0.7):
                x = (torch.randn(*shape, V, device=dev) * 3).to(dtype).requires_grad_()
                y = torch.randint(0, V, shape, device=dev)
                y.view(-1)[1] = -100
                lp, ent = token_logprobs(
                    x, y, temperature=temp, return_entropy=True, backend="triton"
                )
                rlp, rent = token_logprobs_reference(x, y, temperature=temp, return_entropy=True)
                g1, g2 = torch.randn_like(lp), torch.randn_like(lp)
                gx = torch.autograd.grad((lp * g1 + ent * g2).sum(), x)[0]
                rgx = torch.autograd.grad((rlp * g1 + rent * g2).sum(), x)[0]
                tag = f"token_logprobs {dn} {shape}x{V} T={temp}"
                check(tag + " logp, entropy", [(lp, rlp), (ent, rent)], tol_out)
                check(tag + " d logits", [(gx, rgx)], tol_g)
        # in-place backward + linear variants
        h = torch.randn(64, 512, device=dev, dtype=dtype, requires_grad=True)
        w = (torch.randn(mid, 512, device=dev) * 0.05).to(dtype).requires_grad_()
        b = (torch.randn(mid, device=dev) * 0.1).to(dtype).requires_grad_()
        y = torch.randint(0, mid, (64,), device=dev)
        lp = token_logprobs(h @ w.t(), y, inplace_backward=True, backend="triton")
        rlp = token_logprobs_reference(h @ w.t(), y)
        g = torch.autograd.grad(lp.sum(), (h, w))
        rg = torch.autograd.grad(rlp.sum(), (h, w))
        check(f"token_logprobs inplace_backward {dn} dh, dW", list(zip(g, rg, strict=True)), tol_g)
        lp, ent = linear_token_logprobs(
            h, w, y, bias=b, return_entropy=True, chunk_size=24, backend="triton"
        )
        rlp, rent = linear_token_logprobs_reference(h, w, y, bias=b, return_entropy=True)
        g = torch.autograd.grad(lp.sum() + 0.1 * ent.sum(), (h, w, b))
        rg = torch.autograd.grad(rlp.sum() + 0.1 * rent.sum(), (h, w, b))
        lin_tol = 1e-4 if dtype == torch.float32 else 5e-2
        check(f"linear_token_logprobs {dn} logp, entropy", [(lp, rlp), (ent, rent)], lin_tol)
        check(f"linear_token_logprobs {dn} dh, dW, db", list(zip(g, rg, strict=True)), lin_tol)
        # fused and linear policy loss
        B, T, V = 4, 33, big
        x = torch.randn(B, T, V, device=dev).to(dtype).requires_grad_()
        yy = torch.randint(0, V, (B, T), device=dev)
        yy[0, :3] = -100
        old = -torch.rand(B, T, device=dev) * 2 - 11.0
        adv = torch.randn(B, 1, device=dev)
        ref = old + 0.2 * torch.randn(B, T, device=dev)
        mask = torch.rand(B, T, device=dev) > 0.2
        cfg = PolicyLossConfig(
            kl_coef=0.05, entropy_coef=0.01, dual_clip=3.0, aggregation="seq-mean-token-mean"
        )
        out = fused_policy_loss(x, yy, old, adv, mask, cfg, ref_logprobs=ref, backend="triton")
        rl, _ = fused_policy_loss_reference(x, yy, old, adv, mask, cfg, ref_logprobs=ref)
        g = torch.autograd.grad(out.loss, x)[0]
        rg = torch.autograd.grad(rl, x)[0]
        check(f"fused_policy_loss {dn} loss, d logits", [(out.loss, rl), (g, rg)], tol_g)
        hh = torch.randn(B, T, 512, device=dev, dtype=dtype, requires_grad=True)
        ww = (torch.randn(V, 512, device=dev) * 0.05).to(dtype).requires_grad_()
        out = linear_policy_loss(
            hh, ww, yy, old, adv, mask, cfg, ref_logprobs=ref, chunk_size=40, backend="triton"
        )
        rl, _ = fused_policy_loss_reference(hh @ ww.t(), yy, old, adv, mask, cfg, ref_logprobs=ref)
        g = torch.autograd.grad(out.loss, (hh, ww))
        rg = torch.autograd.grad(rl, (hh, ww))
        check(
            f"linear_policy_loss {dn} loss, dh, dW",
            [(out.loss, rl)] + list(zip(g, rg, strict=True)),
            lin_tol,
        )
    for agg in AGGREGATIONS:
        for est in KL_ESTIMATORS:
            lp = (torch.randn(8, 50, device=dev) * 0.3 - 2).requires_grad_()
            old = lp.detach() + torch.randn_like(lp) * 0.3
            adv, ref = torch.randn_like(lp), lp.detach() + torch.randn_like(lp) * 0.5
            ent = torch.rand_like(lp).requires_grad_()
            mask = torch.rand_like(lp) > 0.3
            cfg = PolicyLossConfig(dual_clip=3.0, kl_coef=0.1, kl_estimator=est, kl_clamp=1.0,
                                   entropy_coef=0.01, aggregation=agg)  # fmt: skip
            out = clipped_policy_loss(
                lp, old, adv, mask, cfg, ref_logprobs=ref, entropy=ent, backend="triton"
            )
            rl, st = clipped_policy_loss_reference(
                lp, old, adv, mask, cfg, ref_logprobs=ref, entropy=ent
            )
            g = torch.autograd.grad(out.loss, (lp, ent))
            rg = torch.autograd.grad(rl, (lp, ent))
            pairs = [(out.loss, rl), (out.clipfrac, st["clipfrac"]), (out.kl, st["kl"])]
            check(f"clipped_policy_loss {agg} {est}", pairs + list(zip(g, rg, strict=True)), 1e-5)
    emit()
    emit(f"**correctness: {'all PASS' if not FAILURES else 'FAILED: ' + ', '.join(FAILURES)}**")
    emit()


# ---- 2/3. launch sweep + bandwidth ---------------------------------------------------------------


def bandwidth(dev, N: int, V: int, peak_gbs: float | None) -> None:
    emit(f"## 2. Launch-config sweep ({N} x {V}; one program per row)")
    emit()
    emit("forward: bf16 with entropy and fp32 log-prob only; backward: bf16, in place")
    emit()
    emit("| kernel | BLOCK_V | warps | loop stages | ms (bf16) | ms (fp32) | GB/s (bf16) |")
    emit("|---|---:|---:|---:|---:|---:|---:|")
    x = torch.randn(N, V, device=dev, dtype=torch.bfloat16)
    x32 = x.float()
    y = torch.randint(0, V, (N,), device=dev)
    nbytes = x.numel() * x.element_size()
    fwd_cfgs = [(b, w, st) for b, w in ((512, 4), (1024, 4), (2048, 4), (2048, 8)) for st in (1, 3)]
    bwd_cfgs = [(4096, 8, 1), (4096, 16, 1), (8192, 16, 1), (8192, 32, 1), (8192, 16, 3)]
    best = {}
    run_bwd = None
    for kind, cfgs in (("fwd", fwd_cfgs), ("bwd", bwd_cfgs)):
        if kind == "bwd":
            del x32
            opts = lpm.LogprobOptions(1.0, -100, False, True)
            _, lse, _ = lpm.lp_forward("triton", x, y, opts)
            xc, ones = x.clone(), torch.ones(N, device=dev)

            def run_bwd(xc=xc, lse=lse, g=ones, opts=opts):
                return lpm.lp_backward("triton", xc, y, lse, None, g, None, opts, out=xc)

        for cfg in cfgs:
            lpm.LAUNCH_OVERRIDE[kind] = cfg
            try:
                if kind == "fwd":
                    ms = bench_ms(
                        lambda: token_logprobs(x, y, return_entropy=True, backend="triton"), 6
                    )
                    ms32 = bench_ms(lambda: token_logprobs(x32, y, backend="triton"), 6)
                    score, gbs = ms + ms32, nbytes / ms / 1e6
                else:
                    ms = bench_ms(run_bwd)
                    ms32, score, gbs = float("nan"), ms, 2 * nbytes / ms / 1e6
            except Exception as exc:  # a config that does not compile on this GPU
                emit(
                    f"| {kind} | {cfg[0]} | {cfg[1]} | {cfg[2]} | failed: {type(exc).__name__} | | |"
                )
                continue
            emit(f"| {kind} | {cfg[0]} | {cfg[1]} | {cfg[2]} | {ms:.3f} | {ms32:.3f} | {gbs:.0f} |")
            if kind not in best or score < best[kind][1]:
                best[kind] = (cfg, score)
        if kind in best:
            lpm.LAUNCH_OVERRIDE[kind] = best[kind][0]
        else:
            lpm.LAUNCH_OVERRIDE.pop(kind, None)
    del xc
    emit()
    emit(
        f"best: forward {best.get('fwd', ('-',))[0]}, backward {best.get('bwd', ('-',))[0]} (used below)"
    )
    emit()

    emit(f"## 3. Forward bandwidth ({N} tokens x {V} vocab); HBM peak {peak_gbs or 'unknown'} GB/s")
    emit()
    emit("| op | dtype | ms | GB/s | % of HBM peak |")
    emit("|---|---|---:|---:|---:|")
    copy_ms = bench_ms(lambda: x.clone())
    copy_gbs = 2 * nbytes / copy_ms / 1e6
    for dtype in (torch.bfloat16, torch.float32):
        xx = x.to(dtype)
        nb = xx.numel() * xx.element_size()
        for ent in (False, True):
            ms = bench_ms(
                lambda xx=xx, ent=ent: token_logprobs(xx, y, return_entropy=ent, backend="triton")
            )
            gbs = nb / ms / 1e6
            pct = f"{100 * gbs / peak_gbs:.0f}%" if peak_gbs else "-"
            name = "token_logprobs" + (" + entropy" if ent else "")
            emit(f"| {name} | {str(dtype).split('.')[-1]} | {ms:.3f} | {gbs:.0f} | {pct} |")
        del xx
    pct = f"{100 * copy_gbs / peak_gbs:.0f}%" if peak_gbs else "-"
    emit(
        f"| (reference: torch clone, read + write) | bf16 | {copy_ms:.3f} | {copy_gbs:.0f} | {pct} |"
    )
    emit()


# ---- 4. fwd + bwd from logits vs naive / torch.compile ------------------------------------------------


def from_logits(dev, N: int, V: int, with_compile: bool) -> None:
    emit(f"## 4. Forward + backward from logits ({N} x {V}, bf16 logits, fp32 log-probs)")
    emit()
    emit("| implementation | fwd+bwd ms | x naive | peak extra MiB | x naive |")
    emit("|---|---:|---:|---:|---:|")
    x = torch.randn(N, V, device=dev, dtype=torch.bfloat16).requires_grad_()
    y = torch.randint(0, V, (N,), device=dev)

    def naive_fwd(x):
        return torch.log_softmax(x.float(), -1).gather(-1, y[:, None]).squeeze(-1)

    impls = [
        ("naive torch (log_softmax + gather)", lambda: torch.autograd.grad(naive_fwd(x).sum(), x))
    ]
    if with_compile:
        compiled = torch.compile(naive_fwd)
        impls.append(("torch.compile(naive)", lambda: torch.autograd.grad(compiled(x).sum(), x)))
    impls.append(("rlfuse token_logprobs (triton)",
                  lambda: torch.autograd.grad(token_logprobs(x, y, backend="triton").sum(), x)))  # fmt: skip
    xi = x.detach().clone()

    def inplace():
        xi.requires_grad_()
        lp = token_logprobs(xi, y, inplace_backward=True, backend="triton")
        g = torch.autograd.grad(lp.sum(), xi)
        xi.requires_grad_(False)
        return g

    impls.append(("rlfuse token_logprobs, inplace_backward", inplace))
    base = None
    for name, fn in impls:
        try:
            t0 = time.perf_counter()
            fn()
            first = time.perf_counter() - t0
            ms = bench_ms(fn, reps=5, warmup=1)
            mib = peak_extra_mib(fn)
        except Exception as exc:
            emit(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:80]} | | | |")
            continue
        base = base or (ms, mib)
        note = f" (first call {first:.1f} s)" if "compile" in name else ""
        emit(f"| {name}{note} | {ms:.2f} | {ms / base[0]:.2f} | {mib:.0f} | {mib / base[1]:.2f} |")
    emit()
    emit(f"(logits: {x.numel() * 2 / 2**20:.0f} MiB bf16; its gradient is the same size)")
    emit()


# ---- 5. chunked-linear loss vs naive --------------------------------------------------------------


def linear_loss(dev, N: int, H: int, V: int) -> None:
    emit(f"## 5. Policy loss from hidden states ({N} tokens, hidden {H}, vocab {V}, bf16)")
    emit()
    emit("| implementation | fwd+bwd ms | x naive | peak extra MiB | x naive |")
    emit("|---|---:|---:|---:|---:|")
    h = (torch.randn(N, H, device=dev) * 0.5).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(V, H, device=dev) / H**0.5).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, V, (N,), device=dev)
    old = -torch.rand(N, device=dev) * 2 - 11
    adv = torch.randn(N, device=dev)
    mask = torch.rand(N, device=dev) > 0.1
    cfg = PolicyLossConfig()

    def naive():
        logits = h @ w.t()
        lp = torch.log_softmax(logits.float(), -1).gather(-1, y[:, None]).squeeze(-1)
        loss, _ = clipped_policy_loss_reference(lp, old, adv, mask, cfg)
        return torch.autograd.grad(loss, (h, w))

    def ours():
        out = linear_policy_loss(h, w, y, old, adv, mask, cfg, backend="triton")
        return torch.autograd.grad(out.loss, (h, w))

    def ours_lp():
        lp = linear_token_logprobs(h, w, y, backend="triton")
        return torch.autograd.grad((lp * mask).sum(), (h, w))

    base = None
    for name, fn in (("naive (matmul + log_softmax + gather + loss)", naive),
                     ("rlfuse linear_policy_loss (chunked)", ours),
                     ("rlfuse linear_token_logprobs (chunked)", ours_lp)):  # fmt: skip
        try:
            ms = bench_ms(fn, reps=5, warmup=1)
            mib = peak_extra_mib(fn)
        except Exception as exc:
            emit(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:80]} | | | |")
            continue
        base = base or (ms, mib)
        emit(f"| {name} | {ms:.2f} | {ms / base[0]:.2f} | {mib:.0f} | {mib / base[1]:.2f} |")
    emit()
    emit(
        f"(peak extra includes dW {V * H * 2 / 2**20:.0f} MiB and dh, which every implementation holds)"
    )
    emit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--only-correctness", action="store_true")
    ap.add_argument(
        "--cpu-smoke", action="store_true", help=argparse.SUPPRESS
    )  # TRITON_INTERPRET=1
    args = ap.parse_args()
    if args.cpu_smoke:
        correctness(torch.device("cpu"), small=True)
        sys.exit(1 if FAILURES else 0)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels_gpu.py needs a CUDA device")
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in HBM_PEAK_GBS.items() if k in name), None)
    import triton

    t0 = time.time()
    emit(f"# rlfuse.kernels on {name}")
    emit()
    emit(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}")
    emit()
    correctness(dev)
    emit(f"(correctness done in {time.time() - t0:.0f} s)")
    emit()
    if args.only_correctness:
        sys.exit(1 if FAILURES else 0)
    bandwidth(dev, args.tokens, args.vocab, peak)
    from_logits(dev, args.tokens, args.vocab, not args.no_compile)
    linear_loss(dev, args.tokens, args.hidden, args.vocab)
    emit(f"total {time.time() - t0:.0f} s")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
