"""``logger=jsonl``: one JSON object per line in ``<run_dir>/metrics.jsonl`` (training
steps, and evaluations as lines whose keys are ``eval/...``).

Strict JSON: a NaN/Inf value is written as ``null``. A fresh run starts the file anew; a
resumed run first drops the rows logged after its checkpoint's step, so no step appears twice.
"""

from __future__ import annotations

import json
from typing import Any

from rlfuse import hookimpl
from rlfuse.metrics import finite_or_none, truncate_jsonl


class Plugin:
    def __init__(self, cfg: Any = None, name: str = "jsonl") -> None:
        self.f: Any = None
        self.path: Any = None
        self.mode = "w"  # a fresh run; "a" after a resume

    @hookimpl
    def setup(self, ctx: Any) -> None:
        self.path = ctx.run_dir / "metrics.jsonl"

    @hookimpl
    def load_state(self, ctx: Any) -> None:
        truncate_jsonl(self.path, ctx.step)  # a resume: keep what was logged up to the checkpoint
        self.mode = "a"

    @hookimpl
    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.f is None:
            self.f = self.path.open(self.mode, encoding="utf-8")
        self.f.write(json.dumps(finite_or_none({"step": step, **metrics}), allow_nan=False) + "\n")
        self.f.flush()

    @hookimpl
    def teardown(self) -> None:
        if self.f:
            self.f.close()
