"""``trainer.strategy=fsdp`` and per-rank resume state, on real ranks (gloo, 127.0.0.1; each
rank a subprocess with a hard join timeout, tests/distributed_support.py).

* 2-rank FSDP SFT ends with the same weights and logged losses as one process on the global
  batch; ``final/`` is a plain ``save_pretrained`` folder holding those weights;
* 2-rank FSDP GRPO (generation, reference, clipping under FSDP) equals 2-rank DDP;
* a resume under FSDP from a checkpoint continues exactly: the same metrics and weights as the
  uninterrupted run -- with sampling, which needs each rank's own RNG back;
* with ``trainer.strategy=none`` every agent resumes from its own weights, not agent 0's;
* a rank that cannot write its part of a checkpoint leaves no checkpoint and stops every rank.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from distributed_support import launch, logs, wait

from support import run_job

BASE = ["algo.warmup=null", "trainer.progress=false", "trainer.threads=1", "eval=[]", "logger=[jsonl]",
        "+plugins.keep.plugin=distributed_support:KeepWeights", "trainer.schedule=constant",
        "trainer.warmup_steps=0", "trainer.max_steps=3", "trainer.save_every=2", "dist.timeout_s=60"]
SFT = ["algo=sft", *BASE]
GRPO = ["algo=grpo", *BASE, "rollout.batch_size=2", "rollout.n=4", "trainer.mini_batch_size=4", "trainer.epochs=1",
        "rollout.max_new_tokens=8"]


def _ranks(overrides, tmp_path, name, world=2, timeout=180, expect_ok=True):
    """Run the job on ``world`` ranks; return (per-rank flat weights, run dir)."""
    out = tmp_path / name
    run = tmp_path / f"{name}_run"
    procs = launch("job", world, {"overrides": overrides, "run_dir": str(run)}, out, env={"RLFUSE_TEST_OUT": str(out)})
    codes = wait(procs, timeout)
    if not expect_ok:
        return codes, out
    assert codes == [0] * world, logs(out, world)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)], run


def _resumed(overrides, tmp_path, name, run, step=2, world=2):
    """The same job in a fresh run dir holding only ``run``'s checkpoint of ``step``."""
    fresh = tmp_path / f"{name}_run"
    (fresh / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / f"step_{step:07d}", fresh / "checkpoints" / f"step_{step:07d}")
    return _ranks(overrides + ["trainer.resume=true"], tmp_path, name, world)


def _metrics(run):
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "step" in r}


def _flat_folder(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


@pytest.mark.slow
def test_fsdp_sft_equals_one_process_and_final_is_a_plain_folder(tmp_path, monkeypatch):
    out = tmp_path / "single"
    out.mkdir()
    monkeypatch.setenv("RLFUSE_TEST_OUT", str(out))
    torch.set_num_threads(1)
    run_job(SFT + ["rollout.batch_size=8", "trainer.save_every=0"], tmp_path / "single_run")
    single = torch.load(out / "rank0.pt")

    ranks, run = _ranks(SFT + ["rollout.batch_size=4", "trainer.strategy=fsdp"], tmp_path, "fsdp")
    for w in ranks:  # the full (gathered) weights on every rank
        torch.testing.assert_close(w, single, rtol=1e-4, atol=1e-5)
    one, two = _metrics(tmp_path / "single_run"), _metrics(run)
    assert [two[s]["loss/sft"] for s in (1, 2, 3)] == pytest.approx([one[s]["loss/sft"] for s in (1, 2, 3)], rel=1e-4)
    assert [two[s]["optim/grad_norm"] for s in (1, 2, 3)] == pytest.approx(
        [one[s]["optim/grad_norm"] for s in (1, 2, 3)], rel=1e-4)
    # final/ and the checkpoints are plain save_pretrained folders of the full weights
    torch.testing.assert_close(_flat_folder(run / "final"), ranks[0], rtol=0, atol=0)
    ckpt = run / "checkpoints" / "step_0000002"
    assert (ckpt / "rank1.pt").exists() and not list(ckpt.parent.glob("*.tmp"))


@pytest.mark.slow
def test_fsdp_grpo_equals_ddp_and_resumes_exactly(tmp_path):
    ddp, _ = _ranks(GRPO + ["trainer.strategy=ddp"], tmp_path, "ddp")
    fsdp, run = _ranks(GRPO + ["trainer.strategy=fsdp"], tmp_path, "fsdp")
    for a, b in zip(fsdp, ddp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.equal(fsdp[0], _flat_folder(run / "checkpoints" / "step_0000002"))  # step 3 trained
    # resumed at step 2 under FSDP: step 3 samples the same responses (each rank's own RNG)
    resumed, again = _resumed(GRPO + ["trainer.strategy=fsdp"], tmp_path, "resumed", run)
    for a, b in zip(resumed, fsdp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    m, r = _metrics(run)[3], _metrics(again)[3]
    for key in ("reward/mean", "reward/std", "response/length_mean", "loss/total", "optim/grad_norm"):
        assert r[key] == pytest.approx(m[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_agents_resume_from_their_own_weights(tmp_path):
    none = SFT + ["rollout.batch_size=4", "trainer.strategy=none", "sync=none"]
    agents, run = _ranks(none, tmp_path, "none")
    assert not torch.allclose(agents[0], agents[1])  # own data shards: the agents differ
    resumed, _ = _resumed(none, tmp_path, "resumed", run)
    for a, b in zip(resumed, agents, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_a_rank_failing_to_write_its_part_leaves_no_checkpoint(tmp_path):
    codes, out = _ranks(SFT + ["rollout.batch_size=4", "trainer.save_every=1",
                               "+plugins.bad.plugin=distributed_support:FailSaveOnRank1"], tmp_path, "bad", expect_ok=False)
    assert codes == [1, 1], logs(out, 2)
    assert not list((tmp_path / "bad_run" / "checkpoints").glob("step_*")), logs(out, 2)
    assert "could not write their part" in (out / "rank0.log").read_text(), logs(out, 2)
