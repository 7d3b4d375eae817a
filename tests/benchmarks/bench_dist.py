"""Time and bytes per training step under torchrun: 1/2/3 ranks, DDP and the sync plugins.

    .venv/bin/python tests/benchmarks/bench_dist.py [--steps 13] [--out bench.json]

Each configuration is one ``torchrun --standalone`` run of ``algo=decentralized`` (GRPO with
the consensus term, no warm-up: speed only) on the tiny model, one thread per rank; the
figures are the means over steps 2..N of rank 0's logged ``perf/step_time``,
``perf/comm_bytes`` (all traffic this rank sent: gradients, syncs, metric reduction) and
``sync/bytes`` (the sync plugin's payload only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = [  # (label, ranks, overrides)
    ("1 rank", 1, ["trainer.strategy=none", "sync=none", "~loss.consensus"]),
    ("DDP", 2, ["trainer.strategy=ddp", "sync=none", "~loss.consensus"]),
    ("DDP", 3, ["trainer.strategy=ddp", "sync=none", "~loss.consensus"]),
    # the preset's sync period: every 16 optimiser steps = every 4 training steps
    ("allreduce", 2, ["sync=allreduce"]),
    ("allreduce", 3, ["sync=allreduce"]),
    ("diloco", 2, ["sync=diloco"]),
    ("diloco", 3, ["sync=diloco"]),
    ("diloco bf16", 3, ["sync=diloco", "sync.bf16=true"]),
    ("gossip ring", 2, ["sync=gossip"]),
    ("gossip ring", 3, ["sync=gossip"]),
]


def run(label: str, ranks: int, overrides: list[str], steps: int, tmp: Path) -> dict:
    run_dir = tmp / f"{label.replace(' ', '_')}_{ranks}"
    over = [o for o in overrides if not o.startswith("sync=none")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "-m", "rlfuse", "algo=decentralized", "algo.warmup=null", f"trainer.max_steps={steps}",
           "trainer.progress=false", "logger=[jsonl]", "eval=[]", "trainer.threads=1", *over,
           f"run_dir={run_dir}", f"hydra.run.dir={run_dir}/hydra"]
    if "sync=none" in overrides:
        cmd = cmd + ["sync=none", "~sync.every"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/step_time" in r][1:]  # skip the first step (warm-up)

    def mean(key: str) -> float:
        vals = [r.get(key, 0.0) for r in rows]
        return sum(vals) / len(vals)

    return {"config": label, "ranks": ranks, "step_time_s": mean("perf/step_time"),
            "comm_bytes_per_step": mean("perf/comm_bytes"), "sync_bytes_per_step": mean("sync/bytes"),
            "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=13)  # steps 2..13: three syncs in 12 steps
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, ranks, overrides in CONFIGS:
            res = run(label, ranks, overrides, args.steps, Path(tmp))
            out.append(res)
            print(f"| {res['config']} | {ranks} | {res['step_time_s']:.3f} | {res['comm_bytes_per_step']:,.0f} | "
                  f"{res['sync_bytes_per_step']:,.0f} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
