"""labeller=simulated: agrees with the true reward, flips at its noise rate, calls ties."""

from __future__ import annotations

import random

import pytest
from omegaconf import OmegaConf

from rlfuse.plugins.labeller.simulated import Config, Plugin
from rlfuse.plugins.tasks.sort_letters import reward, target


class Ctx:
    cfg = OmegaConf.create({"seed": 0, "data": {"reward_fn": "rlfuse.plugins.tasks.sort_letters:reward"}})


def _pairs(n: int, seed: int = 0):
    """Random prompts of the built-in task, each with two different random answers."""
    rng = random.Random(seed)
    prompts, a, b, rows = [], [], [], []
    while len(prompts) < n:
        p = "".join(rng.choice("abcdef") for _ in range(rng.randint(3, 6))) + "="
        x = "".join(rng.sample(target(p), len(target(p))))
        y = "".join(rng.choice("abcdef") for _ in range(rng.randint(1, 7)))
        prompts.append(p)
        a.append(x)
        b.append(y)
        rows.append({"target": target(p)})
    return prompts, a, b, rows


def _truth(prompts, a, b, rows):
    out = []
    for p, x, y, row in zip(prompts, a, b, rows, strict=True):
        rx, ry = reward(p, x, **row), reward(p, y, **row)
        out.append("tie" if rx == ry else ("A" if rx > ry else "B"))
    return out


def test_noiseless_labeller_agrees_with_the_true_reward():
    pairs = _pairs(500)
    labels = Plugin(Config()).compare(ctx=Ctx(), prompts=pairs[0], first=pairs[1], second=pairs[2], rows=pairs[3])
    truth = _truth(*pairs)
    assert labels == truth
    assert 0 < truth.count("tie") < len(truth) and truth.count("A") > 50 and truth.count("B") > 50


@pytest.mark.parametrize("noise", [0.1, 0.3])
def test_noise_rate_is_the_fraction_of_flipped_preferences(noise):
    pairs = _pairs(4000, seed=1)
    labels = Plugin(Config(noise=noise)).compare(ctx=Ctx(), prompts=pairs[0], first=pairs[1], second=pairs[2], rows=pairs[3])
    truth = _truth(*pairs)
    decided = [(lab, t) for lab, t in zip(labels, truth, strict=True) if t != "tie"]
    assert all(lab == "tie" for lab, t in zip(labels, truth, strict=True) if t == "tie")  # ties never flip
    flipped = sum(lab != t for lab, t in decided) / len(decided)
    assert flipped == pytest.approx(noise, abs=0.03)


def test_tie_margin_and_seeded_flips():
    pairs = _pairs(300, seed=2)
    wide = Plugin(Config(tie_margin=1.0)).compare(ctx=Ctx(), prompts=pairs[0], first=pairs[1], second=pairs[2], rows=pairs[3])
    assert set(wide) == {"tie"}
    one = Plugin(Config(noise=0.3)).compare(ctx=Ctx(), prompts=pairs[0], first=pairs[1], second=pairs[2], rows=pairs[3])
    two = Plugin(Config(noise=0.3)).compare(ctx=Ctx(), prompts=pairs[0], first=pairs[1], second=pairs[2], rows=pairs[3])
    assert one == two


def test_bad_noise_is_a_clear_error():
    with pytest.raises(ValueError, match="labeller.noise"):
        Plugin(Config(noise=1.5))
