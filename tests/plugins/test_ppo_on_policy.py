"""On-policy updates take the old log-probs from the training forward (ratio = 1 exactly).

``rollout=generate`` with ``old_logprobs: auto`` skips the separate no-grad pass when a rollout
gets one update (one epoch, one mini-batch); ``loss=ppo`` then uses the training forward's
own log-probs, detached. The result must equal the run that computes them in a separate pass
(``old_logprobs: rollout``): same losses, same weights after the steps, for GRPO and for PPO
(whose ``reward=kl_penalty`` needs old log-probs before training and computes them itself).
"""

from __future__ import annotations

import json

import pytest
import torch

from support import compose

BASE = [
    "algo.warmup=null", "trainer.max_steps=2", "trainer.progress=false", "eval=[]", "logger=[jsonl]",
    "rollout.batch_size=4", "trainer.epochs=1", "trainer.mini_batch_size=null", "trainer.threads=1",
]


def run(tmp_path, name, overrides):
    from transformers import AutoModelForCausalLM

    from rlfuse.trainer import train

    run_dir = tmp_path / name
    train(compose(overrides), run_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "loss/total" in r]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    return rows, {k: v.float() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("algo", [["algo=grpo", "rollout.n=2"], ["algo=ppo"]], ids=["grpo", "ppo"])
def test_on_policy_equals_separate_pass(tmp_path, algo):
    rows_a, w_a = run(tmp_path, "auto", algo + BASE + ["++rollout.old_logprobs=auto"])
    rows_r, w_r = run(tmp_path, "rollout", algo + BASE + ["++rollout.old_logprobs=rollout"])
    assert len(rows_a) == len(rows_r) == 2
    for a, r in zip(rows_a, rows_r, strict=True):
        assert a["loss/total"] == pytest.approx(r["loss/total"], rel=1e-4, abs=1e-6)
        assert a["policy/ratio_mean"] == 1.0  # exactly: old = the forward itself
        assert r["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
        assert a["policy/clipfrac"] == 0.0
    # the separate pass's ratio is 1 only to ~1e-6, and Adam divides by sqrt(v): a weight whose
    # gradient is near zero can move by a visible fraction of lr on that alone (measured 1.7e-5
    # on one of 4,096 weights on an AMD EPYC VM); the steps move weights by ~lr (1e-3) or more
    for k in w_a:
        torch.testing.assert_close(w_a[k], w_r[k], rtol=1e-4, atol=5e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_off_policy_keeps_the_rollout_pass(tmp_path):
    """Two epochs: the rollout must record old log-probs (the ratio moves in epoch 2)."""
    from rlfuse.plugins.rollout.generate import on_policy

    cfg = compose(["algo=grpo"] + BASE + ["trainer.epochs=2"])
    assert not on_policy(cfg.trainer, 8)
    cfg = compose(["algo=grpo"] + BASE + ["trainer.mini_batch_size=4"])
    assert not on_policy(cfg.trainer, 8)
    cfg = compose(["algo=grpo"] + BASE)
    assert on_policy(cfg.trainer, 8)
