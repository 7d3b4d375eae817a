"""``advantage=dr_grpo``: ``A_i = R_i - mean_g R`` (GRPO without the std division)."""

from __future__ import annotations

import pytest
import torch

from rlfuse.manager import instantiate, resolve
from support import make_batch, seq_values

# groups: 7 -> rows 0, 2, 4, 5 (rewards 1, 0, 0, 1); 3 -> rows 1, 6, 7 (all 0.25); 9 -> row 3
REWARDS = [1.0, 0.25, 0.0, 0.5, 0.0, 1.0, 0.25, 0.25]
GROUPS = [7, 3, 7, 9, 7, 7, 3, 3]
LENGTHS = [3, 1, 5, 2, 4, 1, 3, 2]


def plugin(name="dr_grpo", **options):
    return instantiate(resolve(name), options, name=name, where="advantage")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dr_grpo_hand_computed(dtype):
    batch = make_batch(REWARDS, LENGTHS, GROUPS, dtype=dtype)
    out = plugin("dr_grpo").advantage(ctx=None, batch=batch)
    want = [0.5, 0.0, -0.5, 0.0, -0.5, 0.5, 0.0, 0.0]
    assert seq_values(out.advantages, batch) == pytest.approx(want, abs=1e-6)


def test_dr_grpo_is_grpo_without_std_scaling():
    # the same rewards, scaled by 10: Dr. GRPO's advantages scale by 10, GRPO's do not move
    batch = make_batch(REWARDS, LENGTHS, GROUPS)
    big = make_batch([10 * r for r in REWARDS], LENGTHS, GROUPS)
    dr = [seq_values(plugin("dr_grpo").advantage(ctx=None, batch=b).advantages, b) for b in (batch, big)]
    assert dr[1] == pytest.approx([10 * a for a in dr[0]], abs=1e-5)
    g = [seq_values(plugin("grpo", eps=0.0).advantage(ctx=None, batch=b).advantages, b) for b in (batch, big)]
    assert g[1] == pytest.approx(g[0], abs=1e-5)
    assert plugin("dr_grpo").cfg.scale_std is False


def test_dr_grpo_needs_group_ids():
    batch = make_batch([1.0, 0.0], [1, 2])
    with pytest.raises(ValueError, match="rollout.n >= 2"):
        plugin("dr_grpo").advantage(ctx=None, batch=batch)


def test_token_rewards_are_summed_into_the_sequence_return():
    tok = torch.zeros(2, 6)
    tok[0, 2], tok[0, 5] = 0.5, 7.0  # position 5 is padding in row 0: ignored
    tok[1, 3] = -0.25
    batch = make_batch([1.0, 1.0], [2, 3], [0, 0], T=6, token_rewards=tok)
    out = plugin("dr_grpo").advantage(ctx=None, batch=batch)
    # returns 1.5 and 0.75, mean 1.125
    assert seq_values(out.advantages, batch) == pytest.approx([0.375, -0.375])
