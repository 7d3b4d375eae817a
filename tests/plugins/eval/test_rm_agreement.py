"""eval=rm_agreement: the reward model's ranking of the policy's own answers; the early stop."""

from __future__ import annotations

import pytest
import torch

from rlfuse.plugins.eval.rm_agreement import agreement
from support import FAST, run_job


def test_agreement_counts_labelled_pairs_and_half_ties():
    acc, n = agreement(torch.tensor([1.0, 0.0, 2.0, 5.0]), torch.tensor([0.0, 1.0, 2.0, 0.0]), ["A", "A", "B", "tie"])
    assert n == 3 and acc == pytest.approx((1 + 0 + 0.5) / 3)


def test_true_reward_as_scorer_agrees_fully_and_a_drop_requests_a_stop(tmp_path):
    """Scored by the true reward itself (reward=rule), the noiseless labeller agrees on every
    pair (1.0); stop_below above 1 then stops the run at the first evaluation with pairs to compare."""
    over = [o for o in FAST if not o.startswith("eval.")] + ["trainer.max_steps=4", "trainer.eval_every=1", "eval=[rm_agreement]", "eval.rm_agreement.scorer=rule",
                   "eval.rm_agreement.prompts=4", "eval.rm_agreement.stop_below=1.01"]
    s = run_job(over, tmp_path)
    assert s["eval/rm_agreement_before"] == 1.0
    assert s["steps"] < 4 and "stop_below" in s["stopped"]  # at the first evaluation that compared pairs
    assert (tmp_path / "final" / "config.json").exists()


@pytest.mark.slow
def test_reward_model_on_policy_samples_ranks_the_policys_answers_better(tmp_path):
    """InstructGPT's point, measured: from the same SFT policy, a reward model trained on
    comparisons of the policy's own samples (rollout=policy_pairs) ranks fresh samples of that
    policy (held-out prompts) better than one trained on the shipped pairs."""
    torch.set_num_threads(2)
    common = ["trainer.progress=false", "eval.task.num_prompts=8"]
    run_job(["algo=sft", "trainer.max_steps=80"] + common, tmp_path / "sft")
    sft = tmp_path / "sft" / "final"
    rm = ["algo=reward_model", f"model.name_or_path={sft}", "trainer.max_steps=80", "trainer.progress=false"]
    run_job(rm, tmp_path / "rm_shipped")
    run_job(rm + ["rollout=policy_pairs", "rollout.prompts=128"], tmp_path / "rm_policy")
    acc = {}
    for name in ("rm_shipped", "rm_policy"):
        s = run_job(["algo=ppo", "algo.warmup=null", f"model.name_or_path={sft}", "trainer.max_steps=1",
                     "reward=[model]", f"reward.model.path={tmp_path / name / 'reward_model'}",
                     "eval=[rm_agreement]", "eval.rm_agreement.prompts=100", "trainer.progress=false"], tmp_path / f"eval_{name}")
        acc[name] = s["eval/rm_agreement_before"]  # the SFT policy, before the one step
    assert acc["rm_policy"] > acc["rm_shipped"] + 0.02, acc
