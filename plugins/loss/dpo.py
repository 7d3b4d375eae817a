"""``loss=dpo``: the DPO family of offline preference losses.

The batch (from ``rollout=preference_data``) holds ``P`` pairs as ``2P`` rows, each chosen
row followed later by its rejected row; ``extras["pair"]`` (== ``group_ids``) names the pair
and ``extras["chosen"]`` says which side a row is. Chosen and rejected go through ONE
concatenated forward pass (``ctx.forward(batch)``). With summed response log-probs
``pi_c, pi_r`` (policy) and ``ref_c, ref_r`` (frozen reference),

    h = (pi_c - ref_c) - (pi_r - ref_r)                      (the implicit reward margin / beta)

and the per-pair loss is, for ``loss_type``:

* ``sigmoid`` (DPO, Rafailov et al. 2023), with label smoothing eps (conservative DPO, cDPO):
  ``-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``
* ``robust`` (rDPO, Chowdhury et al. 2024; eps = label-flip rate, < 0.5):
  ``[-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps)``
* ``ipo`` (Azar et al. 2023, tau = beta): ``(h - 1 / (2 beta))^2``
* ``hinge`` (SLiC-HF, Zhao et al. 2023, with margin delta = 1/beta, scaled by beta):
  ``max(0, 1 - beta h)``
* ``simpo`` (Meng et al. 2024, reference-free): with length-normalised log-probs
  ``a_c = pi_c / |y_c|``, ``a_r = pi_r / |y_r|`` and target margin gamma,
  ``-(1 - eps) log sigma(beta (a_c - a_r) - gamma) - eps log sigma(-(beta (a_c - a_r) - gamma))``

Implicit rewards (logged): ``beta (pi - ref)`` per side (``beta a`` for SimPO). Reference
log-probs are computed once per pair under ``no_grad`` and cached for as long as the
reference is the same frozen model; with ``precompute_reference: true`` the reference scores
every training and held-out pair before the first step and then leaves memory.

The ``evaluate`` hook reports, on ``data.eval_preferences``, the held-out implicit-reward
accuracy ``eval/pref/accuracy`` (a tie counts 1/2, so the reference itself scores 0.5),
``eval/pref/margin`` and ``eval/pref/logp_accuracy`` (how often the policy alone gives the
chosen answer the higher summed log-prob).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rlfuse import hookimpl
from rlfuse.data import Batch, LossOutput
from rlfuse.errors import one_of, require
from rlfuse.plugins._data.pairs import split_pairs

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "simpo")
Tensor = torch.Tensor


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> Tensor:
    """Per-pair losses (shape ``[B]``, float32) of the DPO family; formulas in the module doc.

    :param policy_chosen_logps: (B,) log pi(y_c | x) summed over the answer's tokens (for
        ``simpo``: the length-normalised, i.e. per-token mean, log-prob).
    :param policy_rejected_logps: (B,) the same for the rejected answer.
    :param ref_chosen_logps: (B,) log pi_ref(y_c | x); ignored (may be None) for ``simpo``.
    :param ref_rejected_logps: (B,) log pi_ref(y_r | x); ignored (may be None) for ``simpo``.
    :param beta: inverse temperature (DPO/cDPO/rDPO/SLiC/SimPO) or regulariser tau (IPO); > 0.
    :param loss_type: one of ``sigmoid, robust, ipo, hinge, simpo``.
    :param label_smoothing: eps: cDPO's smoothing (``sigmoid``, ``simpo``) or rDPO's
        label-noise rate (``robust``); must be 0 for ``ipo`` and ``hinge``.
    :param simpo_gamma: SimPO's target reward margin gamma (``simpo`` only).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got '{loss_type}'")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    eps = float(label_smoothing)
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {eps}")
    if eps and loss_type in ("ipo", "hinge"):
        raise ValueError(f"label_smoothing is not defined for loss_type='{loss_type}'")
    pc, pr = policy_chosen_logps.float(), policy_rejected_logps.float()
    if loss_type == "simpo":
        z = beta * (pc - pr) - simpo_gamma
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"loss_type='{loss_type}' needs reference log-probs")
    h = (pc - ref_chosen_logps.float()) - (pr - ref_rejected_logps.float())
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return torch.relu(1 - beta * h)  # hinge


@dataclass
class Config:
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | robust | ipo | hinge | simpo
    label_smoothing: float = 0.0  # cDPO smoothing (sigmoid, simpo) / rDPO noise rate (robust)
    simpo_gamma: float = 0.5  # SimPO target margin
    cache_reference: bool = True  # keep each pair's reference log-probs after first use
    precompute_reference: bool = False  # score every pair before training, then free the reference
    eval_batch_size: int = 64  # pairs per forward in evaluate
    eval_pairs: int = 200  # first N held-out pairs (0 = no evaluation)

    def __post_init__(self) -> None:
        one_of("loss_type", self.loss_type, LOSS_TYPES)
        require(self.beta > 0, "beta", "> 0", self.beta)
        require(0.0 <= self.label_smoothing < 0.5, "label_smoothing", "in [0, 0.5)", self.label_smoothing)
        require(not (self.label_smoothing and self.loss_type in ("ipo", "hinge")), "label_smoothing",
                f"0 for loss_type={self.loss_type} (not defined there)", self.label_smoothing)
        require(self.eval_batch_size >= 1, "eval_batch_size", ">= 1", self.eval_batch_size)
        require(self.eval_pairs >= 0, "eval_pairs", ">= 0", self.eval_pairs)


def pair_logps(logprobs: Tensor, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Split a concatenated pair batch: summed response log-probs and lengths per side.

    :returns: (pairs, chosen_logps, rejected_logps, chosen_len, rejected_len), each (P,),
        ordered by pair id. Raises if a pair's two rows are not both in ``batch``.
    """
    ids, c, r = split_pairs(batch, logprobs.device, "DPO")
    seq = (logprobs * batch.response_mask).sum(-1)  # (2P,)
    length = batch.response_mask.sum(-1).clamp_min(1)
    return ids, seq[c], seq[r], length[c], length[r]


class Plugin:
    Config = Config

    def __init__(self, cfg: Config, name: str = "dpo") -> None:
        self.cfg = cfg
        self.name = name
        self.reference_free = cfg.loss_type == "simpo"
        self.cache: dict[Any, tuple[float, float]] = {}  # pair key -> (ref_c, ref_r)
        self._ref_id: int | None = None
        self.eval_items: list[Any] = []
        self._needs_precompute = cfg.precompute_reference and not self.reference_free

    # -- reference log-probs -------------------------------------------------------
    def _ref(self, ctx: Any, batch: Batch, keys: list[Any]) -> tuple[Tensor, Tensor]:
        """(P,) reference log-probs per side, ordered by pair id; cached per pair key."""
        if self._ref_id == -1 and not all(k in self.cache for k in keys):
            raise RuntimeError(
                "precompute_reference=true freed the reference model, but a pair outside the "
                "training and held-out data needs reference log-probs"
            )
        if self.cfg.cache_reference:
            if ctx.has_reference and ctx.reference_version != self._ref_id:
                if self._ref_id is not None:
                    self.cache.clear()  # the reference changed (e.g. refreshed by a sync plugin)
                self._ref_id = ctx.reference_version
            if all(k in self.cache for k in keys):
                c, r = zip(*(self.cache[k] for k in keys), strict=False)
                dev = batch.input_ids.device
                return torch.tensor(c, device=dev), torch.tensor(r, device=dev)
        with torch.no_grad():
            out = ctx.forward(batch, model=ctx.reference)
        _, rc, rr, _, _ = pair_logps(out.logprobs.float(), batch)
        if self._ref_id is None:
            self._ref_id = ctx.reference_version
        if self.cfg.cache_reference:
            for k, c, r in zip(keys, rc.tolist(), rr.tolist(), strict=False):
                self.cache[k] = (c, r)
        return rc, rr

    def _keys(self, batch: Batch, pairs: Tensor) -> list[Any]:
        key = batch.extras.get("pair_key")
        if key is None:
            return [None] * len(pairs)
        is_c = batch.extras["chosen"].bool().tolist()
        by_pair = {int(p): k for p, k, c in zip(batch.extras["pair"].tolist(), key, is_c, strict=False) if c}
        return [by_pair[int(p)] for p in pairs.tolist()]

    def _precompute(self, ctx: Any) -> None:
        from rlfuse.plugins._data.pairs import pair_batch

        items = list(ctx.train_records) + list(self.eval_items)
        bs = self.cfg.eval_batch_size
        for s in range(0, len(items), bs):
            chunk = items[s : s + bs]
            b = pair_batch(chunk, ctx.tokenizer, ctx.cfg.data.max_length, ctx.device)
            pairs = b.extras["pair"][b.extras["chosen"].bool()]
            keys = self._keys(b, pairs.sort().values)
            if not all(k in self.cache for k in keys):
                self._ref(ctx, b, keys)
        ctx.drop_reference()
        self._ref_id = -1  # stays valid: the cache now stands in for the reference
        ctx.record({"pref/precomputed_pairs": len(self.cache)})

    # -- hooks ---------------------------------------------------------------------
    @hookimpl
    def save_state(self) -> dict[str, Any]:
        """The cached reference log-probs: a resumed run reuses exactly the numbers the
        interrupted one computed (and needs no reference at all after a precompute)."""
        return {f"loss.{self.name}": {"cache": dict(self.cache), "precomputed": self._ref_id == -1,
                                      "needs_precompute": self._needs_precompute}}

    @hookimpl
    def load_state(self, state: dict[str, Any]) -> None:
        s = state.get(f"loss.{self.name}")
        if s:
            self.cache = dict(s["cache"])
            self._ref_id = -1 if s["precomputed"] else None
            self._needs_precompute = s["needs_precompute"]

    @hookimpl
    def setup(self, ctx: Any) -> None:
        from rlfuse.plugins._data.pairs import load_pairs

        ctx.require_forward(logprobs=True)  # the pair log-ratios read the shared forward's log-probs

        path = ctx.cfg.data.eval_preferences
        if path and self.cfg.eval_pairs:
            self.eval_items = load_pairs(ctx, path)[: self.cfg.eval_pairs]

    def _scores(self, ctx: Any, batch: Batch, out_logprobs: Tensor) -> dict[str, Tensor]:
        pairs, pc, pr, lc, lr = pair_logps(out_logprobs, batch)
        if self.reference_free:
            ac, ar = pc / lc, pr / lr
            losses = preference_loss(
                ac, ar, None, None, beta=self.cfg.beta, loss_type="simpo",
                label_smoothing=self.cfg.label_smoothing, simpo_gamma=self.cfg.simpo_gamma,
            )
            rew_c, rew_r = self.cfg.beta * ac.detach(), self.cfg.beta * ar.detach()
        else:
            rc, rr = self._ref(ctx, batch, self._keys(batch, pairs))
            losses = preference_loss(
                pc, pr, rc, rr, beta=self.cfg.beta, loss_type=self.cfg.loss_type,
                label_smoothing=self.cfg.label_smoothing,
            )
            rew_c, rew_r = self.cfg.beta * (pc.detach() - rc), self.cfg.beta * (pr.detach() - rr)
        return {"losses": losses, "rew_c": rew_c, "rew_r": rew_r, "pc": pc.detach(), "pr": pr.detach()}

    @hookimpl
    def loss(self, ctx: Any, batch: Batch) -> LossOutput:
        if self._needs_precompute:
            self._needs_precompute = False
            self._precompute(ctx)
        out = ctx.forward(batch)
        s = self._scores(ctx, batch, out.logprobs)
        n_pairs = batch.totals.get("sequences", float(len(batch))) / 2  # pairs in the mini-batch
        margin = s["rew_c"] - s["rew_r"]
        return LossOutput(
            terms={self.name: s["losses"].sum() / n_pairs},
            metrics={
                "pref/chosen": s["rew_c"].mean(),
                "pref/rejected": s["rew_r"].mean(),
                "pref/margin": margin.mean(),
                "pref/accuracy": (margin > 0).float().mean(),
                "pref/logp_chosen": s["pc"].mean(),
                "pref/logp_rejected": s["pr"].mean(),
            },
        )

    @hookimpl
    def evaluate(self, ctx: Any, step: int) -> dict[str, float] | None:
        if not self.eval_items:
            return None
        from rlfuse.plugins._data.pairs import pair_batch

        if self._needs_precompute:  # before the first step: score the held-out pairs now too
            self._needs_precompute = False
            self._precompute(ctx)
        acc, margins, lp_acc, losses = [], [], [], []
        was = ctx.policy.training
        ctx.policy.eval()
        try:
            for s in range(0, len(self.eval_items), self.cfg.eval_batch_size):
                chunk = self.eval_items[s : s + self.cfg.eval_batch_size]
                b = pair_batch(chunk, ctx.tokenizer, ctx.cfg.data.max_length, ctx.device)
                with torch.no_grad():
                    lp = ctx.forward(b, model=ctx.policy).logprobs.float()
                    sc = self._scores(ctx, b, lp)
                m = sc["rew_c"] - sc["rew_r"]
                acc.append(torch.where(m.abs() < 1e-6, torch.full_like(m, 0.5), (m > 0).float()))
                margins.append(m)
                lp_acc.append((sc["pc"] > sc["pr"]).float())
                losses.append(sc["losses"])
        finally:
            ctx.policy.train(was)

        def mean(xs: list[Tensor]) -> float:
            v = float(torch.cat(xs).mean())
            return v if math.isfinite(v) else float("nan")

        return {
            "eval/pref/accuracy": mean(acc),
            "eval/pref/margin": mean(margins),
            "eval/pref/logp_accuracy": mean(lp_acc),
            f"eval/loss/{self.name}": mean(losses),
        }
