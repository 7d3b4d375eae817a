"""``sync=diloco``: DiLoCo's outer step (Douillard et al. 2023; OpenDiLoCo).

Each rank takes ``every`` (H) steps with its own inner optimiser (the trainer's AdamW), then::

    delta_j = anchor - theta_j                      pseudo-gradient of rank j
    delta   = mean_j delta_j                        one all-reduce (optionally in bf16)
    anchor  = OuterNesterovSGD(anchor, delta, lr=outer_lr, momentum=outer_momentum)
    theta_j = anchor                                every rank restarts from the new anchor

The anchor and the outer momentum live on the CPU (they are touched once per H steps). With
``outer_lr: 1`` and ``outer_momentum: 0`` the outer step is plain parameter averaging. The
update is two-phase (all ranks agree the all-reduce succeeded before any applies it). Logs
``sync/bytes`` (H x fewer than per-step averaging; half again with ``bf16: true``),
``sync/seconds``, ``sync/participants`` and ``consensus/param_distance`` before the step.
Use with ``trainer.strategy=none``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

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
    every: int = 50  # inner optimiser steps between outer steps (H)
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    bf16: bool = False  # send the pseudo-gradient in bfloat16 (half the bytes)


class Plugin(PeriodicSync):
    Config = Config
    KEY = "diloco"
    STATE = ("updates", "anchor", "momentum")

    def __init__(self, cfg: Config, name: str = "diloco") -> None:
        if cfg.outer_lr <= 0 or not 0 <= cfg.outer_momentum < 1:
            raise ValueError("sync.outer_lr must be > 0 and sync.outer_momentum in [0, 1)")
        super().__init__(cfg)
        self.anchor: torch.Tensor | None = None  # (N,) fp32 on CPU
        self.momentum: torch.Tensor | None = None

    @hookimpl
    def before_step(self, ctx: Any) -> None:
        if self.anchor is None:  # the weights every rank starts from (broadcast by the core)
            self.anchor = flatten(trainable(ctx)).cpu()

    @hookimpl(tryfirst=True)
    def sync(self, ctx: Any, step: int) -> None:
        anchor = self.anchor
        assert anchor is not None
        if not self.due(ctx):
            return
        params = trainable(ctx)
        mark = self.meter.start(ctx, step)
        theta = flatten(params).cpu()

        def local() -> torch.Tensor:
            delta = anchor - theta
            return delta.to(torch.bfloat16) if self.cfg.bf16 else delta

        def communicate(wire: torch.Tensor) -> torch.Tensor:
            return ctx.dist.all_reduce(wire, op="mean", what="sync=diloco pseudo-gradient").float()

        out: dict[str, float] = {}

        def apply(delta: torch.Tensor) -> None:
            c = self.cfg
            out["consensus/param_distance"] = relative_distance(theta, anchor - delta)
            if c.outer_momentum:
                self.momentum = delta.clone() if self.momentum is None else self.momentum.mul_(c.outer_momentum).add_(delta)
                update = delta + c.outer_momentum * self.momentum if c.nesterov else self.momentum
            else:
                update = delta
            anchor.sub_(c.outer_lr * update)
            assign(params, anchor)

        ctx.dist.two_phase(local, communicate, apply, what="sync=diloco")
        self.meter.stop(ctx, mark, ctx.dist.world_size, **out)
