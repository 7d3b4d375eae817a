"""``reward=length``, alone and beside ``reward=rule``: ``reward=[rule,length]`` with
per-component weights, per-reward metrics, advantages of the weighted sum."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module

from rlfuse import trainer
from rlfuse.config import register_configs
from rlfuse.manager import PluginError, PluginManager, instantiate, resolve
from support import load_plugins, text_batch

register_configs()


class Ctx:
    def __init__(self, pm, weights):
        self.hook, self.reward_weights = pm.hook, weights


def load(overrides):
    with initialize_config_module("rlfuse.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    pm = PluginManager()
    return cfg, pm, load_plugins(cfg, pm)


@pytest.mark.parametrize("mode,want", [("abs", [0.0, -0.5, -1 / 3, -0.5]), ("over", [0.0, 0.0, -1 / 3, 0.0])])
def test_length_reward_hand_computed(mode, want):
    plugin = instantiate(resolve("length"), {"column": "target", "mode": mode}, name="length", where="reward.length")
    rows = [{"target": "abcd"}, {"target": "abcd"}, {"target": "abc"}, {"target": "ab"}]
    out = plugin.reward(batch=text_batch(["p"] * 4, ["abcd", "ab", "abcd", "a"], rows))["length"]
    assert out.tolist() == pytest.approx(want)
    fixed = instantiate(resolve("length"), {"target": 4, "unit": "tokens"}, name="length", where="reward.length")
    # token unit: masked response tokens (capped at 6 by text_batch), wanted 4
    got = fixed.reward(batch=text_batch(["p"] * 2, ["abcdefgh", "abcd"], [{}, {}]))["length"]
    assert got.tolist() == pytest.approx([-0.5, 0.0])


def test_length_reward_errors_name_the_problem():
    with pytest.raises(PluginError, match="reward.length"):
        instantiate(resolve("length"), {}, name="length", where="reward.length")
    plugin = instantiate(resolve("length"), {"column": "answer"}, name="length", where="reward.length")
    with pytest.raises(ValueError, match="no column 'answer'"):
        plugin.reward(batch=text_batch(["p"], ["a"], [{"target": "ab"}]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_multi_reward_through_the_core(dtype):
    cfg, pm, weights = load(["algo=grpo", "reward=[rule,length]", "reward.length.weight=0.25", "reward.rule.weight=2.0"])
    assert weights == {"rule": 2.0, "length": 0.25}
    rows = [{"prompt": "dcba=", "target": "abcd"}, {"prompt": "cba=", "target": "abc"}, {"prompt": "ba=", "target": "ab"}]
    batch = text_batch([r["prompt"] for r in rows], ["abcd", "ab", "abba"], rows)
    metrics: dict[str, float] = {}
    trainer._apply_rewards(Ctx(pm, weights), batch, metrics)
    rule = torch.tensor([1.0, 2 / 3, 0.5])  # sort_letters.score: matches over the longer length
    length = torch.tensor([0.0, -1 / 3, -1.0])
    assert torch.allclose(batch.rewards, 2.0 * rule + 0.25 * length)
    assert metrics["reward/rule/mean"] == pytest.approx(float(rule.mean()))
    assert metrics["reward/length/mean"] == pytest.approx(float(length.mean()))
    assert metrics["reward/mean"] == pytest.approx(float((2.0 * rule + 0.25 * length).mean()))
    # advantages see the weighted sum
    adv_plugin = instantiate(resolve("dr_grpo"), {}, name="dr_grpo", where="advantage")
    batch.group_ids = torch.tensor([0, 0, 0])
    batch.rewards = batch.rewards.to(dtype)
    adv = adv_plugin.advantage(ctx=None, batch=batch).advantages
    total = (2.0 * rule + 0.25 * length).to(dtype).double()
    assert adv[0, 2].item() == pytest.approx(float(total[0] - total.mean()), abs=1e-6)
