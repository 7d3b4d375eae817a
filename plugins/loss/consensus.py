"""``loss=consensus``: keep each agent's policy near the others' (the decentralized algorithm).

Agent ``j``'s loss is ``L_j = L_RL(pi_j) + coef * (1/M) sum_k D(pi_k, pi_j)``; this plugin adds
the second term against a *snapshot* of the others, refreshed at every sync::

    distance: param_l2   coef * ||theta_j - snapshot||^2
                         (the gradient of (1/M) sum_k ||theta_j - theta_k||^2 is that of
                          ||theta_j - mean_k theta_k||^2, so the mean is the snapshot)
    distance: kl         coef * KL(pi_j || pi_snapshot), k3 estimate on the batch's response
                         tokens (a frozen copy of the policy holds the snapshot's weights)

``snapshot`` says what the agent is compared with:

* ``after_sync`` (default, no extra traffic): the weights as the sync plugin left them -- the
  consensus average right after ``sync=allreduce`` / ``diloco``, the neighbourhood mix after
  ``sync=gossip``;
* ``consensus``: the mean over all ranks (one all-reduce of the weights at each refresh);
* ``neighbours``: the mean of the ring neighbours' weights (point-to-point, like gossip).

The snapshot is refreshed every ``every`` optimiser steps, after the sync plugin ran (this
plugin's ``sync`` is ``trylast``; the sync plugins' are ``tryfirst``): set ``every`` to the
sync plugin's. Logs ``consensus/l2`` (``||theta_j - snapshot||^2 / ||snapshot||^2``),
``consensus/kl`` (distance=kl) and ``consensus/snapshot_bytes``. With one process the term
is 0 (the snapshot is the initial weights, refreshed to the current ones at each sync).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from rlfuse import hookimpl
from rlfuse.data import Batch, LossOutput
from rlfuse.plugins.sync._common import assign, flatten, trainable
from rlfuse.plugins.sync.gossip import neighbours


@dataclass
class Config:
    coef: float = 0.1  # lambda
    distance: str = "param_l2"  # param_l2 | kl
    snapshot: str = "after_sync"  # after_sync | consensus | neighbours
    every: int = 1  # optimiser steps between snapshot refreshes


class Plugin:
    Config = Config

    def __init__(self, cfg: Config, name: str = "consensus") -> None:
        if cfg.distance not in ("param_l2", "kl"):
            raise ValueError(f"loss.{name}.distance must be param_l2 or kl, got '{cfg.distance}'")
        if cfg.snapshot not in ("after_sync", "consensus", "neighbours"):
            raise ValueError(f"loss.{name}.snapshot must be after_sync, consensus or neighbours, got '{cfg.snapshot}'")
        if cfg.coef < 0 or cfg.every < 1:
            raise ValueError(f"loss.{name}.coef must be >= 0 and every >= 1")
        self.cfg = cfg
        self.name = name
        self.updates = 0
        self.snapshot: list[torch.Tensor] | None = None  # detached copies of the trainable params
        self.snapshot_model: torch.nn.Module | None = None
        self.bytes = 0

    def _take(self, ctx: Any, flat: torch.Tensor | None = None) -> None:
        params = trainable(ctx)
        if flat is None:
            self.snapshot = [p.detach().clone() for p in params]
        else:
            self.snapshot = [p.detach().clone() for p in params]
            assign(self.snapshot, flat)
        if self.cfg.distance == "kl":
            if self.snapshot_model is None:
                self.snapshot_model = copy.deepcopy(ctx.policy).eval().requires_grad_(False)
            frozen = [p for p, q in zip(self.snapshot_model.parameters(), ctx.policy.parameters(), strict=True) if q.requires_grad]
            assign(frozen, flatten(self.snapshot))

    @hookimpl
    def setup(self, ctx: Any) -> None:
        if self.cfg.distance == "kl":
            ctx.require_forward(logprobs=True)  # the KL term reads the shared forward's log-probs

    @hookimpl
    def loss(self, ctx: Any, batch: Batch) -> LossOutput:
        if self.snapshot is None:
            self._take(ctx)
        assert self.snapshot is not None
        params = trainable(ctx)
        metrics: dict[str, Any] = {"consensus/snapshot_bytes": float(self.bytes)}
        with torch.no_grad():
            norm = sum(s.float().pow(2).sum() for s in self.snapshot).clamp_min(1e-12)
            sq = sum((p.float() - s.float()).pow(2).sum() for p, s in zip(params, self.snapshot, strict=True))
        metrics["consensus/l2"] = float(sq / norm)
        if self.cfg.distance == "param_l2":
            share = len(batch) / (batch.totals.get("sequences") or len(batch))  # once per optimiser step
            l2 = sum((p - s).pow(2).sum() for p, s in zip(params, self.snapshot, strict=True))
            term = self.cfg.coef * share * l2
        else:
            assert self.snapshot_model is not None
            m = batch.response_mask
            lp = ctx.forward(batch).logprobs
            with torch.no_grad():
                snap = ctx.forward(batch, model=self.snapshot_model).logprobs
            r = (snap - lp) * m
            k3 = (torch.exp(r) - r - 1) * m  # KL(pi_j || pi_snapshot), per token
            n = batch.totals.get("tokens") or float(m.sum().clamp_min(1))
            kl = k3.sum() / n
            term = self.cfg.coef * kl
            metrics["consensus/kl"] = (k3.sum() / m.sum().clamp_min(1)).detach()
        return LossOutput(terms={self.name: term}, metrics=metrics)

    @hookimpl(trylast=True)
    def sync(self, ctx: Any, step: int) -> None:
        self.updates += 1
        if self.updates % self.cfg.every:
            return
        d = ctx.dist
        if self.cfg.snapshot == "after_sync" or not d.enabled:
            self._take(ctx)
            return
        theta = flatten(trainable(ctx))
        sent = d.bytes_sent
        if self.cfg.snapshot == "consensus":
            flat = d.all_reduce(theta.clone(), op="mean", what="loss=consensus snapshot")
        else:
            peers = neighbours(d.rank, d.world_size, "ring")
            got = d.exchange(theta, peers, what=f"loss=consensus snapshot from ranks {peers}")
            flat = sum(got.values()) / len(got)
        self.bytes += d.bytes_sent - sent
        self._take(ctx, flat)

    @hookimpl
    def save_state(self) -> dict[str, Any]:
        return {f"loss.{self.name}": {"updates": self.updates, "snapshot": self.snapshot}}

    @hookimpl
    def load_state(self, state: dict[str, Any]) -> None:
        s = state.get(f"loss.{self.name}")
        if s:
            self.updates, self.snapshot = s["updates"], s["snapshot"]
