"""Printing a run's figures for a person at the end of a job."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures worth reading first: evaluations before/after and pipeline figures."""
    out = {k: v for k, v in summary.items() if k.startswith("eval/") and isinstance(v, (int, float))}
    return dict(sorted(out.items()))


def print_summary(summary: dict[str, Any], run_dir: str | Path) -> None:
    figures = headline(summary)
    print(f"\n[rlfuse] done: {summary.get('algo')}  ->  {run_dir}")
    width = max((len(k) for k in figures), default=0)
    for k, v in figures.items():
        print(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    if summary.get("final_policy"):
        print(f"  final policy: {summary['final_policy']}")
