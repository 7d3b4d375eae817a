"""``sync=allreduce``: average the ranks' weights (or gradients) over all ranks.

* ``average: params`` (default): every ``every`` optimiser steps, the trainable parameters
  become their mean over all ranks (local SGD / model averaging). ``every: 1`` keeps the
  ranks identical.
* ``average: grads``: before each optimiser step, the gradients become their mean over all
  ranks -- data parallelism done by a plugin; with equal token counts per rank it equals
  ``trainer.strategy=ddp`` (which weights ranks by their tokens).

Both use ``trainer.strategy=none`` (the ranks keep their own models between syncs). The
update is two-phase: the all-reduce completes on every rank and the ranks agree that all
succeeded before any copies the result into its weights. Logs ``sync/bytes``,
``sync/seconds``, ``sync/participants`` and, at each parameter sync,
``consensus/param_distance`` (mean over ranks of ``||theta_j - mean||^2 / ||mean||^2``,
measured just before averaging).
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
    every: int = 1  # optimiser steps between parameter averages (average=params)
    average: str = "params"  # params | grads


class Plugin(PeriodicSync):
    Config = Config
    KEY = "allreduce"

    def __init__(self, cfg: Config, name: str = "allreduce") -> None:
        if cfg.average not in ("params", "grads"):
            raise ValueError(f"sync.average must be params or grads, got '{cfg.average}'")
        super().__init__(cfg)

    @hookimpl(tryfirst=True)
    def before_step(self, ctx: Any, step: int) -> None:
        if self.cfg.average != "grads" or not ctx.dist.enabled:
            return
        params = trainable(ctx)
        mark = self.meter.start(ctx, step)
        for p in params:
            if p.grad is None:
                p.grad = p.new_zeros(p.shape)
        ctx.dist.two_phase(
            lambda: flatten([p.grad for p in params]),
            lambda flat: ctx.dist.all_reduce(flat, op="mean", what="sync=allreduce gradient mean"),
            lambda mean: assign([p.grad for p in params], mean),
            what="sync=allreduce",
        )
        self.meter.stop(ctx, mark, ctx.dist.world_size)

    @hookimpl(tryfirst=True)
    def sync(self, ctx: Any, step: int) -> None:
        if not self.due(ctx) or self.cfg.average != "params":
            return
        params = trainable(ctx)
        mark = self.meter.start(ctx, step)
        theta = flatten(params)
        dist_before: list[float] = []

        def apply(mean: Any) -> None:
            dist_before.append(relative_distance(theta, mean))
            assign(params, mean)

        ctx.dist.two_phase(
            lambda: theta.clone(),
            lambda flat: ctx.dist.all_reduce(flat, op="mean", what="sync=allreduce parameter mean"),
            apply,
            what="sync=allreduce",
        )
        self.meter.stop(ctx, mark, ctx.dist.world_size, **{"consensus/param_distance": dist_before[0]})
