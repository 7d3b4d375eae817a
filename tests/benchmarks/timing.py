"""Alternating timings of a few variants of one step, and their table (shared by the
micro-benchmarks: bench_fused_loss.py, bench_packing.py)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def alternate(step: Callable[[Any], None], variants: dict[str, Any], repeats: int, iters: int) -> dict[str, list]:
    """One warm-up call per variant, then ``repeats`` rounds that time ``iters`` calls of each
    variant in turn: {name: [(wall s, CPU s) per call, one pair per round]}."""
    for arg in variants.values():
        step(arg)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, arg in variants.items():
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(iters):
                step(arg)
            times[name].append(((time.perf_counter() - w0) / iters, (time.process_time() - c0) / iters))
    return times


def print_table(times: dict[str, list], what: str) -> None:
    """Medians of wall and CPU time per variant, and every round's wall time."""
    print(f"| variant | {what} wall s (median) | CPU s (median) | all repeats (wall) |")
    print("|---|---|---|---|")
    for name, t in times.items():
        walls, cpus = [w for w, _ in t], [c for _, c in t]
        print(f"| {name} | {statistics.median(walls):.4f} | {statistics.median(cpus):.4f} | "
              f"{', '.join(f'{w:.4f}' for w in walls)} |")  # fmt: skip
