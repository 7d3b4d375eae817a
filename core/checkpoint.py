"""Checkpoints: what a run writes so it can be resumed, and the atomic folder save under it.

A checkpoint is ``<run_dir>/checkpoints/step_NNNNNNN/``: a ``save_pretrained`` folder of the
policy (and tokenizer), ``rlfuse_modules.pt`` (extra trainable modules, e.g. a value head),
``reference/`` (only when a plugin replaced the frozen reference; otherwise it is rebuilt
from the initial model, exactly as it was) and ``trainer_state.pt`` (optimiser, plugin state,
every RNG, counters, the resolved config), written last -- a folder without it is incomplete
and ignored. Every folder is written through :func:`atomic_folder`, so a crash mid-write
never damages the previous version. See docs/reliability.md.

Under torchrun every rank takes part: rank 0 writes the folder; each other rank writes
``rank<r>.pt`` (its own RNG and plugin state, and with ``trainer.strategy=none`` its own
policy, modules and optimiser) into rank 0's temporary folder before rank 0 commits it, so
the folder holds every rank's part or does not exist. Under ``trainer.strategy=fsdp`` the
policy and optimiser are gathered to rank 0 first (full state dicts, :mod:`rlfuse.fsdp`).
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
RANK_FILE = "rank{rank}.pt"  # the part of rank > 0 (docs/scaling.md, resume under torchrun)
REFERENCE_DIR = "reference"
KEEP_LAST = 2  # default of trainer.keep_last: complete checkpoints kept in <run_dir>/checkpoints
# Keys a resume may change without trainer.resume_allow_changes: the budget and cadence of the
# run, where and how it runs, and what is logged -- never what is computed.
BUDGET_KEYS = (
    "run_dir", "trainer.max_steps", "trainer.eval_every", "trainer.save_every", "trainer.keep_last",
    "trainer.resume", "trainer.resume_allow_changes", "trainer.progress", "trainer.threads",
    "trainer.device", "logger",
)


def staging(folder: Path) -> Path:
    """Where :func:`atomic_folder` fills ``folder`` before the rename."""
    return folder.with_name(folder.name + ".tmp")


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
    tmp = staging(folder)
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


def save_policy(ctx: Context, folder: Path, dtype: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
    """Write the policy as a ``save_pretrained`` folder (+ tokenizer, + extra modules), atomically;
    ``dtype`` (``trainer.save_dtype``) casts the saved weights, not the trained ones. A LoRA
    policy writes its adapter. ``state_dict``: a sharded policy's gathered weights."""
    from rlfuse import models

    with atomic_folder(folder) as tmp:
        models.save_pretrained(ctx.policy, tmp, dtype, state_dict=state_dict)
        ctx.tokenizer.save_pretrained(tmp)
        if len(ctx.modules):
            torch.save(ctx.modules.state_dict(), tmp / MODULES_FILE)


def save_checkpoint(ctx: Context, opt: torch.optim.Optimizer, step: int, state: dict[str, Any]) -> Path:
    """Write ``checkpoints/step_<step>`` (policy, modules, optimiser, plugin state, RNG, the
    config and ``state``); keep the last ``trainer.keep_last`` complete ones.

    Every rank calls it: rank 0 writes the folder, the others their ``rank<r>.pt`` into it
    before it is committed; the ranks agree all parts were written (else no rank commits and
    every rank raises), and return once the folder is complete."""
    from rlfuse import fsdp

    d = ctx.dist
    ckpt_dir = ctx.run_dir / "checkpoints"
    folder = ckpt_dir / f"step_{step:07d}"
    policy_state = fsdp.full_policy_state(ctx)  # gathered to rank 0 when sharded (every rank calls)
    optimizer = fsdp.full_optimizer_state(ctx, opt) if fsdp.sharded(ctx) else None
    if not d.is_main:
        d.barrier("checkpoint (folder created)")
        error = _attempt(lambda: torch.save(_rank_state(ctx, opt), staging(folder) / RANK_FILE.format(rank=d.rank)))
        _agree_written(ctx, folder, error)
        d.barrier("checkpoint")
        return folder
    with atomic_folder(folder) as tmp:
        d.barrier("checkpoint (folder created)")  # the other ranks write their part into tmp now
        error = _attempt(lambda: _write_main(ctx, tmp, policy_state))
        _agree_written(ctx, folder, error)
        trainer_state = {
            "step": step,
            "optimizer": optimizer if optimizer is not None else opt.state_dict(),
            "plugins": merge(ctx.hook.save_state(ctx=ctx)),
            "rng": rng_state(),
            "world_size": d.world_size,
            "config": OmegaConf.to_container(ctx.cfg, resolve=True),
            **state,
        }
        torch.save(trainer_state, tmp / STATE_FILE)  # last: its presence marks the folder complete
    keep = int(ctx.cfg.trainer.get("keep_last", KEEP_LAST) or KEEP_LAST)
    for old in sorted(ckpt_dir.glob("step_*"))[:-keep]:
        if old.suffix not in (".tmp", ".old"):
            shutil.rmtree(old, ignore_errors=True)
    d.barrier("checkpoint")  # no rank goes on before the folder is complete
    return folder


def _write_main(ctx: Context, tmp: Path, policy_state: dict[str, Any] | None) -> None:
    from rlfuse import models

    models.save_pretrained(ctx.policy, tmp, state_dict=policy_state)  # the fp32 masters (LoRA: its adapter)
    ctx.tokenizer.save_pretrained(tmp)
    if len(ctx.modules):
        torch.save(ctx.modules.state_dict(), tmp / MODULES_FILE)
    if ctx.has_reference and ctx.reference_version > 1:  # replaced: not rebuildable from the config
        ctx.reference.save_pretrained(tmp / REFERENCE_DIR)


def _rank_state(ctx: Context, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """What a rank > 0 keeps of its own: RNG and plugin state; with one model per rank
    (``trainer.strategy=none``) also its policy, modules and optimiser."""
    from rlfuse import distributed

    own: dict[str, Any] = {"rng": rng_state(), "plugins": merge(ctx.hook.save_state(ctx=ctx))}
    if not distributed.data_parallel(ctx):
        own["policy"] = {k: v.detach().cpu() for k, v in ctx.policy.state_dict().items()}
        own["modules"] = ctx.modules.state_dict()
        own["optimizer"] = opt.state_dict()
    return own


def _attempt(fn: Any) -> BaseException | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported to every rank by _agree_written
        return e
    return None


def _agree_written(ctx: Context, folder: Path, error: BaseException | None) -> None:
    """Every rank says whether its part of ``folder`` was written; any failure makes every
    rank raise (rank 0 then leaves the folder uncommitted: atomic_folder removes it)."""
    failed = ctx.dist.failed_ranks(error is None, what="checkpoint (parts written)")
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"rank(s) {failed} could not write their part of {folder}; the checkpoint was not committed")


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

    from rlfuse import fsdp, models

    state = read_state(ckpt)
    own = _read_own(ctx, ckpt, state)  # this rank's part (rank 0: the trainer state itself)
    dtype = next(ctx.policy.parameters()).dtype
    if fsdp.sharded(ctx):
        fsdp.load_policy_state(ctx, AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).state_dict())
    elif "policy" in own:  # one model per rank: this agent's own weights
        ctx.policy.load_state_dict(own["policy"])
    else:
        models.load_weights(ctx.policy, ckpt)
    # The frozen reference is a copy of the *initial* policy, never of the resumed one: built
    # lazily after a resume, it is rebuilt from the config exactly as the run built it.
    cfg = ctx.cfg
    ctx._initial_policy = lambda: models.load_policy(cfg.model, ctx.tokenizer, cfg.seed)
    if "modules" in own:
        ctx.modules.load_state_dict(own["modules"])
    elif (ckpt / MODULES_FILE).exists():
        ctx.modules.load_state_dict(torch.load(ckpt / MODULES_FILE, map_location=ctx.device))
    if (ckpt / REFERENCE_DIR).exists():
        ctx.set_reference(AutoModelForCausalLM.from_pretrained(ckpt / REFERENCE_DIR, dtype=dtype))
    if fsdp.sharded(ctx):
        fsdp.load_optimizer_state(ctx, opt, state["optimizer"])
    else:
        opt.load_state_dict(own.get("optimizer", state["optimizer"]))
    step = int(state["step"])
    ctx.step = step
    ctx.hook.load_state(ctx=ctx, state=own.get("plugins", {}))
    set_rng_state(own["rng"])
    return step, state


def _read_own(ctx: Context, ckpt: Path, state: dict[str, Any]) -> dict[str, Any]:
    """This rank's saved part: ``rank<r>.pt`` for a rank > 0, the trainer state for rank 0 (or
    for a rank the checkpoint has no part of: a run resumed on more ranks, said so)."""
    r = ctx.dist.rank
    path = ckpt / RANK_FILE.format(rank=r)
    if r == 0:
        return state
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=False)
    print(f"[rlfuse] warning: {ckpt} has no part for rank {r} (saved by {state.get('world_size', 1)} rank(s)); "
          "this rank resumes from rank 0's RNG, plugin state and weights")
    return state


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
