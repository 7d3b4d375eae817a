"""Step time and memory per rank: ``trainer.strategy=ddp`` against ``fsdp`` on 2 ranks.

    .venv/bin/python tests/benchmarks/bench_fsdp.py [--steps 8] [--hidden 512 --layers 4]

Each strategy is one ``torchrun --standalone --nproc-per-node 2`` run of ``algo=sft`` (no
warm-up, no evaluation, one thread per rank) on a widened tiny model. Figures per rank:
the mean ``perf/step_time`` of steps 2..N (rank 0's log), the bytes of the policy's
parameters this rank holds (local shards under FSDP; the AdamW moments hold twice that and
the gradients as much again), the process's peak resident memory (``ru_maxrss``, which
includes torch and transformers themselves) and its growth from the start of the job (the
resident memory at ``setup``, before the model is sharded or trained).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rlfuse import hookimpl


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Memory:
    """Plugin: at setup, the resident memory (after importing what FSDP imports, so both
    strategies start level); at teardown, this rank's parameter bytes and peak RSS, to $BENCH_OUT."""

    def __init__(self, cfg: Any = None, name: str = "memory") -> None:
        self.base = 0

    @hookimpl
    def setup(self, ctx: Any) -> None:
        import torch.distributed.checkpoint.state_dict  # noqa: F401
        import torch.distributed.fsdp  # noqa: F401

        self.base = _rss()

    @hookimpl
    def teardown(self, ctx: Any) -> None:
        from torch.distributed.tensor import DTensor

        params = [p.to_local() if isinstance(p, DTensor) else p for p in ctx.policy.parameters()]
        res = {"param_bytes": sum(p.numel() * p.element_size() for p in params),
               "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "base_rss_bytes": self.base}
        Path(os.environ["BENCH_OUT"], f"rank{ctx.dist.rank}.json").write_text(json.dumps(res))


def run(strategy: str, args: argparse.Namespace, tmp: Path) -> dict:
    run_dir = tmp / strategy
    out = tmp / f"{strategy}_mem"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "rlfuse", "algo=sft", "algo.warmup=null", f"trainer.max_steps={args.steps}",
           "trainer.progress=false", "logger=[jsonl]", "eval=[]", "trainer.threads=1", f"trainer.strategy={strategy}",
           f"model.tiny.hidden_size={args.hidden}", f"model.tiny.intermediate_size={4 * args.hidden}",
           f"model.tiny.num_layers={args.layers}", "+plugins.memory.plugin=bench_fsdp:Memory",
           f"run_dir={run_dir}", f"hydra.run.dir={run_dir}/hydra"]
    env = dict(os.environ, OMP_NUM_THREADS="1", BENCH_OUT=str(out),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["perf/step_time"] for r in rows if "perf/step_time" in r][1:]
    mem = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return {"strategy": strategy, "step_time_s": sum(times) / len(times), "wall_s": wall,
            "param_bytes": [m["param_bytes"] for m in mem], "peak_rss_bytes": [m["peak_rss_bytes"] for m in mem],
            "growth_bytes": [m["peak_rss_bytes"] - m["base_rss_bytes"] for m in mem]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in ("ddp", "fsdp"):
            res = run(strategy, args, Path(tmp))
            results.append(res)
            mib = 1 << 20
            print(f"| {strategy} | {res['step_time_s']:.3f} | "
                  f"{' / '.join(f'{b / mib:.1f}' for b in res['param_bytes'])} | "
                  f"{' / '.join(f'{b / mib:.0f}' for b in res['peak_rss_bytes'])} | "
                  f"{' / '.join(f'{b / mib:.0f}' for b in res['growth_bytes'])} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
