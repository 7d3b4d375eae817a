"""A plugin that injects faults into a run, for the reliability tests (tests/core/).

Register it with ``+plugins.faults.plugin=faults`` (tests/ is on the path); it does nothing
unless told to by environment variables, so the same config runs with and without a fault
(a resume must not see a config change):

* ``RLFUSE_FAULT_KILL_AT=N``: SIGKILL the process right after training step N is logged;
* ``RLFUSE_FAULT_TERM_AT=N``: send SIGTERM to the process at that point (a safe stop;
  ``RLFUSE_FAULT_SIGNAL=SIGINT`` sends that signal instead);
* ``RLFUSE_FAULT_STAGE=name``: only in the pipeline stage whose run dir is named ``name``;
* ``RLFUSE_FAULT_RSS=path``: append ``step rss_bytes`` lines to ``path`` (memory checks).
"""

from __future__ import annotations

import os
import signal
from typing import Any

from rlfuse import hookimpl


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@hookimpl
def log(ctx: Any, step: int, metrics: dict[str, float]) -> None:
    if "loss/total" not in metrics:  # an evaluation row
        return
    stage = os.environ.get("RLFUSE_FAULT_STAGE")
    if stage and ctx.run_dir.name != stage:
        return
    if os.environ.get("RLFUSE_FAULT_RSS"):
        with open(os.environ["RLFUSE_FAULT_RSS"], "a") as f:
            f.write(f"{step} {_rss()}\n")
    if os.environ.get("RLFUSE_FAULT_KILL_AT") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("RLFUSE_FAULT_TERM_AT") == str(step):
        os.kill(os.getpid(), getattr(signal, os.environ.get("RLFUSE_FAULT_SIGNAL", "SIGTERM")))
