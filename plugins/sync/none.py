"""``sync=none``: nothing to synchronise in a single process."""

from __future__ import annotations

from rlfuse import hookimpl


@hookimpl
def sync(step: int) -> None:
    return None
