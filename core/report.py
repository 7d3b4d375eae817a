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


def objective(summary: dict[str, Any], key: str | None) -> Any:
    """What a job returns to Hydra: the summary, or -- with ``objective=KEY`` -- the float
    ``summary[KEY]`` that an optimising sweeper (Optuna, Nevergrad, Ax) minimises or maximises."""
    if not key:
        return summary
    if not isinstance(summary.get(key), (int, float)):
        numbers = ", ".join(sorted(k for k, v in summary.items() if isinstance(v, (int, float))))
        raise ValueError(f"objective={key}: not a number in the run's summary; numbers there: {numbers}")
    return float(summary[key])
