"""``sync=gossip``: decentralized averaging with neighbours (D-PSGD, Lian et al. 2017).

Every ``every`` optimiser steps each rank replaces its weights by the mean of its own and its
neighbours' on a topology::

    ring:  theta_j <- (theta_{j-1} + theta_j + theta_{j+1}) / 3     (2 ranks: the pair's mean)
    full:  theta_j <- mean over all ranks                            (one all-reduce)

On a ring each rank exchanges with two peers only (point-to-point send/recv, no global
collective), so bytes per rank do not grow with the number of ranks. The mixing matrix is
symmetric and doubly stochastic: the mean over ranks is preserved and the spread shrinks.
The exchange is two-phase (all ranks agree that every exchange succeeded before any mixes).

Logs ``sync/bytes``, ``sync/seconds``, ``sync/participants`` (ranks mixed, self included)
and, every ``measure_every`` syncs, ``consensus/param_distance`` -- which costs one extra
all-reduce of the weights (a measurement, not counted in ``sync/bytes``; 0 turns it off).
Use with ``trainer.strategy=none``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlfuse import hookimpl
from rlfuse.plugins.sync._common import (
    PeriodicSync,
    assign,
    flatten,
    relative_distance,
    trainable,
)


@dataclass
class Config:
    every: int = 1  # optimiser steps between mixing rounds
    topology: str = "ring"  # ring | full
    measure_every: int = 1  # syncs between consensus-distance measurements (0 = never)


def neighbours(rank: int, world: int, topology: str) -> list[int]:
    """The peers ``rank`` mixes with (itself excluded)."""
    if topology == "full":
        return [r for r in range(world) if r != rank]
    return sorted({(rank - 1) % world, (rank + 1) % world} - {rank})


class Plugin(PeriodicSync):
    Config = Config
    KEY = "gossip"
    STATE = ("updates", "syncs")

    def __init__(self, cfg: Config, name: str = "gossip") -> None:
        if cfg.topology not in ("ring", "full"):
            raise ValueError(f"sync.topology must be ring or full, got '{cfg.topology}'")
        super().__init__(cfg)
        self.syncs = 0

    @hookimpl(tryfirst=True)
    def sync(self, ctx: Any, step: int) -> None:
        if not self.due(ctx):
            return
        self.syncs += 1
        d = ctx.dist
        params = trainable(ctx)
        extra: dict[str, float] = {}
        theta = flatten(params)
        if self.cfg.measure_every and self.syncs % self.cfg.measure_every == 0:
            sent = d.bytes_sent
            mean = d.all_reduce(theta.clone(), op="mean", what="sync=gossip distance measurement")
            d.bytes_sent = sent  # a measurement, not part of the algorithm's traffic
            extra["consensus/param_distance"] = relative_distance(theta, mean)
        peers = neighbours(d.rank, d.world_size, self.cfg.topology)
        mark = self.meter.start(ctx, step)

        def communicate(theta: Any) -> Any:
            if self.cfg.topology == "full":
                return d.all_reduce(theta.clone(), op="mean", what="sync=gossip all-reduce")
            got = d.exchange(theta, peers, what=f"sync=gossip exchange with ranks {peers}")
            return (theta + sum(got.values())) / (1 + len(peers))

        d.two_phase(lambda: theta, communicate, lambda mixed: assign(params, mixed), what="sync=gossip")
        self.meter.stop(ctx, mark, 1 + len(peers), **extra)
