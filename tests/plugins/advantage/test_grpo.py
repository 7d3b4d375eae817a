"""``advantage=grpo``: group-normalised advantages against hand-computed cases (fp32 and bf16
rewards, masks, odd sizes, groups that are neither contiguous nor of equal size)."""

from __future__ import annotations

import math

import pytest
import torch

from rlfuse.manager import PluginError, instantiate, resolve
from support import make_batch, seq_values

DTYPES = [torch.float32, torch.bfloat16]


def plugin(name="grpo", **options):
    return instantiate(resolve(name), options, name=name, where="advantage")


# groups: 7 -> rows 0, 2, 4, 5 (rewards 1, 0, 0, 1); 3 -> rows 1, 6, 7 (all 0.25); 9 -> row 3
REWARDS = [1.0, 0.25, 0.0, 0.5, 0.0, 1.0, 0.25, 0.25]
GROUPS = [7, 3, 7, 9, 7, 7, 3, 3]
LENGTHS = [3, 1, 5, 2, 4, 1, 3, 2]


@pytest.mark.parametrize("dtype", DTYPES)
def test_grpo_hand_computed(dtype):
    batch = make_batch(REWARDS, LENGTHS, GROUPS, dtype=dtype)
    out = plugin("grpo").advantage(ctx=None, batch=batch)
    # group 7: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    want = [a, 0.0, -a, 0.0, -a, a, 0.0, 0.0]
    assert seq_values(out.advantages, batch) == pytest.approx(want, abs=1e-6)
    assert out.metrics["advantage/zero_std_frac"] == pytest.approx(2 / 3)  # groups 3 and 9


@pytest.mark.parametrize("dtype", DTYPES)
def test_grpo_population_std(dtype):
    batch = make_batch(REWARDS, LENGTHS, GROUPS, dtype=dtype)
    out = plugin("grpo", unbiased_std=False, eps=0.0).advantage(ctx=None, batch=batch)
    want = [1.0, 0.0, -1.0, 0.0, -1.0, 1.0, 0.0, 0.0]  # (r - 0.5) / 0.5
    assert seq_values(out.advantages, batch) == pytest.approx(want, abs=1e-6)


def test_grpo_metrics():
    batch = make_batch(REWARDS, LENGTHS, GROUPS)
    out = plugin("grpo", unbiased_std=False, eps=0.0).advantage(ctx=None, batch=batch)
    # advantages (1, 0, -1, 0, -1, 1, 0, 0): mean 0, |A| mean 4/8; three groups of 4, 3, 1 rows
    assert out.metrics["advantage/mean"] == pytest.approx(0.0, abs=1e-12)
    assert out.metrics["advantage/abs_mean"] == pytest.approx(0.5)
    assert out.metrics["advantage/group_size"] == pytest.approx(8 / 3)


def test_grpo_needs_group_ids():
    batch = make_batch([1.0, 0.0], [1, 2])
    with pytest.raises(ValueError, match="rollout.n >= 2"):
        plugin("grpo").advantage(ctx=None, batch=batch)


def test_bad_config_is_an_error_naming_the_key():
    with pytest.raises(PluginError, match="advantage.scale"):
        plugin("grpo", scale=True)
