"""``logger=jsonl``: one JSON object per line in ``<run_dir>/metrics.jsonl`` (training
steps, and evaluations as lines whose keys are ``eval/...``)."""

from __future__ import annotations

import json
from typing import Any

from rlfuse import hookimpl


class Plugin:
    def __init__(self, cfg: Any = None, name: str = "jsonl") -> None:
        self.f: Any = None

    @hookimpl
    def setup(self, ctx: Any) -> None:
        mode = "a" if ctx.cfg.trainer.resume else "w"
        self.f = (ctx.run_dir / "metrics.jsonl").open(mode, encoding="utf-8")

    @hookimpl
    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.f.flush()

    @hookimpl
    def teardown(self) -> None:
        if self.f:
            self.f.close()
