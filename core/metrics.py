"""The metric vocabulary: every logged key is ``<namespace>/<name>``, one name per quantity.

A test logs one step of every preset and fails on a key outside these namespaces, so a new
metric either fits one below or adds its namespace here (and to docs/metrics.md).
"""

from __future__ import annotations

import math
from typing import Any

NAMESPACES: dict[str, str] = {
    "reward": "the step's rewards: reward/mean, reward/std (weighted total) and reward/<component>/{mean,std}",
    "loss": "loss terms as the loss plugins returned them (loss/<term>) and loss/total",
    "policy": "the policy update: clip fraction, ratio, approx KL old->new, entropy, pg loss, nll",
    "critic": "the value function: value loss, value clip fraction, value and return means",
    "kl": "divergence from the frozen reference: kl/ref (mean over sequences of the summed per-token log-ratio), kl/ref_token (per-token masked mean of the loss term's estimator), kl/beta",
    "advantage": "advantage estimator statistics (mean, abs_mean, baseline, group sizes)",
    "pref": "preference learning (DPO family, reward model): accuracy, chosen/rejected, margin, log-probs",
    "optim": "the optimiser: lr, grad_norm, updates, skipped steps",
    "perf": "speed and memory: step_time, tokens_per_s",
    "response": "generated responses: length_mean",
    "eval": "evaluations (eval/<...>), before/during/after training",
    "sync": "parameter exchange between ranks/agents: bytes, seconds, participants",
    "consensus": "the decentralized algorithm: distance of each agent to the consensus",
    "data": "data pipeline counters (skipped rows, truncations)",
    "run": "the run's own bookkeeping: resume_changes (config keys a resume was allowed to change)",
}

NON_METRIC_KEYS = ("step", "stage")  # bookkeeping columns of a metrics.jsonl row


def namespace(key: str) -> str:
    """The namespace of a metric key (its part before the first ``/``)."""
    return key.split("/", 1)[0] if "/" in key else ""


def unknown_keys(keys: list[str] | set[str]) -> list[str]:
    """Keys that are neither bookkeeping columns nor in a documented namespace."""
    return sorted(k for k in keys if k not in NON_METRIC_KEYS and namespace(k) not in NAMESPACES)


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN/Inf float replaced by None, recursively (dicts, lists, tuples;
    0-d tensors and NumPy scalars become floats first): strict JSON has no NaN literal, so
    metrics.jsonl and summary.json write a non-finite value as ``null``."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if not isinstance(obj, (bool, int, str)) and hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def truncate_jsonl(path: Any, step: int) -> int:
    """Drop the rows of a JSONL log whose ``step`` is after ``step`` (a resume from the
    checkpoint of that step logs them again); returns how many were dropped. Written
    atomically; a missing file is left missing."""
    import json
    import os
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row_step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):  # a line cut by the kill
            dropped += 1
            continue
        if isinstance(row_step, (int, float)) and row_step > step:
            dropped += 1
        else:
            keep.append(line)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
    os.replace(tmp, path)
    return dropped
