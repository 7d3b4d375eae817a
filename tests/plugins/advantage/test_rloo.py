"""``advantage=rloo``: leave-one-out baselines against hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from rlfuse.manager import instantiate, resolve
from support import make_batch, seq_values


def plugin(name="rloo", **options):
    return instantiate(resolve(name), options, name=name, where="advantage")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rloo_hand_computed(dtype):
    rewards = [1.0, 3.0, 0.0, 0.0, 1.0, 2.0, 0.5]
    groups = [0, 1, 0, 0, 1, 1, 0]
    batch = make_batch(rewards, [2, 3, 1, 4, 2, 5, 3], groups, dtype=dtype)
    out = plugin("rloo").advantage(ctx=None, batch=batch)
    # group 0 = (1, 0, 0, 0.5): 1 - 0.5/3, 0 - 1.5/3, 0 - 1.5/3, 0.5 - 1/3
    # group 1 = (3, 1, 2):     3 - 1.5,   1 - 2.5,   2 - 2
    want = [1 - 0.5 / 3, 1.5, -0.5, -0.5, -1.5, 0.0, 0.5 - 1 / 3]
    assert seq_values(out.advantages, batch) == pytest.approx(want, abs=1e-6)


def test_rloo_scale_std():
    # one group (1, 0, 0, 0.5): unbiased std sqrt(sum (r - 0.375)^2 / 3)
    rewards = [1.0, 0.0, 0.0, 0.5]
    batch = make_batch(rewards, [1, 2, 3, 1], [0, 0, 0, 0])
    mean = sum(rewards) / 4
    std = (sum((r - mean) ** 2 for r in rewards) / 3) ** 0.5
    plain = [r - (sum(rewards) - r) / 3 for r in rewards]
    out = plugin("rloo", scale_std=True, eps=0.0).advantage(ctx=None, batch=batch)
    assert seq_values(out.advantages, batch) == pytest.approx([a / std for a in plain], abs=1e-6)


def test_rloo_rejects_singleton_groups():
    batch = make_batch([1.0, 0.0, 1.0], [1, 2, 3], [0, 0, 1])
    with pytest.raises(ValueError, match="at least 2 responses"):
        plugin("rloo").advantage(ctx=None, batch=batch)


def test_rloo_needs_group_ids():
    batch = make_batch([1.0, 0.0], [1, 2])
    with pytest.raises(ValueError, match="rollout.n >= 2"):
        plugin("rloo").advantage(ctx=None, batch=batch)
