"""Who launched this run: the sweep it belongs to and the overrides that name it.

The CLI fills this from Hydra for every job (``rlfuse -m seed=0,1`` runs two jobs, each with
its own overrides, in one sweep directory); a run started from Python (``rlfuse.pipeline.run``)
has no sweep and no overrides. Plugins read it as ``ctx.run_info`` -- a tracker names and
groups its runs with it -- so no plugin needs to import Hydra.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RunInfo:
    overrides: tuple[str, ...] = ()  # the job's command-line overrides (``seed=1``, ...)
    sweep: str | None = None  # multirun: the sweep's name (its directory's name); else None
    sweep_dir: str | None = None  # multirun: the sweep's directory
    job_num: int | None = None  # multirun: the job's index in the sweep
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """A short run name from the overrides (``seed=1,algo.lr=0.001``); "" without any."""
        return ",".join(o for o in self.overrides if not o.startswith(("hydra.", "run_dir=")))


_current = RunInfo()


def current() -> RunInfo:
    """The run info of the job in progress (an empty one outside the CLI)."""
    return _current


def set_current(info: RunInfo) -> None:
    global _current
    _current = info


@contextlib.contextmanager
def of_job(hc: Any) -> Iterator[RunInfo]:
    """Make the Hydra job's run info current while the job runs (then the previous one again)."""
    global _current
    before, _current = _current, from_hydra(hc)
    try:
        yield _current
    finally:
        _current = before


def from_hydra(hc: Any) -> RunInfo:
    """Build the run info from ``HydraConfig.get()`` of the running job."""
    from pathlib import Path

    overrides = tuple(str(o) for o in hc.overrides.task)
    mode = str(getattr(hc, "mode", "") or "")
    if mode.endswith("MULTIRUN"):
        sweep_dir = str(hc.sweep.dir)
        num = hc.job.get("num") if hasattr(hc.job, "get") else getattr(hc.job, "num", None)
        p = Path(sweep_dir)  # relative dirs name the sweep in full, minus the `multirun/` root
        name = p.name if p.is_absolute() else str(p).removeprefix("multirun/")
        return RunInfo(overrides, name, sweep_dir, None if num is None else int(num))
    return RunInfo(overrides)


def replace(info: RunInfo, **changes: Any) -> RunInfo:
    return dataclasses.replace(info, **changes)
