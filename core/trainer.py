"""The training loop: it calls the hooks and does the optimisation work, nothing else.

::

    setup
    evaluate                                  -> eval/*_before
    for step in range(max_steps):
        batch = rollout                       (first result)
        batch.rewards = sum_i w_i * reward_i  (every reward plugin)
        batch.advantages = advantage          (first result)
        for epoch, mini-batch:                (trainer.epochs, trainer.mini_batch_size)
            for micro-batch:                  (trainer.micro_batch_size)
                sum(loss terms).backward()    (every loss plugin)
            clip, optimiser step, sync
        log; evaluate / checkpoint when due
    evaluate                                  -> eval/*_after
    final checkpoint, summary.json, teardown

The core knows no algorithm: what a step computes is entirely the plugins' doing.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from rlfuse import distributed, fsdp, hostmem, models, runinfo, stops
from rlfuse.checkpoint import (
    check_config,
    load_checkpoint,
    merge,
    resume_point,
    save_checkpoint,
    save_policy,
)
from rlfuse.config import check_ranges
from rlfuse.data import Batch, ForwardOutput, LossOutput
from rlfuse.errors import NonFiniteError
from rlfuse.manager import PluginError, PluginManager, check_sections, load_plugins
from rlfuse.metrics import finite_or_none
from rlfuse.precision import Precision


class Context:
    """What every hook receives: the config, the models and a few services of the core.

    Plugins use only the public attributes and methods below (docs/hooks.md lists them);
    they never reach into ``ctx._private`` state or fetch other plugins out of ``ctx.pm``.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, pm: PluginManager) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.pm = pm
        self.hook = pm.hook
        self.device = resolve_device(cfg.trainer.device)
        self.precision = Precision.from_config(cfg, self.device)  # autocast, optimiser
        self.step = 0
        self.tokenizer: Any = None
        self.policy: nn.Module = None  # type: ignore[assignment]
        self.modules = nn.ModuleDict()  # extra trainable modules (value head, ...)
        self._module_lrs: dict[str, float | None] = {}
        self._reference: nn.Module | None = None
        self._reference_version = 0
        self._initial_policy: Any = None  # set by a resume: rebuilds the policy as it started
        self._forward_needs = {"entropy": False, "hidden": False}
        self._head_readers = 0  # plugins that take head inputs instead of log-probs
        self._logprob_readers = False  # a plugin declared it reads log-probs (or entropy) itself
        self._train_records: list[Any] = []
        self.metrics: dict[str, float] = {}  # extra metrics for the current step
        self.reward_weights: dict[str, float] = {}
        self.run_info = runinfo.current()  # sweep group and overrides of this job (rlfuse.runinfo)
        self.batch: Batch | None = None  # this step's rollout batch, rewarded, with advantages
        self.dist = distributed.current()  # rank, world size, deadline-guarded collectives
        self.stop_reason: str | None = None  # set by request_stop

    # -- models ----------------------------------------------------------------------
    @property
    def reference(self) -> nn.Module:
        """The frozen reference policy, built on first use (a copy of the initial policy,
        or ``model.ref_name_or_path``)."""
        if self._reference is None:
            mcfg = self.cfg.model
            if models.is_peft(self.policy) and not mcfg.ref_name_or_path:  # LoRA: adapters off, no copy
                self._reference = models.AdapterDisabled(self.policy)  # not set_reference: it would freeze the adapters
                self._reference_version += 1
                return self._reference
            if mcfg.ref_name_or_path:
                ref = models.load_pretrained(mcfg.ref_name_or_path, mcfg)
                ref = models.frozen_copy(ref)
            else:
                initial = self._initial_policy
                if initial is None and fsdp.root_of(self.policy) is not None:  # sharded: rebuilt, never copied
                    initial = lambda: models.load_policy(mcfg, self.tokenizer, self.cfg.seed)  # noqa: E731
                ref = models.frozen_copy(initial() if initial else self.policy)
            ref_dtype = self.precision.reference_dtype(mcfg.ref_dtype)
            if ref_dtype:
                ref = ref.to(models.torch_dtype(ref_dtype, "model.ref_dtype"))
            self.set_reference(ref)
        return self._reference  # type: ignore[return-value]

    @property
    def has_reference(self) -> bool:
        """Whether the reference model is in memory now (reading ``reference`` builds it)."""
        return self._reference is not None

    @property
    def reference_version(self) -> int:
        """A counter that changes whenever the reference model is built or replaced (0 = never
        built), so a plugin caching reference results knows when they went stale."""
        return self._reference_version

    def set_reference(self, model: nn.Module) -> None:
        """Replace the frozen reference (a sync plugin refreshing it, a resume restoring it)."""
        model.eval().requires_grad_(False)
        self._reference = model.to(self.device)
        self._reference_version += 1

    def drop_reference(self) -> None:
        """Free the reference model (e.g. after its log-probs were all precomputed)."""
        self._reference = None

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's full state dict. With a sharded policy (``trainer.strategy=fsdp``) the
        weights are gathered, so every rank must call it at the same point (teardown, say);
        otherwise it is ``policy.state_dict()``."""
        return fsdp.full_policy_state(self, everywhere=True) or self.policy.state_dict()

    def add_module(self, name: str, module: nn.Module, lr: float | None = None) -> nn.Module:
        """Add a trainable module (optimised with the policy, saved in checkpoints)."""
        if name in self.modules:
            raise PluginError(f"a module named '{name}' was already added")
        self.modules[name] = module.to(self.device)
        self._module_lrs[name] = lr
        return self.modules[name]

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The optimiser's parameter groups: the policy's trainable parameters at ``lr``, then
        each added module at its own lr (or ``lr``)."""
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": lr}]
        for name, module in self.modules.items():
            groups.append({"params": list(module.parameters()), "lr": self._module_lrs[name] or lr})
        return groups

    # -- the shared forward pass -------------------------------------------------------
    @property
    def forward_needs(self) -> dict[str, bool]:
        """What the plugins declared the shared forward must hold (:meth:`require_forward`)."""
        return dict(self._forward_needs)

    def require_forward(
        self, *, entropy: bool = False, hidden: bool = False, logprobs: bool = False, head: bool = False
    ) -> None:
        """Declare, from a plugin's ``setup``, what the shared policy forward must produce.

        The first ``ctx.forward(batch)`` of a micro-batch then computes everything every
        plugin declared, whatever order pluggy calls the loss plugins in.

        :param entropy: the plugin reads ``out.entropy``.
        :param hidden: the plugin reads ``out.hidden`` (B, T, H).
        :param logprobs: the plugin reads ``out.logprobs`` (declare it: it tells the core
            whether a plugin taking head inputs is the only reader of the log-probs).
        :param head: the plugin can compute its term from ``out.head``
            (:class:`~rlfuse.data.HeadInputs`: hidden rows + lm_head, or logits) instead of
            the log-probs, fusing lm_head, log-softmax and its loss (``loss=ppo``). With
            ``kernels.fused_loss=auto`` the shared forward stops before the lm_head when
            exactly one plugin declared ``head`` and no other declared ``logprobs`` or
            ``entropy``; ``true`` does it whenever one plugin declared ``head`` (other
            readers then get log-probs computed from the head inputs); ``false`` never, nor
            under ``trainer.strategy=fsdp`` (the sharded lm_head exists only inside the forward).
            ``entropy`` declared together with ``head`` is the head plugin's own need.
            When no plugin declares ``logprobs``, ``entropy`` or ``head`` (``loss=bradley_terry``
            reads hidden states only) the forward also stops before the lm_head; log-probs
            are then computed only if read.
        """
        self._forward_needs["entropy"] |= entropy
        self._forward_needs["hidden"] |= hidden
        self._head_readers += int(head)
        self._logprob_readers |= logprobs or (entropy and not head)

    def _head_mode(self) -> bool:
        """Whether the shared policy forward stops before the lm_head (see ``require_forward``):
        for the one plugin that takes head inputs, or when no plugin declared reading log-probs
        at all (a reward model reading hidden states: the lm_head then runs only if an
        undeclared reader asks for log-probs)."""
        from rlfuse import fsdp

        mode = str(self.cfg.kernels.get("fused_loss", "auto")).lower()
        # sharded: the lm_head is gathered only inside the root's forward, so it must run there
        sharded = getattr(self, "dist", None) is not None and fsdp.sharded(self)  # (a bare test Context has none)
        if mode == "false" or self._head_readers > 1 or sharded:
            return False
        if self._head_readers == 0:
            return not self._logprob_readers
        return mode == "true" or not self._logprob_readers

    def forward(
        self,
        batch: Batch,
        *,
        model: nn.Module | None = None,
        entropy: bool = False,
        hidden: bool = False,
    ) -> ForwardOutput:
        """Token log-probs (and entropy / final hidden states) of ``batch`` under ``model``.

        With ``model=None`` (the policy, with gradients) the result is computed once per
        micro-batch and shared by every loss plugin; it holds what was asked here plus what
        the plugins declared with :meth:`require_forward`, and ``out.head`` (head inputs,
        log-probs computed from them only when read) when a plugin declared ``head`` and the
        core chose to stop the forward before the lm_head.
        """
        if model is not None:
            return models.forward(model, batch, entropy=entropy, hidden=hidden)
        entropy = entropy or self._forward_needs["entropy"]
        hidden = hidden or self._forward_needs["hidden"]
        cached: ForwardOutput | None = batch.cache.get("forward")
        if (
            cached is None
            or (entropy and not cached.has_entropy)
            or (hidden and cached.hidden is None)
            or torch.is_grad_enabled() != cached.with_grad
        ):
            head = self._head_mode() and torch.is_grad_enabled()
            cached = models.forward(self.policy, batch, entropy=entropy, hidden=hidden, head=head)
            batch.cache["forward"] = cached
        return cached

    def ref_logprobs(self, batch: Batch) -> torch.Tensor:
        """``batch.ref_logprobs`` (B, T) under the reference model, computed once per rollout:
        on a mini- or micro-batch it is computed for the whole batch it was cut from, then
        sliced, so epochs and mini-batches never repeat the reference forward."""
        if batch.ref_logprobs is None:
            root, rows = batch.root_rows()
            if root.ref_logprobs is None:
                with torch.no_grad():
                    out = models.forward(self.reference, root)
                root.ref_logprobs = out.logprobs * root.response_mask
            batch.ref_logprobs = root.ref_logprobs if rows is None else root.ref_logprobs[rows.to(root.ref_logprobs.device)]
        return batch.ref_logprobs

    # -- services between plugins ------------------------------------------------------
    def score(self, batch: Batch, rewards: list[str]) -> dict[str, torch.Tensor]:
        """Scores of ``batch`` by the configured reward components named in ``rewards``
        (``reward.<name>``), unweighted, each summed per sequence: ``{score name: (B,)}``.

        For evaluators that want a reward's opinion of other responses (``eval=task``'s
        ``scorers``); the training rewards are the core's business, not this. A name that is
        not a configured reward raises ``LookupError``.
        """
        chosen = []
        for name in rewards:
            plugin = self.pm.get_plugin(f"reward.{name}")
            if plugin is None:
                configured = sorted(n.split(".", 1)[1] for n, _ in self.pm.list_name_plugin() if n.startswith("reward."))
                raise LookupError(f"'{name}' is not a configured reward (configured: {', '.join(configured) or 'none'})")
            chosen.append(plugin)
        others = [p for p in self.pm.get_plugins() if all(p is not c for c in chosen)]
        caller = self.pm.subset_hook_caller("reward", remove_plugins=others)
        out: dict[str, torch.Tensor] = {}
        for result in caller(ctx=self, batch=batch):
            for k, v in (result or {}).items():
                out[k] = v.float().reshape(len(batch), -1).sum(-1)
        return out

    def set_train_records(self, records: list[Any]) -> None:
        """Called by a data (rollout) plugin at setup with every training record it reads."""
        self._train_records = list(records)

    @property
    def train_records(self) -> list[Any]:
        """The training records the rollout plugin published (empty if none): what a loss
        plugin scores ahead of training (DPO's reference precompute) or after it (the reward
        model's score statistics)."""
        return self._train_records

    def request_stop(self, reason: str) -> None:
        """Ask the trainer to end the run after the current step (early stopping): the final
        evaluation, policy and summary are written as usual; ``summary["stopped"]`` holds
        ``reason`` and ``summary["steps"]`` the steps done. The first request wins."""
        if self.stop_reason is None:
            self.stop_reason = str(reason)
            print(f"[rlfuse] stopping after step {self.step + 1}: {reason}")

    def record(self, metrics: dict[str, Any]) -> None:
        """Add metrics to the current step's log line."""
        for k, v in metrics.items():
            self.metrics[k] = _float(v)


# ------------------------------------------------------------------------- helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def _float(v: Any) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().mean())
    return float(v)


def lr_factor(step: int, cfg: DictConfig) -> float:
    """Warm-up then constant / cosine / linear decay, in training steps."""
    t = cfg.trainer
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    span = max(1, t.max_steps - t.warmup_steps)
    frac = min(1.0, max(0.0, (step - t.warmup_steps) / span))
    if t.schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * frac))
    elif t.schedule == "linear":
        decay = 1 - frac
    else:
        raise ValueError(f"trainer.schedule must be constant, cosine or linear; got '{t.schedule}'")
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay


def fused_adamw(cfg: DictConfig, params: list[nn.Parameter]) -> bool | None:
    """``trainer.fused_optimizer``; null = fused for a pretrained model (transformers' and TRL's
    default: the plain per-parameter loop is a fifth of a 135M model's CPU step) and plain for
    the tiny one, whose seeded figures the docs quote. Fused needs float params on CPU/CUDA."""
    want = cfg.trainer.get("fused_optimizer")
    if want is None:
        want = cfg.model.name_or_path is not None
    ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if (want and ok) else None


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    # strict JSON: a non-finite number is written as null (docs/reliability.md)
    tmp.write_text(json.dumps(finite_or_none(data), indent=2, sort_keys=True, default=_float, allow_nan=False))
    os.replace(tmp, path)


# ------------------------------------------------------------------------- the loop


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run one training job described by ``cfg``; return the summary.

    SIGINT/SIGTERM during training finish the current step, write a checkpoint and raise
    :class:`~rlfuse.errors.Interrupted` (see :mod:`rlfuse.stops`).
    """
    with stops.catch_signals() as stop:
        return _train(cfg, run_dir, stop)


def _train(cfg: DictConfig, run_dir: str | Path | None, stop: stops.StopSignals) -> dict[str, Any]:
    from rlfuse import kernels

    run_dir = Path(run_dir or cfg.run_dir or "outputs/run")
    check_ranges(cfg)
    dist = distributed.init_from(cfg)
    cfg = distributed.for_rank(cfg, dist.rank)  # heterogeneous agents: algo.agents[rank]
    check_sections(cfg)  # every plugin's options, before anything is written
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = resume_point(cfg, run_dir)
    changes = check_config(cfg, ckpt) if ckpt is not None else {}
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    kernels.set_default_backend(cfg.kernels.backend)
    models.configure(cfg.model)
    seed_everything(cfg.seed + dist.rank)  # distinct rollouts per rank
    if dist.is_main:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    pm = PluginManager()
    ctx = Context(cfg, run_dir, pm)
    hostmem.apply(cfg.trainer.host_memory, ctx.device)
    ctx.reward_weights = {k: float(w) for k, w in load_plugins(cfg, pm)["weight"].items()}
    ctx.tokenizer = models.load_tokenizer(cfg.model)
    ctx.policy = models.load_policy(cfg.model, ctx.tokenizer, cfg.seed).to(ctx.device)
    ctx.precision.prepare(ctx.policy)
    ctx.hook.setup(ctx=ctx)
    ctx.precision.prepare(ctx.modules)  # heads added in setup train in the masters' dtype too
    distributed.prepare(ctx)  # same initial weights on every rank

    groups = ctx.param_groups(cfg.algo.lr)
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = ctx.precision.optimizer(
        groups, betas=tuple(cfg.trainer.betas), eps=cfg.trainer.eps, weight_decay=cfg.trainer.weight_decay,
        **({"fused": fused_adamw(cfg, [p for g in groups for p in g["params"]])} if ctx.precision.mode != "bf16-true" else {}),
    )

    start, summary, state = 0, {}, {}
    if ckpt is not None:
        start, state = load_checkpoint(ctx, opt, ckpt)
        summary = dict(state.get("summary", {}))
        print(f"[rlfuse] resumed from {ckpt} (step {start})")
        if changes:
            _record_changes(ctx, start, changes, summary)
    counters = dict(state.get("counters", {"skipped_steps": 0}))
    skip_mode = cfg.trainer.nonfinite == "skip"

    params = [p for g in groups for p in g["params"]]
    t0 = time.perf_counter()
    if start == 0:
        summary.update(_evaluate(ctx, 0, before=True))
    eval_metrics: dict[str, float] = {}
    total_tokens = 0
    for step in range(start, cfg.trainer.max_steps):
        ctx.step = step
        ctx.metrics = {}
        step_t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, cfg)
        metrics = _train_step(ctx, opt, params, step)
        counters["skipped_steps"] += int(metrics.pop("_skipped", 0))
        if skip_mode:
            metrics["optim/skipped_steps"] = counters["skipped_steps"]
        elapsed = time.perf_counter() - step_t0
        metrics["perf/step_time"] = elapsed
        metrics["perf/tokens_per_s"] = metrics.pop("_tokens") / elapsed
        total_tokens += metrics["perf/tokens_per_s"] * elapsed
        metrics["optim/lr"] = opt.param_groups[0]["lr"]
        metrics.update(ctx.metrics)
        metrics = distributed.reduce_step_metrics(ctx, metrics)
        metrics["step"] = step + 1
        if ctx.dist.is_main:
            ctx.hook.log(ctx=ctx, step=step + 1, metrics=metrics)
        ctx.batch = None  # loggers have seen it; free it before the next rollout
        summary["last"] = metrics
        last = step + 1 == cfg.trainer.max_steps
        if cfg.trainer.eval_every and (step + 1) % cfg.trainer.eval_every == 0 and not last:
            _evaluate(ctx, step + 1)
        if stop.requested:
            stop.exit(_save_checkpoint(ctx, opt, step + 1, {"summary": summary, "counters": counters}), step + 1)
        if cfg.trainer.save_every and (step + 1) % cfg.trainer.save_every == 0 and not last:
            _save_checkpoint(ctx, opt, step + 1, {"summary": summary, "counters": counters})
        if ctx.dist.enabled:  # a stop requested on one rank ends every rank after the same step
            asked = ctx.dist.all_reduce(torch.tensor([float(ctx.stop_reason is not None)]), op="max", what="stop request")
            if asked[0] > 0 and ctx.stop_reason is None:
                ctx.stop_reason = "requested by another rank"
        if ctx.stop_reason is not None:
            done_steps = step + 1
            break
    else:
        done_steps = cfg.trainer.max_steps

    ctx.step = done_steps
    if not (state.get("final") and start >= done_steps):  # else: evaluated before the final checkpoint
        eval_metrics = _evaluate(ctx, done_steps)
        summary.update({f"{k}_after": v for k, v in eval_metrics.items()})
    if ctx.stop_reason is not None:
        summary["stopped"] = ctx.stop_reason
    if any(ctx.hook.consolidate(ctx=ctx)):  # e.g. the decentralized consensus average
        merged = _evaluate(ctx, done_steps, prefix="eval/consolidated/")
        summary.update({f"{k}_after": v for k, v in merged.items()})
        summary["consolidated"] = True
    if skip_mode:
        summary["skipped_steps"] = counters["skipped_steps"]
    summary.update(
        {
            "steps": done_steps,
            "train_time_s": time.perf_counter() - t0,
            "tokens": total_tokens,
            "algo": cfg.algo.name,
            "final_policy": str(run_dir / "final"),
        }
    )
    policy_state = fsdp.full_policy_state(ctx)  # sharded: gathered to rank 0 (every rank calls)
    if ctx.dist.is_main:
        save_policy(ctx, run_dir / "final", dtype=cfg.trainer.save_dtype, state_dict=policy_state)
        if cfg.model.lora.r and cfg.model.lora.merge_final:
            models.save_merged(ctx.policy, ctx.tokenizer, run_dir / "final" / "merged", cfg.trainer.save_dtype)
    if cfg.trainer.save_every:
        _save_checkpoint(ctx, opt, done_steps, {"summary": summary, "counters": counters, "final": True})
    with fsdp.gathered(ctx):  # sharded: teardown sees (and may save) the full weights
        ctx.hook.teardown(ctx=ctx, summary=summary)
    if ctx.dist.is_main:
        write_json_atomic(run_dir / "summary.json", summary)
    ctx.dist.barrier("end of run")  # no rank reads final/ or summary.json before they exist
    return summary


def _record_changes(ctx: Context, step: int, changes: dict[str, tuple[Any, Any]], summary: dict[str, Any]) -> None:
    """A resume allowed to change the config (``trainer.resume_allow_changes``) says so: on the
    console, in ``summary.json`` and as ``run/resume_changes`` in the metrics."""
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
    print(f"[rlfuse] warning: resuming with a changed config (trainer.resume_allow_changes=true): {listed}")
    summary.setdefault("resume_changes", []).append({"step": step, "changes": {k: list(v) for k, v in changes.items()}})
    if ctx.dist.is_main:
        ctx.hook.log(ctx=ctx, step=step, metrics={"step": step, "run/resume_changes": float(len(changes))})


def _nonfinite(ctx: Context, step: int, what: str) -> bool:
    """A reward, loss term or gradient norm was NaN/Inf: raise (``trainer.nonfinite=stop``) or
    warn and return True, the update to be skipped (``skip``)."""
    if ctx.cfg.trainer.nonfinite == "stop":
        raise NonFiniteError(
            f"step {step + 1}: {what} is not finite (NaN/Inf). trainer.nonfinite=stop: the run stops before "
            "the weights are updated with it, and writes no final/ (trainer.nonfinite=skip skips such updates)"
        )
    print(f"[rlfuse] warning: step {step + 1}: {what} is not finite (NaN/Inf); update skipped (optim/skipped_steps)")
    return True


def _save_checkpoint(ctx: Context, opt: torch.optim.Optimizer, step: int, state: dict[str, Any]) -> Path:
    """Every rank writes its part of the checkpoint (rank 0 the folder) and waits until it is complete."""
    return save_checkpoint(ctx, opt, step, state)


def _evaluate(ctx: Context, step: int, before: bool = False, prefix: str = "") -> dict[str, Any]:
    with ctx.precision.autocast(), fsdp.gathered(ctx):  # sharded: gathered once, no collective inside
        results = merge(ctx.hook.evaluate(ctx=ctx, step=step))
    with ctx.precision.autocast():
        results = distributed.reduce_eval_metrics(ctx, results, prefix)
    if results and ctx.dist.is_main:
        ctx.hook.log(ctx=ctx, step=step, metrics={"step": step, **results})
    if before:
        return {f"{k}_before": v for k, v in results.items()}
    return results


def _train_step(ctx: Context, opt: torch.optim.Optimizer, params: list[nn.Parameter], step: int) -> dict[str, float]:
    cfg = ctx.cfg.trainer
    ctx.policy.train()
    with ctx.precision.autocast(), fsdp.gathered(ctx):  # sharded: generation needs the full weights
        batch = ctx.hook.rollout(ctx=ctx, step=step)
    if batch is None:
        raise PluginError("no rollout plugin returned a batch (is `rollout` configured?)")
    metrics: dict[str, float] = {}
    with ctx.precision.autocast():
        _apply_rewards(ctx, batch, metrics)
    bad = [k[len("reward/") : -len("/mean")] for k, v in metrics.items() if k.endswith("/mean") and k.count("/") == 2 and not math.isfinite(v)]
    if bad and _nonfinite(ctx, step, f"the reward of {', '.join(repr(b) for b in bad)}"):
        metrics.update({"_skipped": 1, "_tokens": float(batch.num_tokens), "optim/updates": 0})
        metrics["response/length_mean"] = float(batch.response_lengths().float().mean())
        return metrics
    with ctx.precision.autocast():
        adv = ctx.hook.advantage(ctx=ctx, batch=batch)
    if adv is not None:
        batch.advantages, batch.returns = adv.advantages, adv.returns
        metrics.update({k: _float(v) for k, v in adv.metrics.items()})
    ctx.batch = batch

    n = len(batch)
    mini = cfg.mini_batch_size or n
    micro = cfg.micro_batch_size or mini
    sums: dict[str, float] = defaultdict(float)  # summed over optimiser steps
    n_updates = n_minibatches = skipped = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n) if cfg.shuffle else torch.arange(n)
        for s in range(0, n, mini):
            mb = batch.select(order[s : s + mini])
            totals = distributed.batch_totals(ctx, mb)  # global counts under data parallelism
            step_terms: dict[str, float] = defaultdict(float)
            skip = False
            for part in mb.split(micro):
                part.totals = totals
                sources: dict[str, str] = {}
                with ctx.precision.autocast(cache=False):  # no bf16 weight copies kept (core/precision.py)
                    terms, stats = _collect_losses(ctx, part, sources)
                bad = [k for k, v in terms.items() if not bool(torch.isfinite(v.detach()).all())]
                if bad:  # never back-propagated: the gradients stay finite
                    what = ", ".join(f"loss term '{k}' (from {sources.get(k) or 'a loss plugin'})" for k in bad)
                    skip = _nonfinite(ctx, step, what)
                else:
                    ctx.precision.backward(sum(terms.values()))
                for k, v in terms.items():
                    step_terms[k] += float(v.detach())
                for k, v in stats.items():  # row-weighted mean over micro-batches
                    sums[k] += _float(v) * len(part) / len(mb)
            for k, v in step_terms.items():
                sums[f"loss/{k}"] += v
            sums["loss/total"] += sum(step_terms.values())
            distributed.reduce_gradients(ctx, params)
            ctx.precision.unscale(opt)  # fp16: true gradients before the checks and the clip
            if ctx.dist.enabled:  # every rank skips, or none: a skipped update must not split the ranks
                skip = bool(ctx.dist.all_reduce(torch.tensor([float(skip)]), op="max", what="non-finite check")[0] > 0)
            ctx.hook.before_step(ctx=ctx, step=step)
            if cfg.max_grad_norm:
                gn = fsdp.clip_grad_norm_(ctx, params, cfg.max_grad_norm)
                sums["optim/grad_norm"] += float(gn)
            elif not skip:
                gn = fsdp.grad_norm(ctx, params)
            overflow = False
            if not skip and not math.isfinite(float(gn)) and ctx.precision.scaler is not None:
                overflow = True  # fp16 loss-scale overflow: scaler.step skips the update, update() lowers the scale
                ctx.precision.step(opt)
            elif not skip and not math.isfinite(float(gn)):
                skip = _nonfinite(ctx, step, f"the gradient norm ({float(gn)})")
            if skip:  # neither the weights nor the optimiser state see it
                skipped += 1
                if ctx.precision.scaler is not None:
                    ctx.precision.scaler.update()  # unscale_ was called: close the scaler's step
            elif overflow:
                skipped += 1
            else:
                ctx.precision.step(opt)
                n_updates += 1
            opt.zero_grad(set_to_none=True)
            n_minibatches += 1
            ctx.hook.sync(ctx=ctx, step=step)
    for k, v in sums.items():
        metrics[k] = v / n_minibatches
    metrics["optim/updates"] = n_updates
    if skipped:
        metrics["_skipped"] = 1
    metrics["response/length_mean"] = float(batch.response_lengths().float().mean())
    metrics["_tokens"] = float(batch.num_tokens * cfg.epochs)
    metrics["_rows"] = float(len(batch))
    return metrics


def _collect_losses(
    ctx: Context, batch: Batch, sources: dict[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every loss plugin's terms and statistics; ``sources`` (if given) gets term -> plugin."""
    terms: dict[str, torch.Tensor] = {}
    stats: dict[str, Any] = {}
    for out in ctx.hook.loss(ctx=ctx, batch=batch):
        if out is None:
            continue
        if isinstance(out, LossOutput):
            new_terms, new_stats = out.terms, out.metrics
        else:
            new_terms, new_stats = out, {}
        for k, v in new_terms.items():
            if k in terms:
                raise PluginError(f"two loss plugins returned a term named '{k}'")
            terms[k] = v
            if sources is not None:
                sources[k] = getattr(out, "source", "")
        stats.update(new_stats)
    if not terms:
        raise PluginError("no loss plugin returned a term (is `loss` configured?)")
    return terms, stats


def _apply_rewards(ctx: Context, batch: Batch, metrics: dict[str, float]) -> None:
    seq: torch.Tensor | None = None
    tok: torch.Tensor | None = None
    for out in ctx.hook.reward(ctx=ctx, batch=batch):
        for name, scores in (out or {}).items():
            scores = scores.detach().float().to(batch.input_ids.device)
            w = ctx.reward_weights.get(name, 1.0)
            if scores.shape == (len(batch),):
                seq = w * scores if seq is None else seq + w * scores
                per_seq = scores
            elif scores.shape == batch.input_ids.shape:
                tok = w * scores if tok is None else tok + w * scores
                per_seq = (scores * batch.response_mask).sum(-1)
            else:
                raise PluginError(
                    f"reward '{name}' returned shape {tuple(scores.shape)}; expected (B,)={len(batch)} "
                    f"or (B, T)={tuple(batch.input_ids.shape)}"
                )
            batch.extras[f"reward/{name}"] = per_seq  # (B,) unweighted, for loggers' sample tables
            metrics[f"reward/{name}/mean"] = float(per_seq.mean())
            metrics[f"reward/{name}/std"] = float(per_seq.std()) if len(per_seq) > 1 else 0.0
    if seq is None and tok is None:
        return
    batch.rewards = seq
    batch.token_rewards = tok
    total = (seq if seq is not None else 0) + ((tok * batch.response_mask).sum(-1) if tok is not None else 0)
    metrics["reward/mean"] = float(total.mean())
    metrics["reward/std"] = float(total.std()) if len(batch) > 1 else 0.0
