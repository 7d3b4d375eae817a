"""CPU benchmark of the log-prob kernels (torch backend) against the naive torch code.

Run from the repository root (prints a markdown table; not a test)::

    python tests/benchmarks/bench_kernels_cpu.py            # the issue's sizes (several minutes)
    python tests/benchmarks/bench_kernels_cpu.py --quick    # small sizes, seconds

Every (case, implementation) runs in a fresh subprocess so that the peak resident memory is
its own: inputs are built, the kernel's high-water mark (``VmHWM``) is reset through
``/proc/self/clear_refs``, one forward + backward runs, and "extra memory" is the peak above
the inputs. Times come from one more process per case that runs the implementations
interleaved (A B A B ...) for ``--reps`` rounds after a warm-up round and takes the medians,
so load drift on a shared machine hits every implementation alike.

* from logits: ``token_logprobs(logits, labels)`` vs ``log_softmax(logits.float()).gather``
  (gradient w.r.t. the logits; ``inplace`` = ``inplace_backward=True``);
* from hidden states: ``linear_token_logprobs(hidden, W, labels)`` vs
  ``log_softmax(hidden @ W.T).gather`` (gradients w.r.t. hidden and W — both sides hold dW).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _shim() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kernels_shim import ensure_kernels_importable

    ensure_kernels_importable("bench")


def _mem_mib() -> tuple[float, float]:
    s = Path("/proc/self/status").read_text()
    rss, hwm = (int(re.search(k + r":\s+(\d+)", s).group(1)) / 1024 for k in ("VmRSS", "VmHWM"))
    return rss, hwm


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _build(case: dict, torch):
    """(make_inputs, step) for one case; ``step(inputs)`` runs forward + backward."""
    from rlfuse.kernels import linear_token_logprobs, token_logprobs

    torch.manual_seed(0)
    N, V, H = case["N"], case["V"], case.get("H", 0)
    dtype = getattr(torch, case["dtype"])
    labels = torch.randint(0, V, (N,))

    if case["kind"] == "logits":

        def make():
            return (torch.randn(N, V) * 2).to(dtype).requires_grad_()

        def step(x, impl):
            if impl == "naive":
                lp = torch.log_softmax(x.float(), -1).gather(-1, labels[:, None]).squeeze(-1)
            else:
                lp = token_logprobs(x, labels, inplace_backward=impl == "inplace", backend="torch")
            return torch.autograd.grad(lp.sum(), x)

        return make, step

    h0 = torch.randn(N, H).to(dtype)
    w0 = (torch.randn(V, H) / H**0.5).to(dtype)

    def make_h():
        return h0.requires_grad_(), w0.requires_grad_()

    def step_h(inputs, impl):
        h, w = inputs
        if impl == "naive":
            logits = h @ w.t()
            lp = torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None]).squeeze(-1)
        else:
            lp = linear_token_logprobs(h, w, labels, backend="torch")
        return torch.autograd.grad(lp.sum(), (h, w))

    return make_h, step_h


def run_case(case: dict) -> dict:
    """In a child process: peak memory of one forward + backward of ``case["impl"]``."""
    _shim()
    import torch

    torch.set_num_threads(case["threads"])
    make, step = _build(case, torch)
    inputs = make()
    base, _ = _mem_mib()
    _reset_peak()
    t0 = time.perf_counter()
    grads = step(inputs, case["impl"])
    first = time.perf_counter() - t0
    _, peak = _mem_mib()
    del grads
    return dict(case, extra_mib=peak - base, first_s=first)


def time_case(case: dict) -> dict:
    """In a child process: median fwd+bwd time of each impl, runs interleaved (A B A B ...)
    so that load drift on a shared machine hits every implementation alike."""
    _shim()
    import torch

    torch.set_num_threads(case["threads"])
    make, step = _build(case, torch)
    times: dict[str, list[float]] = {impl: [] for impl in case["impls"]}
    for _ in range(case["reps"] + 1):  # the first round warms up and is dropped
        for impl in case["impls"]:
            inputs = make()
            t0 = time.perf_counter()
            grads = step(inputs, impl)
            times[impl].append(time.perf_counter() - t0)
            del grads, inputs
    return {impl: statistics.median(ts[1:]) for impl, ts in times.items()}


def _spawn(case: dict, mode: str = "--child") -> dict:
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, __file__, mode, json.dumps(case)],
        capture_output=True, text=True, env=env, timeout=3600,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict], logits_mib) -> str:
    out = [
        "| input | tokens x vocab (x hidden) | dtype | impl | logits MiB | extra MiB | extra / naive "
        "| fwd+bwd s | time / naive |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    naive = {(r["kind"], r["N"], r["V"], r["dtype"]): r for r in rows if r["impl"] == "naive"}
    for r in rows:
        n = naive.get((r["kind"], r["N"], r["V"], r["dtype"]))
        shape = f"{r['N']} x {r['V']}" + (f" (x {r['H']})" if r["kind"] == "hidden" else "")
        rel_m = f"{r['extra_mib'] / n['extra_mib']:.2f}" if n else "-"
        rel_t = f"{r['time_s'] / n['time_s']:.2f}" if n else "-"
        out.append(
            f"| {r['kind']} | {shape} | {r['dtype']} | {r['impl']} | {logits_mib(r):.0f} "
            f"| {r['extra_mib']:.0f} | {rel_m} | {r['time_s']:.3f} | {rel_t} |"
        )
    return "\n".join(out)


def _small_overhead(threads: int) -> str:
    """Per-call cost at the tiny-model size the framework uses every step (B, T, V) = (64, 16, 100)."""
    _shim()
    import torch

    from rlfuse.kernels import clipped_policy_loss, token_logprobs

    torch.set_num_threads(threads)
    x = torch.randn(64, 16, 100, requires_grad=True)
    y = torch.randint(0, 100, (64, 16))
    old, adv, mask = torch.randn(64, 16) - 4, torch.randn(64, 16), torch.rand(64, 16) > 0.2

    def naive():
        lp = torch.log_softmax(x, -1).gather(-1, y[..., None]).squeeze(-1)
        torch.autograd.grad(lp.sum(), x)

    def ours():
        torch.autograd.grad(token_logprobs(x, y, backend="torch").sum(), x)

    def loss():
        lp = token_logprobs(x, y, backend="torch")
        torch.autograd.grad(clipped_policy_loss(lp, old, adv, mask, backend="torch").loss, x)

    res = []
    for name, f in (
        ("naive log_softmax+gather", naive),
        ("token_logprobs", ours),
        ("token_logprobs + clipped_policy_loss", loss),
    ):
        for _ in range(20):
            f()
        t0 = time.perf_counter()
        for _ in range(200):
            f()
        res.append(f"| {name} | {(time.perf_counter() - t0) / 200 * 1e6:.0f} |")
    return "| (64, 16, 100) fwd+bwd | µs / call |\n|---|---:|\n" + "\n".join(res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--time-child", help=argparse.SUPPRESS)
    ap.add_argument("--only", choices=["logits", "hidden"], help="run one half of the table")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, nargs="*", default=[32_768, 131_072])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))))
        return
    if args.time_child:
        print(json.dumps(time_case(json.loads(args.time_child))))
        return
    if args.quick:
        args.tokens, args.vocab, args.hidden = 512, [4096, 16_384], 256
    base = dict(N=args.tokens, reps=args.reps, threads=args.threads)
    groups = []  # (case without impl, impls)
    if args.only in (None, "logits"):
        for V in args.vocab:
            groups.append(
                (dict(base, kind="logits", V=V, dtype="float32"), ["naive", "ours", "inplace"])
            )
        groups.append(
            (dict(base, kind="logits", V=args.vocab[0], dtype="bfloat16"), ["naive", "ours"])
        )
    if args.only in (None, "hidden"):
        for V in args.vocab:
            groups.append(
                (dict(base, kind="hidden", V=V, H=args.hidden, dtype="float32"), ["naive", "ours"])
            )
    rows = []
    for case, impls in groups:
        mem = {impl: _spawn(dict(case, impl=impl)) for impl in impls}
        times = _spawn(dict(case, impls=impls), "--time-child")
        for impl in impls:
            r = dict(mem[impl], time_s=times[impl])
            print(f"  {case['kind']:6s} {case['N']}x{case['V']} {case['dtype']:8s} {impl:8s} "
                  f"extra {r['extra_mib']:8.0f} MiB  {r['time_s']:.3f} s", file=sys.stderr, flush=True)  # fmt: skip
            rows.append(r)
    import torch

    def logits_mib(r):
        size = torch.finfo(getattr(torch, r["dtype"])).bits // 8
        return r["N"] * r["V"] * size / 2**20

    print(f"\nCPU: {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads\n")
    print(_table(rows, logits_mib))
    print()
    print(_small_overhead(args.threads))


if __name__ == "__main__":
    main()
