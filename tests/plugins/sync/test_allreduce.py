"""sync=allreduce: parameter averaging on 3 real ranks; with ``average: grads`` and k=1 it
equals data parallelism (``trainer.strategy=ddp``) on 2 ranks -- see tests/core/test_distributed.py
for that job-level comparison."""

from __future__ import annotations

import pytest
import torch

from rlfuse.plugins.sync.allreduce import Config, Plugin


def test_parameter_average_is_the_mean_on_every_rank(sync_checks):
    before = torch.tensor([r["allreduce"]["before"] for r in sync_checks])
    after = torch.tensor([r["allreduce"]["after"] for r in sync_checks])
    torch.testing.assert_close(after, before.mean(0).expand_as(after), rtol=0, atol=1e-6)
    m = sync_checks[1]["allreduce"]["metrics"]
    assert m["sync/participants"] == 3 and m["sync/bytes"] >= before.shape[1] * 4
    theta = before[1]
    mean = before.mean(0)
    assert m["consensus/param_distance"] == pytest.approx(float((theta - mean).pow(2).sum() / mean.pow(2).sum()), rel=1e-5)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="sync.every"):
        Plugin(Config(every=0))
    with pytest.raises(ValueError, match="sync.average"):
        Plugin(Config(average="weights"))


def test_consolidate_writes_the_mean_over_ranks(sync_checks):
    mean = torch.tensor(sync_checks[0]["allreduce"]["after"])  # mean of the same perturbed weights
    for r in sync_checks:
        assert r["consolidate"]["changed"] is True
        torch.testing.assert_close(torch.tensor(r["consolidate"]["after"]), mean, rtol=0, atol=1e-6)


def test_consolidate_is_a_no_op_in_one_process():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from rlfuse.distributed import Dist

    model = torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in model.parameters()]
    ctx = SimpleNamespace(dist=Dist(), policy=model, modules=torch.nn.ModuleDict(),
                          cfg=OmegaConf.create({"trainer": {"strategy": "none"}}))
    assert Plugin(Config()).consolidate(ctx=ctx) is False
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
