"""Checkpoints: what a run writes so it can be resumed, and the atomic folder save under it.

A checkpoint is ``<run_dir>/checkpoints/step_NNNNNNN/``: a ``save_pretrained`` folder of the
policy (and tokenizer), ``rlfuse_modules.pt`` (extra trainable modules, e.g. a value head) and
``trainer_state.pt`` (optimiser, plugin state, RNG, counters), written last -- a folder
without it is incomplete and ignored. Every folder is written through :func:`atomic_folder`,
so a crash mid-write never damages the previous version.
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

if TYPE_CHECKING:
    from rlfuse.trainer import Context

STATE_FILE = "trainer_state.pt"
MODULES_FILE = "rlfuse_modules.pt"
KEEP_LAST = 2  # complete checkpoints kept in <run_dir>/checkpoints


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


def save_policy(ctx: Context, folder: Path) -> None:
    """Write the policy as a ``save_pretrained`` folder (+ tokenizer, + extra modules), atomically."""
    with atomic_folder(folder) as tmp:
        ctx.policy.save_pretrained(tmp)
        ctx.tokenizer.save_pretrained(tmp)
        if len(ctx.modules):
            torch.save(ctx.modules.state_dict(), tmp / MODULES_FILE)


def save_checkpoint(ctx: Context, opt: torch.optim.Optimizer, step: int, state: dict[str, Any]) -> Path:
    """Write ``checkpoints/step_<step>`` (policy, modules, optimiser, plugin state, RNG and
    ``state``); keep the last :data:`KEEP_LAST` complete ones."""
    ckpt_dir = ctx.run_dir / "checkpoints"
    folder = ckpt_dir / f"step_{step:07d}"
    save_policy(ctx, folder)
    trainer_state = {
        "step": step,
        "optimizer": opt.state_dict(),
        "plugins": merge(ctx.hook.save_state(ctx=ctx)),
        "rng": {"torch": torch.random.get_rng_state(), "python": random.getstate()},
        **state,
    }
    if torch.cuda.is_available():
        trainer_state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    tmp = folder / (STATE_FILE + ".tmp")
    torch.save(trainer_state, tmp)
    os.replace(tmp, folder / STATE_FILE)
    for old in sorted(ckpt_dir.glob("step_*"))[:-KEEP_LAST]:
        if old.suffix not in (".tmp", ".old"):
            shutil.rmtree(old, ignore_errors=True)
    return folder


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run dir (one whose trainer state was written)."""
    done = [p for p in sorted((run_dir / "checkpoints").glob("step_*")) if (p / STATE_FILE).exists()]
    return done[-1] if done else None


def load_checkpoint(ctx: Context, opt: torch.optim.Optimizer, ckpt: Path) -> tuple[int, dict[str, Any]]:
    """Restore policy, modules, optimiser, plugin state and RNG from ``ckpt``.

    :returns: (the step the checkpoint was taken at, the saved summary).
    """
    from transformers import AutoModelForCausalLM

    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
    loaded = AutoModelForCausalLM.from_pretrained(ckpt, dtype=next(ctx.policy.parameters()).dtype)
    ctx.policy.load_state_dict(loaded.state_dict())
    if (ckpt / MODULES_FILE).exists():
        ctx.modules.load_state_dict(torch.load(ckpt / MODULES_FILE, map_location=ctx.device))
    opt.load_state_dict(state["optimizer"])
    ctx.hook.load_state(ctx=ctx, state=state.get("plugins", {}))
    torch.random.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"]), dict(state.get("summary", {}))


def merge(dicts: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Merge the dicts a hook's implementations returned (later ones win)."""
    out: dict[str, Any] = {}
    for d in dicts:
        if d:
            out.update(d)
    return out
