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
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from rlfuse import models
from rlfuse.config import MULTI_GROUPS, SINGLE_GROUPS
from rlfuse.data import Batch, ForwardOutput, LossOutput
from rlfuse.manager import PluginError, PluginManager, instantiate, resolve


class Context:
    """What every hook receives: the config, the models and a few services of the core."""

    def __init__(self, cfg: DictConfig, run_dir: Path, pm: PluginManager) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.pm = pm
        self.hook = pm.hook
        self.device = resolve_device(cfg.trainer.device)
        self.step = 0
        self.tokenizer: Any = None
        self.policy: nn.Module = None  # type: ignore[assignment]
        self.modules = nn.ModuleDict()  # extra trainable modules (value head, ...)
        self._module_lrs: dict[str, float | None] = {}
        self._reference: nn.Module | None = None
        self.metrics: dict[str, float] = {}  # extra metrics for the current step
        self.reward_weights: dict[str, float] = {}
        self.stop_reason: str | None = None  # set by request_stop

    # -- models ----------------------------------------------------------------------
    @property
    def reference(self) -> nn.Module:
        """The frozen reference policy, built on first use (a copy of the initial policy,
        or ``model.ref_name_or_path``)."""
        if self._reference is None:
            mcfg = self.cfg.model
            if mcfg.ref_name_or_path:
                ref = models.load_pretrained(mcfg.ref_name_or_path, mcfg)
                ref = models.frozen_copy(ref)
            else:
                ref = models.frozen_copy(self.policy)
            self._reference = ref.to(self.device)
        return self._reference

    def drop_reference(self) -> None:
        """Free the reference model (e.g. after its log-probs were all precomputed)."""
        self._reference = None

    def add_module(self, name: str, module: nn.Module, lr: float | None = None) -> nn.Module:
        """Add a trainable module (optimised with the policy, saved in checkpoints)."""
        if name in self.modules:
            raise PluginError(f"a module named '{name}' was already added")
        self.modules[name] = module.to(self.device)
        self._module_lrs[name] = lr
        return self.modules[name]

    def forward(
        self,
        batch: Batch,
        *,
        model: nn.Module | None = None,
        entropy: bool = False,
        hidden: bool = False,
    ) -> ForwardOutput:
        """Token log-probs (and entropy / final hidden states) of ``batch`` under ``model``.

        With ``model=None`` (the policy, with gradients) the result -- log-probs, entropy and
        hidden states -- is computed once per micro-batch and shared by every loss plugin.
        """
        if model is not None:
            return models.forward(model, batch, entropy=entropy, hidden=hidden)
        entropy = True
        cached: ForwardOutput | None = batch.cache.get("forward")
        if (
            cached is None
            or (entropy and cached.entropy is None)
            or (hidden and cached.hidden is None)
            or torch.is_grad_enabled() != cached.logprobs.requires_grad
        ):
            cached = models.forward(self.policy, batch, entropy=entropy, hidden=hidden)
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


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_float))
    os.replace(tmp, path)


def load_plugins(cfg: DictConfig, pm: PluginManager) -> dict[str, float]:
    """Register the plugin of every component section; return the reward weights."""
    weights: dict[str, float] = {}
    for group in SINGLE_GROUPS + MULTI_GROUPS:
        node = cfg.get(group) or {}
        sections = {group: node} if group in SINGLE_GROUPS else dict(node)
        if group in SINGLE_GROUPS and not node:
            continue
        for key, section in sections.items():
            if section is None:
                continue
            where = group if group in SINGLE_GROUPS else f"{group}.{key}"
            opts = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
            if not isinstance(opts, dict) or "plugin" not in opts:
                raise PluginError(f"Config error at '{where}': missing 'plugin' (an entry-point name or dotted path)")
            name = opts.pop("plugin")
            if group == "reward":
                weights[str(key)] = float(opts.pop("weight", 1.0))
            inst_name = name if group in SINGLE_GROUPS else str(key)
            plugin = instantiate(resolve(name), opts, name=inst_name, where=where)
            pm.register_plugin(plugin, name=where)
    return weights


# ------------------------------------------------------------------------- checkpoints


def save_policy(ctx: Context, folder: Path) -> None:
    """Write a ``save_pretrained`` folder (+ extra modules) atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ctx.policy.save_pretrained(tmp)
    ctx.tokenizer.save_pretrained(tmp)
    if len(ctx.modules):
        torch.save(ctx.modules.state_dict(), tmp / "rlfuse_modules.pt")
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(ctx: Context, opt: torch.optim.Optimizer, step: int, state: dict[str, Any]) -> Path:
    ckpt_dir = ctx.run_dir / "checkpoints"
    folder = ckpt_dir / f"step_{step:07d}"
    save_policy(ctx, folder)
    trainer_state = {
        "step": step,
        "optimizer": opt.state_dict(),
        "plugins": _merge(ctx.hook.save_state(ctx=ctx)),
        "rng": {"torch": torch.random.get_rng_state(), "python": random.getstate()},
        **state,
    }
    if torch.cuda.is_available():
        trainer_state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    tmp = folder / "trainer_state.pt.tmp"
    torch.save(trainer_state, tmp)
    os.replace(tmp, folder / "trainer_state.pt")
    for old in sorted(ckpt_dir.glob("step_*"))[:-2]:  # keep the last two
        if old.suffix not in (".tmp", ".old"):
            shutil.rmtree(old, ignore_errors=True)
    return folder


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = [p for p in sorted((run_dir / "checkpoints").glob("step_*")) if (p / "trainer_state.pt").exists()]
    return done[-1] if done else None


def _merge(dicts: list[dict[str, Any] | None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in dicts:
        if d:
            out.update(d)
    return out


# ------------------------------------------------------------------------- the loop


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run one training job described by ``cfg``; return the summary."""
    from rlfuse import kernels

    run_dir = Path(run_dir or cfg.run_dir or "outputs/run")
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    kernels.set_default_backend(cfg.kernels.backend)
    seed_everything(cfg.seed)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    pm = PluginManager()
    ctx = Context(cfg, run_dir, pm)
    ctx.reward_weights = load_plugins(cfg, pm)
    ctx.tokenizer = models.load_tokenizer(cfg.model)
    ctx.policy = models.load_policy(cfg.model, ctx.tokenizer, cfg.seed).to(ctx.device)
    ctx.hook.setup(ctx=ctx)

    groups = [{"params": [p for p in ctx.policy.parameters() if p.requires_grad], "lr": cfg.algo.lr}]
    for name, module in ctx.modules.items():
        groups.append({"params": list(module.parameters()), "lr": ctx._module_lrs[name] or cfg.algo.lr})
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(
        groups, betas=tuple(cfg.trainer.betas), eps=cfg.trainer.eps, weight_decay=cfg.trainer.weight_decay
    )

    start, summary = 0, {}
    if cfg.trainer.resume and (ckpt := latest_checkpoint(run_dir)) is not None:
        start, summary = _resume(ctx, opt, ckpt)

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
        elapsed = time.perf_counter() - step_t0
        metrics["perf/step_time"] = elapsed
        metrics["perf/tokens_per_s"] = metrics.pop("_tokens") / elapsed
        total_tokens += metrics["perf/tokens_per_s"] * elapsed
        metrics["optim/lr"] = opt.param_groups[0]["lr"]
        metrics.update(ctx.metrics)
        metrics["step"] = step + 1
        ctx.hook.log(ctx=ctx, step=step + 1, metrics=metrics)
        summary["last"] = metrics
        last = step + 1 == cfg.trainer.max_steps
        if cfg.trainer.eval_every and (step + 1) % cfg.trainer.eval_every == 0 and not last:
            _evaluate(ctx, step + 1)
        if cfg.trainer.save_every and (step + 1) % cfg.trainer.save_every == 0 and not last:
            save_checkpoint(ctx, opt, step + 1, {"summary": summary})
        if ctx.stop_reason is not None:
            done_steps = step + 1
            break
    else:
        done_steps = cfg.trainer.max_steps

    ctx.step = done_steps
    eval_metrics = _evaluate(ctx, done_steps)
    summary.update({f"{k}_after": v for k, v in eval_metrics.items()})
    if ctx.stop_reason is not None:
        summary["stopped"] = ctx.stop_reason
    summary.update(
        {
            "steps": done_steps,
            "train_time_s": time.perf_counter() - t0,
            "tokens": total_tokens,
            "algo": cfg.algo.name,
            "final_policy": str(run_dir / "final"),
        }
    )
    save_policy(ctx, run_dir / "final")
    if cfg.trainer.save_every:
        save_checkpoint(ctx, opt, done_steps, {"summary": summary})
    ctx.hook.teardown(ctx=ctx, summary=summary)
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def _evaluate(ctx: Context, step: int, before: bool = False) -> dict[str, Any]:
    results = _merge(ctx.hook.evaluate(ctx=ctx, step=step))
    if results:
        ctx.hook.log(ctx=ctx, step=step, metrics={"step": step, **results})
    if before:
        return {f"{k}_before": v for k, v in results.items()}
    return results


def _resume(ctx: Context, opt: torch.optim.Optimizer, ckpt: Path) -> tuple[int, dict[str, Any]]:
    from transformers import AutoModelForCausalLM

    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
    loaded = AutoModelForCausalLM.from_pretrained(ckpt, dtype=next(ctx.policy.parameters()).dtype)
    ctx.policy.load_state_dict(loaded.state_dict())
    if (ckpt / "rlfuse_modules.pt").exists():
        ctx.modules.load_state_dict(torch.load(ckpt / "rlfuse_modules.pt", map_location=ctx.device))
    opt.load_state_dict(state["optimizer"])
    ctx.hook.load_state(ctx=ctx, state=state.get("plugins", {}))
    torch.random.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"]), dict(state.get("summary", {}))


def _train_step(ctx: Context, opt: torch.optim.Optimizer, params: list[nn.Parameter], step: int) -> dict[str, float]:
    cfg = ctx.cfg.trainer
    ctx.policy.train()
    batch = ctx.hook.rollout(ctx=ctx, step=step)
    if batch is None:
        raise PluginError("no rollout plugin returned a batch (is `rollout` configured?)")
    metrics: dict[str, float] = {}
    _apply_rewards(ctx, batch, metrics)
    adv = ctx.hook.advantage(ctx=ctx, batch=batch)
    if adv is not None:
        batch.advantages, batch.returns = adv.advantages, adv.returns
        metrics.update({k: _float(v) for k, v in adv.metrics.items()})

    n = len(batch)
    mini = cfg.mini_batch_size or n
    micro = cfg.micro_batch_size or mini
    sums: dict[str, float] = defaultdict(float)  # summed over optimiser steps
    n_updates = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n) if cfg.shuffle else torch.arange(n)
        for s in range(0, n, mini):
            mb = batch.select(order[s : s + mini])
            totals = {"tokens": max(float(mb.response_mask.sum()), 1.0), "sequences": float(len(mb))}
            step_terms: dict[str, float] = defaultdict(float)
            for part in mb.split(micro):
                part.totals = totals
                terms, stats = _collect_losses(ctx, part)
                sum(terms.values()).backward()
                for k, v in terms.items():
                    step_terms[k] += float(v.detach())
                for k, v in stats.items():  # row-weighted mean over micro-batches
                    sums[k] += _float(v) * len(part) / len(mb)
            for k, v in step_terms.items():
                sums[f"loss/{k}"] += v
            sums["loss/total"] += sum(step_terms.values())
            if cfg.max_grad_norm:
                gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                sums["optim/grad_norm"] += float(gn)
            opt.step()
            opt.zero_grad(set_to_none=True)
            n_updates += 1
            ctx.hook.sync(ctx=ctx, step=step)
    for k, v in sums.items():
        metrics[k] = v / n_updates
    metrics["optim/updates"] = n_updates
    metrics["response/length_mean"] = float(batch.response_lengths().float().mean())
    metrics["_tokens"] = float(batch.num_tokens * cfg.epochs)
    return metrics


def _collect_losses(ctx: Context, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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
            metrics[f"reward/{name}/mean"] = float(per_seq.mean())
            metrics[f"reward/{name}/std"] = float(per_seq.std()) if len(per_seq) > 1 else 0.0
    if seq is None and tok is None:
        return
    batch.rewards = seq
    batch.token_rewards = tok
    total = (seq if seq is not None else 0) + ((tok * batch.response_mask).sum(-1) if tok is not None else 0)
    metrics["reward/mean"] = float(total.mean())
    metrics["reward/std"] = float(total.std()) if len(batch) > 1 else 0.0
