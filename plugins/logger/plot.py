"""``logger=plot``: the run's curves as a PNG picture, ``<run_dir>/curves.png``.

The same picture as ``rlfuse plot RUN_DIR`` (one plotting path: :func:`rlfuse.plugins.commands.plot.draw`):
the true reward (``eval/reward``, and the training reward ``reward/mean``), the learned score
(``eval/score/<name>``, a reward model's score of the same answers), each reward component,
KL, the losses and the response length against the step -- a learned score that rises while
the true reward falls is seen at a glance. Redrawn after every evaluation and at the end.

It needs matplotlib, an optional extra (``pip install 'rlfuse[plot]'``); without it the
plugin says so in one line at start-up and draws nothing, so the default logger list works on
a bare install.
"""

from __future__ import annotations

import sys
from typing import Any

from rlfuse import hookimpl
from rlfuse.plugins.commands.plot import INSTALL, draw


class Plugin:
    def __init__(self, cfg: Any = None, name: str = "plot") -> None:
        self.rows: list[dict[str, Any]] = []
        self.path = None
        self.title = ""

    @hookimpl
    def setup(self, ctx: Any) -> None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(f"[rlfuse] logger=plot: no curves.png ({INSTALL})", file=sys.stderr)
            return
        self.path = ctx.run_dir / "curves.png"
        self.title = f"{ctx.cfg.algo.name}: {ctx.run_dir}"

    @hookimpl
    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append({**metrics, "step": step})
        if any(k.startswith("eval/") for k in metrics):
            self._write()

    @hookimpl
    def teardown(self) -> None:
        self._write()

    def _write(self) -> None:
        if self.path is not None and self.rows:
            try:
                draw({"run": self.rows}, self.path, self.title)
            except ValueError:  # nothing drawable logged yet
                pass
