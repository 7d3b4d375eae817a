"""What the sync plugins share (not a plugin): the trainable weights as one flat vector,
the consensus distance, and the per-step ``sync/*`` figures."""

from __future__ import annotations

import time
from typing import Any

import torch

from rlfuse import hookimpl
from rlfuse.distributed import unflatten_into


def trainable(ctx: Any) -> list[torch.nn.Parameter]:
    """The parameters every rank exchanges: the policy's and the extra modules' trainable ones."""
    mods = [ctx.policy, *ctx.modules.values()]
    return [p for m in mods for p in m.parameters() if p.requires_grad]


def flatten(params: list[torch.Tensor]) -> torch.Tensor:  # (N,) fp32
    return torch.cat([p.detach().reshape(-1).float() for p in params])


def assign(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy the flat vector ``flat`` back into ``params`` (cast to their dtype/device)."""
    unflatten_into(flat, params)


def relative_distance(theta: torch.Tensor, mean: torch.Tensor) -> float:
    """``||theta - mean||^2 / ||mean||^2``: this rank's distance to the consensus."""
    return float((theta - mean).pow(2).sum() / mean.pow(2).sum().clamp_min(1e-12))


class SyncMeter:
    """Accumulates one training step's communication (several optimiser steps may sync) and
    records ``sync/bytes`` (payload this rank sent), ``sync/seconds`` and
    ``sync/participants`` through ``ctx.record``. Every rank records the same keys at the
    same steps, so the core's metric reduction stays in lock-step."""

    def __init__(self) -> None:
        self.step = -1
        self.bytes = 0
        self.seconds = 0.0

    def start(self, ctx: Any, step: int) -> tuple[int, float]:
        if step != self.step:
            self.step, self.bytes, self.seconds = step, 0, 0.0
        return ctx.dist.bytes_sent, time.perf_counter()

    def stop(self, ctx: Any, mark: tuple[int, float], participants: int, **extra: float) -> None:
        sent, t0 = mark
        self.bytes += ctx.dist.bytes_sent - sent
        self.seconds += time.perf_counter() - t0
        ctx.record({"sync/bytes": self.bytes, "sync/seconds": self.seconds, "sync/participants": participants, **extra})


def consolidate_mean(ctx: Any) -> bool:
    """Replace every rank's weights by their mean over ranks (the consensus policy), when the
    ranks trained one model each (``trainer.strategy=none``). Returns whether it did."""
    if not ctx.dist.enabled or ctx.cfg.trainer.get("strategy", "ddp") != "none":
        return False
    params = trainable(ctx)
    theta = flatten(params)
    ctx.dist.two_phase(
        lambda: theta.clone(),
        lambda flat: ctx.dist.all_reduce(flat, op="mean", what="consensus average"),
        lambda mean: assign(params, mean),
        what="consolidate",
    )
    return True


class PeriodicSync:
    """The frame of a sync plugin that acts every ``cfg.every`` optimiser steps: the step
    counter (:meth:`due`), the ``sync/*`` meter, the final consensus policy (the mean over
    ranks) and the save/load of the attributes named in ``STATE`` under ``sync.<KEY>``."""

    KEY = ""  # the plugin's name in checkpoints: state["sync.<KEY>"]
    STATE: tuple[str, ...] = ("updates",)

    def __init__(self, cfg: Any) -> None:
        if cfg.every < 1:
            raise ValueError(f"sync.every must be >= 1, got {cfg.every}")
        self.cfg = cfg
        self.updates = 0
        self.meter = SyncMeter()

    def due(self, ctx: Any) -> bool:
        """Count one optimiser step; whether this one syncs (never in a one-process run)."""
        self.updates += 1
        return self.updates % self.cfg.every == 0 and ctx.dist.enabled

    @hookimpl
    def consolidate(self, ctx: Any) -> bool:
        """The final policy is the mean over ranks (written to ``final/``)."""
        return consolidate_mean(ctx)

    @hookimpl
    def save_state(self) -> dict[str, Any]:
        return {f"sync.{self.KEY}": {k: getattr(self, k) for k in self.STATE}}

    @hookimpl
    def load_state(self, state: dict[str, Any]) -> None:
        for k, v in (state.get(f"sync.{self.KEY}") or {}).items():
            setattr(self, k, v)
