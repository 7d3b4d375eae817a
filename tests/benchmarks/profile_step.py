"""Where a real-model rlfuse step's time goes (cProfile of one step after warm-up).

    python tests/benchmarks/profile_step.py [--algo grpo] [--model DIR] [--warmup 1] [--steps 1] [--set KEY=VALUE ...]

The workload is bench_vs_trl.py's real-model one (``REAL``). Prints the cumulative CPU-side
time of the parts of a step (generation, the training forward, backward, reference,
optimiser...) as shares of the profiled steps. cProfile inflates Python-heavy parts a little;
the model work (torch ops) is timed as it runs.

``--memory`` also records every tensor allocation of the profiled steps (torch profiler,
``profile_memory``) and prints the peak of the bytes in use above the step's start, the ops
running at that moment (innermost first) and the ops that allocated the most up to it: where a
step's peak memory is, and what is alive then.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (label, file suffix, function name): cumulative time of the first match
PARTS = [
    ("generation (rlfuse's decode loop or HF generate)", "_sampling.py", "sample"),
    ("  of which: shared-prompt prefill", "_sampling.py", "shared_prompt_cache"),
    ("rollout old-log-prob / value forward (no grad)", "generate.py", "old_policy_forward"),
    ("reference forward (no grad)", "trainer.py", "ref_logprobs"),
    ("DPO reference (per pair, cached)", "dpo.py", "_ref"),
    ("training forward (models.forward)", "models.py", "_forward_scored"),
    ("  of which: lm_head + log-softmax (kernel)", "logprobs.py", "linear_token_logprobs"),
    ("  of which: prefix layout (packing)", "packing.py", "plan_shared_prefixes"),
    ("backward", "_tensor.py", "backward"),
    ("optimiser step", "adam.py", "step"),
    ("optimiser step", "adamw.py", "step"),
    ("grad clipping", "fsdp.py", "clip_grad_norm_"),
    ("loss plugins (all, incl. their forward)", "trainer.py", "_collect_losses"),
    ("rewards", "trainer.py", "_apply_rewards"),
]


def memory_report(tp, top: int = 12) -> None:
    """The step-relative peak of allocated bytes in a torch-profiler trace and what made it."""
    mem, ops = [], []
    for e in tp.profiler.kineto_results.events():
        if e.name() == "[memory]":
            mem.append((e.start_ns(), e.nbytes()))
        else:
            ops.append((e.start_ns(), e.start_ns() + e.duration_ns(), e.name()))
    mem.sort()
    ops.sort()
    cur = peak = 0
    at = None
    for t, b in mem:
        cur += b
        if cur > peak:
            peak, at = cur, t
    if at is None:
        print("no allocations recorded")
        return
    starts = [o[0] for o in ops]

    def innermost(t):
        best = None
        for o in reversed(ops[max(0, bisect.bisect_right(starts, t) - 400) : bisect.bisect_right(starts, t)]):
            if o[0] <= t <= o[1] and (best is None or o[1] - o[0] < best[1] - best[0]):
                best = o
        return best[2] if best else "?"

    around = sorted((o for o in ops if o[0] <= at <= o[1]), key=lambda o: o[1] - o[0])
    print(f"peak of allocated memory above the step's start: {peak / 2**20:.0f} MiB; net at the end "
          f"{cur / 2**20:.0f} MiB")
    print("ops at the peak (innermost first): " + " < ".join(o[2] for o in around[:6]))
    by = collections.Counter()
    for t, b in mem:
        if t > at:
            break
        by[innermost(t)] += b
    print("| op | net MiB allocated up to the peak |")
    print("|---|---|")
    for name, b in by.most_common(top):
        print(f"| {name} | {b / 2**20:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algo", default="grpo")
    ap.add_argument("--model", default=None, help="default: bench_vs_trl.py's SmolLM2 folder")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="fp32", help="trainer.precision (fp32, bf16-mixed, ...)")
    ap.add_argument("--ops", type=int, default=0, help="also print the N torch ops with the most self CPU time")
    ap.add_argument("--shapes", action="store_true", help="group the op table by input shapes")
    ap.add_argument("--memory", action="store_true", help="also print where the step's peak memory is (see above)")
    ap.add_argument("--top", type=int, default=0, help="also print the N functions with the most cumulative time")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra rlfuse override (repeatable), e.g. --set trainer.host_memory=release")
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import bench_vs_trl as bvt
    import torch

    a.model = a.model or bvt.default_model()

    import rlfuse.trainer as trainer
    from support import compose

    torch.set_num_threads(a.threads)
    prof = cProfile.Profile()
    step_fn = trainer._train_step
    seen = {"n": 0, "wall": 0.0}
    ops: list = []

    def profiled(ctx, opt, params, step):
        seen["n"] += 1
        if seen["n"] <= a.warmup:
            return step_fn(ctx, opt, params, step)
        t0 = time.perf_counter()
        prof.enable()
        try:
            if not (a.ops or a.memory):
                return step_fn(ctx, opt, params, step)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=a.shapes,
                                        profile_memory=a.memory) as tp:
                r = step_fn(ctx, opt, params, step)
            ops.append(tp)
            return r
        finally:
            prof.disable()
            seen["wall"] += time.perf_counter() - t0

    trainer._train_step = profiled
    with tempfile.TemporaryDirectory() as tmp:
        bvt.write_real_data(Path(tmp), a.model, n_rows=64)
        over = bvt.real_overrides(a.algo, tmp) + [
            "algo.warmup=null", "eval=[]", "logger=[jsonl]", f"model.name_or_path={a.model}",
            f"trainer.max_steps={a.warmup + a.steps}", "trainer.progress=false", "trainer.eval_every=0",
            f"trainer.threads={a.threads}", "model.dtype=float32", f"trainer.precision={a.precision}",
        ] + a.set
        trainer.train(compose(over), Path(tmp) / "run")
    st = pstats.Stats(prof)
    total = seen["wall"] / a.steps
    print(f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {a.algo}, {a.model}, "
          f"{a.steps} profiled step(s) after {a.warmup}: {total:.2f} s/step (profiled, wall)")
    print(f"| part of a {a.algo} step | s/step | share |")
    print("|---|---|---|")
    for label, suffix, name in PARTS:
        hits = [(k, v) for k, v in st.stats.items() if k[0].endswith(suffix) and k[2] == name]
        if not hits:
            continue
        cum = max(v[3] for _, v in hits) / a.steps
        print(f"| {label} | {cum:.2f} | {100 * cum / total:.0f}% |")
    for tp in ops[-1:]:
        if a.ops:
            print(tp.key_averages(group_by_input_shape=a.shapes).table(sort_by="self_cpu_time_total", row_limit=a.ops))
        if a.memory:
            memory_report(tp)
    if a.top:
        st.sort_stats("cumulative").print_stats(a.top)


if __name__ == "__main__":
    main()
