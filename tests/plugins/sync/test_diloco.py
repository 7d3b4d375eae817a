"""sync=diloco on 3 real ranks: with k=1, outer lr 1 and momentum 0 the outer step is plain
parameter averaging; with the defaults (Nesterov, lr 0.7) and a bf16 transfer it moves the
anchor along the mean pseudo-gradient."""

from __future__ import annotations

import pytest
import torch

from rlfuse.plugins.sync.diloco import Config, Plugin


def test_lr1_momentum0_equals_plain_averaging(sync_checks):
    for r in sync_checks:
        torch.testing.assert_close(torch.tensor(r["diloco"]["after"]), torch.tensor(r["allreduce"]["after"]), rtol=0, atol=1e-6)
    m = sync_checks[0]["diloco"]["metrics"]
    assert m["sync/participants"] == 3 and m["consensus/param_distance"] > 0


def test_nesterov_bf16_step(sync_checks):
    start = torch.tensor(sync_checks[0]["diloco_nesterov_bf16"]["start"])  # the common anchor
    mean = torch.tensor(sync_checks[0]["allreduce"]["after"])  # mean of the ranks' weights
    after = [torch.tensor(r["diloco_nesterov_bf16"]["after"]) for r in sync_checks]
    for a in after[1:]:
        torch.testing.assert_close(a, after[0], rtol=0, atol=0)  # every rank applies the same step
    # first outer step, zero momentum, Nesterov: anchor - lr * (delta + m * delta)
    delta = start - mean
    assert float(delta.abs().max()) > 0.1  # the ranks really drifted
    torch.testing.assert_close(after[0], start - 0.7 * 1.9 * delta, rtol=0, atol=3e-2)  # bf16 transfer


def test_config_errors():
    with pytest.raises(ValueError, match="sync.every"):
        Plugin(Config(every=0))
    with pytest.raises(ValueError, match="outer"):
        Plugin(Config(outer_momentum=1.0))


def test_state_round_trip_and_one_process_is_a_no_op():
    from types import SimpleNamespace

    one = SimpleNamespace(dist=SimpleNamespace(enabled=False))
    p = Plugin(Config(every=2))
    p.anchor, p.momentum = torch.arange(4.0), torch.ones(4)
    assert [p.due(one) for _ in range(3)] == [False, False, False]  # never syncs alone
    q = Plugin(Config(every=2))
    q.load_state(p.save_state())
    assert q.updates == 3 and torch.equal(q.anchor, p.anchor) and torch.equal(q.momentum, p.momentum)
    q.load_state({})  # a checkpoint without this plugin's part changes nothing
    assert q.updates == 3
