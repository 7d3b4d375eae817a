"""Throughput of rlfuse training steps on the tiny model (a benchmark, not a test).

    python tests/benchmarks/bench_steps.py [--steps 20] [--algos sft,ppo,grpo,dpo]

Each algorithm runs in a fresh subprocess (so peak memory is its own) for `--steps` steps
after 2 warm-up steps, on the built-in task, and the script prints steps/s, tokens/s (real
prompt + response tokens through the training forward/backward per second of wall time,
rollout included) and peak resident memory. Compare runs of the same machine and thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PRESETS = {
    "sft": ["algo=sft"],
    "ppo": ["algo=ppo", "algo.warmup=null"],
    "grpo": ["algo=grpo", "algo.warmup=null"],
    "dpo": ["algo=dpo", "algo.warmup=null"],
}


def child(algo: str, steps: int, warmup: int) -> None:
    import torch
    from hydra import compose, initialize_config_module

    import rlfuse  # noqa: F401  (sets OMP_WAIT_POLICY before torch threads start)
    from rlfuse.trainer import train

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    over = PRESETS[algo] + [
        f"trainer.max_steps={steps + warmup}", "trainer.progress=false", "eval=[]", "logger=[jsonl]",
        "trainer.eval_every=0",
    ]
    with initialize_config_module("rlfuse.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=over)
    run_dir = f"/tmp/rlfuse-bench-{algo}-{os.getpid()}"
    t0 = time.perf_counter()
    train(cfg, run_dir)
    total = time.perf_counter() - t0
    rows = [json.loads(x) for x in open(f"{run_dir}/metrics.jsonl") if "perf/step_time" in x]
    timed = rows[warmup:]
    secs = sum(r["perf/step_time"] for r in timed)
    toks = sum(r["perf/tokens_per_s"] * r["perf/step_time"] for r in timed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "algo": algo, "steps": len(timed), "steps_per_s": len(timed) / secs, "tokens_per_s": toks / secs,
        "peak_rss_mib": peak / 1024, "rss_growth_mib": (peak - base) / 1024, "job_s": total,
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--algos", default="sft,ppo")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.steps, a.warmup)
        return
    print(f"| algo | steps/s | tokens/s | peak RSS (MiB) | threads={os.environ.get('BENCH_THREADS', '2')} |")
    print("|---|---|---|---|---|")
    for algo in a.algos.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", algo, "--steps", str(a.steps), "--warmup", str(a.warmup)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {algo} | failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode} | | | |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {algo} | {r['steps_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} | |")


if __name__ == "__main__":
    main()
