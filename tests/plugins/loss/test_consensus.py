"""loss=consensus: the term and its gradient in one process, and a 3-agent decentralized run
(3 real ranks, gloo, 127.0.0.1) where the consensus term keeps the agents closer and the
consensus policy raises the true reward of the built-in task."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from distributed_support import launch, logs, results, wait
from omegaconf import OmegaConf

from rlfuse.data import Batch
from rlfuse.distributed import Dist
from rlfuse.plugins.loss.consensus import Config, Plugin
from support import run_job


def _ctx(model):
    return SimpleNamespace(policy=model, modules=torch.nn.ModuleDict(), dist=Dist(),
                           cfg=OmegaConf.create({"trainer": {"strategy": "none"}}))


def _batch(rows: int) -> Batch:
    ids = torch.zeros(rows, 3, dtype=torch.long)
    return Batch(input_ids=ids, attention_mask=torch.ones_like(ids), response_mask=torch.ones(rows, 3),
                 totals={"sequences": 4.0, "tokens": 12.0})


def test_param_l2_term_and_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ctx = _ctx(model)
    plugin = Plugin(Config(coef=0.5))
    out = plugin.loss(ctx=ctx, batch=_batch(2))  # first call: the snapshot is the current weights
    assert float(out.terms["consensus"].detach()) == 0.0
    snap = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    parts = [plugin.loss(ctx=ctx, batch=_batch(2)) for _ in range(2)]  # two micro-batches of 2 rows
    total = sum(o.terms["consensus"] for o in parts)
    n = sum(p.numel() for p in snap)
    assert float(total.detach()) == pytest.approx(0.5 * n)  # coef * ||theta - snapshot||^2, once per step
    total.backward()
    torch.testing.assert_close(model.weight.grad, torch.full_like(model.weight, 2 * 0.5 * 1.0))
    assert parts[0].metrics["consensus/l2"] == pytest.approx(n / sum(float(s.pow(2).sum()) for s in snap), rel=1e-5)
    # one process: the sync hook refreshes the snapshot to the current weights
    plugin.sync(ctx=ctx, step=0)
    assert float(plugin.loss(ctx=ctx, batch=_batch(4)).terms["consensus"].detach()) == 0.0


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="distance"):
        Plugin(Config(distance="l1"))
    with pytest.raises(ValueError, match="snapshot"):
        Plugin(Config(snapshot="everyone"))


# ---------------------------------------------------------------- 3 agents, lambda > 0 vs 0

# The preset's step (8 prompts x 8 samples per agent, 4 updates, a sync every 4 steps), 12 steps.
# The true reward is measured on samples at the training temperature (the expected reward of
# the policy as it samples, which RL raises within a few steps; greedy answers lag behind --
# docs/scaling.md has the preset's full-length greedy figures).
AGENTS = ["algo=decentralized", "trainer.max_steps=12", "trainer.progress=false", "trainer.threads=1",
          "logger=[jsonl]", "eval.task.num_prompts=128", "eval.task.greedy=false", "eval.task.temperature=0.7"]


@pytest.fixture(scope="module")
def warm_model(tmp_path_factory):
    """The SFT warm-up, once, in this process (both 3-agent runs start from it)."""
    run = tmp_path_factory.mktemp("warmup")
    torch.set_num_threads(1)
    run_job(["algo=sft", "trainer.max_steps=80", "rollout.batch_size=32", "trainer.progress=false",
             "logger=[]", "eval=[]"], run)
    return str(run / "final")


def _agents(tmp_path, name, coef, model):
    out = tmp_path / name
    procs = launch("job", 3, {"overrides": AGENTS + [f"loss.consensus.coef={coef}", f"model.name_or_path={model}",
                                                     "+plugins.keep.plugin=distributed_support:KeepWeights"],
                              "run_dir": str(tmp_path / f"{name}_run")}, out, env={"RLFUSE_TEST_OUT": str(out)})
    assert wait(procs, timeout=420) == [0, 0, 0], logs(out, 3)
    summary = results(out, 3)[0]["summary"]
    rows = [json.loads(x) for x in (tmp_path / f"{name}_run" / "metrics.jsonl").read_text().splitlines()]
    dist = [r["consensus/param_distance"] for r in rows if "consensus/param_distance" in r]
    return summary, dist


@pytest.mark.slow
def test_three_agents_consensus_closer_with_lambda_and_reward_rises(tmp_path, warm_model):
    with_l, d_with = _agents(tmp_path, "lambda", 0.5, warm_model)
    without, d_without = _agents(tmp_path, "zero", 0.0, warm_model)
    assert len(d_with) == len(d_without) == 3  # one measurement per sync (steps 4, 8, 12)
    assert sum(d_with) < sum(d_without), (d_with, d_without)
    # the consensus policy (the agents' mean, written to final/) beats the initial policy
    # (seeded and single-threaded: the same figures on every run of this machine)
    assert with_l["eval/consolidated/reward_after"] > with_l["eval/reward_before"] + 0.02, with_l
    assert without["eval/consolidated/reward_after"] > without["eval/reward_before"] + 0.02, without
    for r in range(3):  # each agent's own figures are reported beside it
        assert f"eval/rank{r}/reward_after" in with_l and f"eval/rank{r}/reward_before" in with_l
