"""``trainer.strategy=fsdp`` and per-rank resume state, on real ranks (gloo, 127.0.0.1; each
rank a subprocess with a hard join timeout, tests/distributed_support.py). To keep the
start-ups few, each test runs its jobs one after the other in the same two ranks.

* 2-rank FSDP SFT ends with the same weights, losses and gradient norms as one process on
  the global batch; ``final/`` is a plain ``save_pretrained`` folder holding those weights;
* 2-rank FSDP GRPO (generation, reference, clipping under FSDP) equals 2-rank DDP;
* a resume under FSDP continues exactly: the same metrics and weights as the uninterrupted
  run -- with sampling, which needs each rank's own RNG back (rank 0's on every rank fails it);
* with ``trainer.strategy=none`` every agent resumes from its own weights, not agent 0's;
* a rank that cannot write its part of a checkpoint leaves no checkpoint and stops every rank;
* an unsupported precision under fsdp is an error naming ``trainer.precision``.
"""

from __future__ import annotations

import json

import pytest
import torch
from distributed_support import launch, logs, wait

from support import run_job

BASE = ["algo.warmup=null", "trainer.progress=false", "trainer.threads=1", "eval=[]", "logger=[jsonl]",
        "+plugins.keep.plugin=distributed_support:KeepWeights", "trainer.schedule=constant",
        "trainer.warmup_steps=0", "trainer.max_steps=2", "trainer.save_every=1"]
SFT = ["algo=sft", *BASE]
GRPO = ["algo=grpo", *BASE, "rollout.batch_size=2", "rollout.n=4", "trainer.mini_batch_size=4", "trainer.epochs=1",
        "rollout.max_new_tokens=8"]


def _jobs(tmp_path, jobs, world=2, timeout=240, expect_ok=True):
    """Run ``jobs`` in the same ranks; return ({name: per-rank flat weights}, out dir)."""
    out = tmp_path / "ranks"
    codes = wait(launch("jobs", world, {"jobs": jobs}, out), timeout)
    if not expect_ok:
        return codes, out
    assert codes == [0] * world, logs(out, world)
    return {j["name"]: [torch.load(out / j["name"] / f"rank{r}.pt") for r in range(world)] for j in jobs}, out


def _metrics(run):
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _flat_folder(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


@pytest.mark.slow
def test_fsdp_sft_equals_one_process_and_agents_resume_their_own_weights(tmp_path, monkeypatch):
    single = tmp_path / "single"
    single.mkdir()
    monkeypatch.setenv("RLFUSE_TEST_OUT", str(single))
    torch.set_num_threads(1)
    run_job(SFT + ["rollout.batch_size=8", "trainer.save_every=0"], tmp_path / "single_run")
    one = torch.load(single / "rank0.pt")
    none = SFT + ["rollout.batch_size=4", "trainer.strategy=none", "sync=none"]
    w, out = _jobs(tmp_path, [
        {"name": "fsdp", "overrides": SFT + ["rollout.batch_size=4", "trainer.strategy=fsdp"]},
        {"name": "agents", "overrides": none},
        {"name": "agents_resumed", "overrides": [*none, "trainer.resume=true"], "resume_from": ["agents", 1]},
    ])
    for rank_w in w["fsdp"]:  # the full (gathered) weights on every rank
        torch.testing.assert_close(rank_w, one, rtol=1e-4, atol=1e-5)
    m1, m2 = _metrics(tmp_path / "single_run"), _metrics(out / "fsdp_run")
    for key in ("loss/sft", "optim/grad_norm"):
        assert [m2[s][key] for s in (1, 2)] == pytest.approx([m1[s][key] for s in (1, 2)], rel=1e-4), key
    # final/ is a plain save_pretrained folder of the full weights; each checkpoint has rank 1's part
    torch.testing.assert_close(_flat_folder(out / "fsdp_run" / "final"), w["fsdp"][0], rtol=0, atol=0)
    ckpts = out / "fsdp_run" / "checkpoints"
    assert (ckpts / "step_0000001" / "rank1.pt").exists() and not list(ckpts.glob("*.tmp"))
    # strategy=none: the agents differ (own data shards); each resumes from its own weights
    assert not torch.allclose(w["agents"][0], w["agents"][1])
    for a, b in zip(w["agents_resumed"], w["agents"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_fsdp_grpo_equals_ddp_and_resumes_exactly(tmp_path):
    w, out = _jobs(tmp_path, [
        {"name": "ddp", "overrides": GRPO + ["trainer.strategy=ddp"]},
        {"name": "fsdp", "overrides": GRPO + ["trainer.strategy=fsdp"]},
        {"name": "resumed", "overrides": GRPO + ["trainer.strategy=fsdp", "trainer.resume=true"],
         "resume_from": ["fsdp", 1]},
    ])
    for a, b in zip(w["fsdp"], w["ddp"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.equal(w["fsdp"][0], _flat_folder(out / "fsdp_run" / "checkpoints" / "step_0000001"))
    # resumed at step 1: step 2 samples the same responses on each rank (its own RNG back)
    for a, b in zip(w["resumed"], w["fsdp"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    m, r = _metrics(out / "fsdp_run")[2], _metrics(out / "resumed_run")[2]
    for key in ("reward/mean", "reward/std", "response/length_mean", "loss/total", "optim/grad_norm"):
        assert r[key] == pytest.approx(m[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_a_rank_failing_to_write_its_part_leaves_no_checkpoint(tmp_path):
    bad = SFT + ["rollout.batch_size=4", "trainer.max_steps=1", "+plugins.bad.plugin=distributed_support:FailSaveOnRank1"]
    codes, out = _jobs(tmp_path, [{"name": "bad", "overrides": bad}], expect_ok=False)
    assert codes == [1, 1], logs(out, 2)
    assert not list((out / "bad_run" / "checkpoints").glob("step_*")), logs(out, 2)
    assert "rank(s) [1] could not write their part" in (out / "rank0.log").read_text(), logs(out, 2)


def test_fsdp_refuses_an_unsupported_precision_naming_the_key(tmp_path):
    from rlfuse.errors import ConfigError

    with pytest.raises(ConfigError, match=r"trainer.precision.*fp32 and bf16-mixed.*bf16-true"):
        run_job(["algo=sft", "algo.warmup=null", "trainer.max_steps=1", "trainer.progress=false", "eval=[]",
                 "logger=[]", "trainer.strategy=fsdp", "trainer.precision=bf16-true"], tmp_path / "run")
