"""A seeded, resumable stream over a list of records (shared by the rollout plugins)."""

from __future__ import annotations

from typing import Any

import torch

from rlfuse import hookimpl


class RecordStream:
    """Yields records in a fresh seeded order each pass; its position survives a resume.

    Under torchrun each rank reads its own shard: every rank walks the same seeded global
    order, ``take(n)`` consumes ``n * world`` records of it and returns the rank's ``n``
    (rank r gets positions ``r*n .. r*n+n-1``), so ``world`` ranks taking ``n`` each see
    exactly what one process taking ``n * world`` would, and positions agree on every rank.
    """

    def __init__(self, records: list[Any], seed: int, shuffle: bool = True, rank: int = 0, world: int = 1) -> None:
        self.records = records
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world = world
        self.epoch = 0
        self.pos = 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.records)))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.records), generator=g).tolist()

    def take(self, n: int) -> list[Any]:
        """The next ``n`` records of this rank's shard."""
        out = self._next(n * self.world)
        return out[self.rank * n : (self.rank + 1) * n]

    def _next(self, n: int) -> list[Any]:
        out = []
        while len(out) < n:
            if self.pos >= len(self._order):
                self.epoch += 1
                self.pos = 0
                self._order = self._make_order()
            out.append(self.records[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._make_order()


def shard(ctx: Any) -> dict[str, int]:
    """``rank``/``world`` keyword arguments of :class:`RecordStream` for this run's rank."""
    d = getattr(ctx, "dist", None)
    return {"rank": d.rank, "world": d.world_size} if d is not None else {}


class StreamPlugin:
    """Base of rollout plugins that read records through ``self.stream``: keeps the stream's
    position in checkpoints (key ``rollout.<name>``), so a resumed run continues where it was."""

    name: str
    stream: RecordStream | None = None

    @hookimpl
    def save_state(self) -> dict[str, Any]:
        return {f"rollout.{self.name}": self.stream.state_dict() if self.stream else None}

    @hookimpl
    def load_state(self, state: dict[str, Any]) -> None:
        s = state.get(f"rollout.{self.name}")
        if s and self.stream:
            self.stream.load_state_dict(s)
