"""Checkpoints: what a run writes so it can be resumed, and the atomic folder save under it.

A checkpoint is ``<run_dir>/checkpoints/step_NNNNNNN/``: a ``save_pretrained`` folder of the
policy (and tokenizer), ``rlfuse_modules.pt`` (extra trainable modules, e.g. a value head),
``reference/`` (only when a plugin replaced the frozen reference; otherwise it is rebuilt
from the initial model, exactly as it was) and ``trainer_state.pt`` (optimiser, plugin state,
every RNG, counters, the resolved config), written last -- a folder without it is incomplete
and ignored. Every folder is written through :func:`atomic_folder`, so a crash mid-write
never damages the previous version. See docs/reliability.md.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from rlfuse.errors import ConfigError

if TYPE_CHECKING:
    from rlfuse.trainer import Context

STATE_FILE = "trainer_state.pt"
MODULES_FILE = "rlfuse_modules.pt"
REFERENCE_DIR = "reference"
KEEP_LAST = 2  # default of trainer.keep_last: complete checkpoints kept in <run_dir>/checkpoints
# Keys a resume may change without trainer.resume_allow_changes: the budget and cadence of the
# run, where and how it runs, and what is logged -- never what is computed.
BUDGET_KEYS = (
    "run_dir", "trainer.max_steps", "trainer.eval_every", "trainer.save_every", "trainer.keep_last",
    "trainer.resume", "trainer.resume_allow_changes", "trainer.progress", "trainer.threads",
    "trainer.device", "logger",
)


@contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Write a folder atomically: yields a temporary sibling to fill; on success it replaces
    ``folder`` (the old version is moved aside first and removed last), on error it is removed
    and ``folder`` is left as it was.

    ::

        with atomic_folder(run_dir / "final") as tmp:
            model.save_pretrained(tmp)
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def save_policy(ctx: Context, folder: Path, dtype: str | None = None) -> None:
    """Write the policy as a ``save_pretrained`` folder (+ tokenizer, + extra modules), atomically;
    ``dtype`` (``trainer.save_dtype``) casts the saved weights, not the trained ones. A LoRA
    policy writes its adapter."""
    from rlfuse import models

    with atomic_folder(folder) as tmp:
        models.save_pretrained(ctx.policy, tmp, dtype)
        ctx.tokenizer.save_pretrained(tmp)
        if len(ctx.modules):
            torch.save(ctx.modules.state_dict(), tmp / MODULES_FILE)


def save_checkpoint(ctx: Context, opt: torch.optim.Optimizer, step: int, state: dict[str, Any]) -> Path:
    """Write ``checkpoints/step_<step>`` (policy, modules, optimiser, plugin state, RNG, the
    config and ``state``); keep the last ``trainer.keep_last`` complete ones."""
    ckpt_dir = ctx.run_dir / "checkpoints"
    folder = ckpt_dir / f"step_{step:07d}"
    from rlfuse import models

    with atomic_folder(folder) as tmp:
        models.save_pretrained(ctx.policy, tmp)  # the fp32 masters (a LoRA policy: its adapter)
        ctx.tokenizer.save_pretrained(tmp)
        if len(ctx.modules):
            torch.save(ctx.modules.state_dict(), tmp / MODULES_FILE)
        if ctx.has_reference and ctx.reference_version > 1:  # replaced: not rebuildable from the config
            ctx.reference.save_pretrained(tmp / REFERENCE_DIR)
        trainer_state = {
            "step": step,
            "optimizer": opt.state_dict(),
            "plugins": merge(ctx.hook.save_state(ctx=ctx)),
            "rng": rng_state(),
            "config": OmegaConf.to_container(ctx.cfg, resolve=True),
            **state,
        }
        torch.save(trainer_state, tmp / STATE_FILE)  # last: its presence marks the folder complete
    keep = int(ctx.cfg.trainer.get("keep_last", KEEP_LAST) or KEEP_LAST)
    for old in sorted(ckpt_dir.glob("step_*"))[:-keep]:
        if old.suffix not in (".tmp", ".old"):
            shutil.rmtree(old, ignore_errors=True)
    return folder


def rng_state() -> dict[str, Any]:
    """Every random generator the run draws from: Python's, NumPy's, torch's (CPU, and CUDA).
    Generation (``model.generate``) and shuffling draw from torch's global generator."""
    state: dict[str, Any] = {"torch": torch.random.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run dir (one whose trainer state was written)."""
    done = [p for p in sorted((run_dir / "checkpoints").glob("step_*")) if (p / STATE_FILE).exists()]
    return done[-1] if done else None


def load_checkpoint(ctx: Context, opt: torch.optim.Optimizer, ckpt: Path) -> tuple[int, dict[str, Any]]:
    """Restore policy, modules, the frozen reference, optimiser, plugin state and every RNG
    from ``ckpt``. Plugins' ``load_state`` runs with ``ctx.step`` already at the checkpoint's
    step (a logger truncates what it wrote after it).

    :returns: (the step the checkpoint was taken at, the rest of the trainer state: the saved
        ``summary``, ``counters``, ``final``).
    """
    from transformers import AutoModelForCausalLM

    from rlfuse import models

    state = read_state(ckpt)
    dtype = next(ctx.policy.parameters()).dtype
    models.load_weights(ctx.policy, ckpt)
    # The frozen reference is a copy of the *initial* policy, never of the resumed one: built
    # lazily after a resume, it is rebuilt from the config exactly as the run built it.
    cfg = ctx.cfg
    ctx._initial_policy = lambda: models.load_policy(cfg.model, ctx.tokenizer, cfg.seed)
    if (ckpt / MODULES_FILE).exists():
        ctx.modules.load_state_dict(torch.load(ckpt / MODULES_FILE, map_location=ctx.device))
    if (ckpt / REFERENCE_DIR).exists():
        ctx.set_reference(AutoModelForCausalLM.from_pretrained(ckpt / REFERENCE_DIR, dtype=dtype))
    opt.load_state_dict(state["optimizer"])
    step = int(state["step"])
    ctx.step = step
    ctx.hook.load_state(ctx=ctx, state=state.get("plugins", {}))
    set_rng_state(state["rng"])
    return step, state


def read_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)


def resume_point(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, as ``trainer.resume`` says, or None to start fresh.

    * ``auto``: the newest complete checkpoint, or None;
    * ``true``: the newest complete checkpoint; an error when there is none;
    * ``false``: None; an error when the run dir already holds a run (checkpoints or a
      ``summary.json``), which a fresh start would silently mix with the new one.
    """
    mode = cfg.trainer.resume
    ckpt = latest_checkpoint(run_dir)
    finished = (run_dir / "summary.json").exists()
    if mode is True and ckpt is None:
        raise ConfigError(
            "trainer.resume", f"is true, but {run_dir / 'checkpoints'} holds no complete checkpoint "
            "(trainer.resume=auto starts fresh when there is none)"
        )
    if mode is False:
        if ckpt is not None or finished:
            raise ConfigError(
                "trainer.resume", f"is false, but {run_dir} already holds a run "
                f"({'checkpoints' if ckpt else 'summary.json'}): trainer.resume=auto continues it; "
                "choose another run_dir to start over"
            )
        return None
    if ckpt is None and finished:
        raise ConfigError(
            "trainer.resume", f"found no checkpoint to continue in {run_dir}, which already holds a finished "
            "run (summary.json): choose another run_dir to start over"
        )
    return ckpt


def config_changes(cfg: DictConfig, saved: dict[str, Any] | None) -> dict[str, tuple[Any, Any]]:
    """Keys whose value differs between ``cfg`` and a checkpoint's saved config, except the
    :data:`BUDGET_KEYS`: ``{key: (saved value, new value)}``."""
    if saved is None:  # a checkpoint from before configs were saved
        return {}
    new = _flatten(OmegaConf.to_container(cfg, resolve=True))
    old = _flatten(saved)
    out = {}
    for key in sorted(set(new) | set(old), key=lambda k: (not k.startswith("algo."), k)):
        if any(key == b or key.startswith(b + ".") for b in BUDGET_KEYS):
            continue
        if new.get(key, "<absent>") != old.get(key, "<absent>"):
            out[key] = (old.get(key, "<absent>"), new.get(key, "<absent>"))
    return out


def check_config(cfg: DictConfig, ckpt: Path) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume ``ckpt`` under a config that computes something else (unless
    ``trainer.resume_allow_changes``); return the changes allowed."""
    changes = config_changes(cfg, read_state(ckpt).get("config"))
    if changes and not cfg.trainer.resume_allow_changes:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in list(changes.items())[:10]))
        more = f" (and {len(changes) - 10} more)" if len(changes) > 10 else ""
        raise ConfigError(
            "trainer.resume", f"the config differs from the one {ckpt} was trained with, in: {listed}{more}. "
            "Resume with the same values, use another run_dir, or set trainer.resume_allow_changes=true"
        )
    return changes


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def merge(dicts: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Merge the dicts a hook's implementations returned (later ones win)."""
    out: dict[str, Any] = {}
    for d in dicts:
        if d:
            out.update(d)
    return out
