"""``logger=console``: a progress bar with the main figures on a terminal, a line every ~10%
of the run in a log file; evaluations printed as lines."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from rlfuse import hookimpl


@dataclass
class Config:
    keys: list[str] | None = None  # metrics shown on the bar (default: a sensible set)


DEFAULT_KEYS = ["reward/mean", "loss/total", "kl/ref_token", "kl/ref", "policy/clipfrac", "pref/accuracy", "perf/tokens_per_s"]
SHORT = {"reward/mean": "reward", "loss/total": "loss", "kl/ref_token": "kl_tok", "kl/ref": "kl",
         "policy/clipfrac": "clip", "pref/accuracy": "acc", "perf/tokens_per_s": "tok/s"}


class Plugin:
    Config = Config

    def __init__(self, cfg: Config, name: str = "console") -> None:
        self.keys = cfg.keys or DEFAULT_KEYS
        self.bar: Any = None

    @hookimpl
    def setup(self, ctx: Any) -> None:
        from tqdm import tqdm

        self.total = ctx.cfg.trainer.max_steps
        self.name = ctx.cfg.algo.name
        self.every = 0  # on a terminal: a live bar; in a log file: a line every ~10% of the run
        if ctx.cfg.trainer.progress and sys.stderr.isatty():
            self.bar = tqdm(total=self.total, desc=self.name, file=sys.stderr, dynamic_ncols=True, leave=True)
        elif ctx.cfg.trainer.progress:
            self.every = max(1, self.total // 10)

    @hookimpl
    def log(self, step: int, metrics: dict[str, float]) -> None:
        if any(k.startswith("eval/") for k in metrics):
            text = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("eval/"))
            (self.bar.write if self.bar else print)(f"[eval @ step {step}] {text}")
            return
        shown = {SHORT.get(k, k): f"{metrics[k]:.4g}" for k in self.keys if k in metrics}
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(shown, refresh=True)
        elif self.every and (step % self.every == 0 or step == self.total):
            text = "  ".join(f"{k}={v}" for k, v in shown.items())
            print(f"[{self.name} {step}/{self.total}] {text}", file=sys.stderr, flush=True)

    @hookimpl
    def teardown(self) -> None:
        if self.bar is not None:
            self.bar.close()
