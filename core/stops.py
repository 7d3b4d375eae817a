"""Safe stops: SIGINT (Ctrl-C) or SIGTERM (a scheduler's pre-emption) during training finish
the current step, write a checkpoint, print how to resume and exit non-zero (130 / 143).

A second signal stops at once (``KeyboardInterrupt``); the last complete checkpoint on disk
stays intact either way, since every checkpoint is written atomically.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from rlfuse.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Remembers the first stop signal; the loop checks :attr:`requested` after each step."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # a second signal: stop now
        self.signum = signum
        print(
            f"\n[rlfuse] {signal.Signals(signum).name} received: finishing the current step, then writing a "
            "checkpoint (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def exit(self, checkpoint: Path, step: int) -> NoReturn:
        """Raise :class:`~rlfuse.errors.Interrupted` with how to resume."""
        assert self.signum is not None
        name = signal.Signals(self.signum).name
        raise Interrupted(
            f"stopped by {name} after step {step}; checkpoint: {checkpoint}\n"
            "  resume: run the same command again (trainer.resume=auto, the default, continues from the newest "
            "checkpoint in the run dir; trainer.resume=true insists on one)",
            exit_code=128 + self.signum,
        )


@contextmanager
def catch_signals() -> Iterator[StopSignals]:
    """Install the stop handlers for the duration of a run (main thread only; elsewhere the
    signals keep their handlers), then put the previous ones back."""
    stop = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, stop.handle)
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
