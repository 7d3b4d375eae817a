"""Task reward functions named in config (``module:function``): loading and calling them.

One calling convention for ``reward=rule``, ``eval=task`` and anything else that scores
answers with a rule: ``fn(prompt=..., response=..., **columns)`` per answer, where ``columns``
are the other fields of the prompt's dataset row; or, ``batched``, once with lists
``fn(prompts=[...], responses=[...], **columns_as_lists)``.
"""

from __future__ import annotations

import importlib
from typing import Any

PROMPT_FIELDS = ("prompt", "messages")  # row fields that are the prompt itself, not columns


def load_function(spec: str, where: str) -> Any:
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{where}: expected 'module:function', got '{spec}'")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"{where}: cannot import module '{module}': {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{where}: module '{module}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{where}: '{spec}' is not callable")
    return obj


def call_rule(
    fn: Any, prompts: list[str], responses: list[str], rows: list[dict[str, Any]] | None, batched: bool = False
) -> list[float]:
    """Score every (prompt, response) with ``fn``; returns one float per response."""
    rows = rows or [{} for _ in responses]
    if batched:
        names = [k for k in (rows[0] if rows else {}) if k not in PROMPT_FIELDS]
        cols = {k: [r.get(k) for r in rows] for k in names}
        return [float(s) for s in fn(prompts=prompts, responses=responses, **cols)]
    return [
        float(fn(prompt=p, response=r, **{k: v for k, v in row.items() if k not in PROMPT_FIELDS}))
        for p, r, row in zip(prompts, responses, rows, strict=True)
    ]
