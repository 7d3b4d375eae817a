"""``sync=none``: a no-op after every optimiser step -- it returns nothing and changes nothing,
and the trainer calls it once per optimiser step."""

from __future__ import annotations

import torch

from rlfuse import hookimpl
from rlfuse.manager import PluginManager, instantiate, resolve


def test_sync_none_is_a_registered_no_op():
    plugin = instantiate(resolve("none"), {}, name="none", where="sync")
    pm = PluginManager()
    pm.register_plugin(plugin, "sync")
    impls = [i.plugin_name for i in pm.hook.sync.get_hookimpls()]
    assert impls == ["sync"]
    w = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in w.parameters()]
    assert pm.hook.sync(ctx=None, step=0) == []  # no result from any implementation
    assert all(torch.equal(a, b) for a, b in zip(before, w.parameters(), strict=True))


def test_sync_none_runs_after_every_optimiser_step(tmp_path, monkeypatch):
    """One step of SFT with 2 epochs x 2 mini-batches: 4 optimiser steps, 4 calls of sync=none."""
    from rlfuse.plugins.sync import none
    from support import run_job

    calls = []
    original = none.sync

    @hookimpl
    def sync(step):
        calls.append(step)
        return original(step=step)

    monkeypatch.setattr(none, "sync", sync)  # what the entry point `none` registers
    s = run_job(["algo=sft", "sync=none", "trainer.max_steps=1", "rollout.batch_size=8", "trainer.mini_batch_size=4",
                 "trainer.epochs=2", "eval=[]", "logger=[]", "trainer.progress=false"], tmp_path)  # fmt: skip
    assert s["last"]["optim/updates"] == 4
    assert calls == [0, 0, 0, 0]
