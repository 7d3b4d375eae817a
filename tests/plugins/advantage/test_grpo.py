"""Critic-free advantage estimators against hand-computed cases (fp32 and bf16 rewards, masks,
odd sizes, groups that are neither contiguous nor of equal size)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from rlfuse.data import Batch
from rlfuse.manager import instantiate, resolve
from rlfuse.plugins.advantage import _common as au

DTYPES = [torch.float32, torch.bfloat16]


def make_batch(rewards, lengths, group_ids=None, T=None, prompt=2, token_rewards=None, dtype=torch.float32):
    """Rows ``[prompt tokens][response of lengths[i]][padding]``."""
    B = len(lengths)
    T = T or prompt + max(lengths) + 1
    mask = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        mask[i, prompt : prompt + n] = 1
    return Batch(
        input_ids=torch.zeros(B, T, dtype=torch.long),
        attention_mask=torch.ones(B, T, dtype=torch.long),
        response_mask=mask,
        rewards=None if rewards is None else torch.tensor(rewards).to(dtype),
        token_rewards=None if token_rewards is None else token_rewards.to(dtype),
        group_ids=None if group_ids is None else torch.tensor(group_ids),
    )


def plugin(name, **options):
    return instantiate(resolve(name), options, name=name, where="advantage")


def seq_values(adv: torch.Tensor, batch: Batch) -> list[float]:
    """The per-row constant of a sequence-level advantage (and check it is constant and
    zero outside the response)."""
    m = batch.response_mask
    assert adv.dtype == torch.float32 and adv.shape == m.shape
    assert torch.all(adv[m == 0] == 0)
    out = []
    for i in range(len(m)):
        vals = adv[i][m[i] > 0]
        assert torch.all(vals == vals[0])
        out.append(float(vals[0]))
    return out


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


@pytest.mark.parametrize("dtype", DTYPES)
def test_dr_grpo_hand_computed(dtype):
    batch = make_batch(REWARDS, LENGTHS, GROUPS, dtype=dtype)
    out = plugin("dr_grpo").advantage(ctx=None, batch=batch)
    want = [0.5, 0.0, -0.5, 0.0, -0.5, 0.5, 0.0, 0.0]
    assert seq_values(out.advantages, batch) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rloo_hand_computed(dtype):
    rewards = [1.0, 3.0, 0.0, 0.0, 1.0, 2.0, 0.5]
    groups = [0, 1, 0, 0, 1, 1, 0]
    batch = make_batch(rewards, [2, 3, 1, 4, 2, 5, 3], groups, dtype=dtype)
    out = plugin("rloo").advantage(ctx=None, batch=batch)
    # group 0 = (1, 0, 0, 0.5): 1 - 0.5/3, 0 - 1.5/3, 0 - 1.5/3, 0.5 - 1/3
    # group 1 = (3, 1, 2):     3 - 1.5,   1 - 2.5,   2 - 2
    want = [1 - 0.5 / 3, 1.5, -0.5, -0.5, -1.5, 0.0, 0.5 - 1 / 3]
    assert seq_values(out.advantages, batch) == pytest.approx(want, abs=1e-6)


def test_rloo_rejects_singleton_groups():
    batch = make_batch([1.0, 0.0, 1.0], [1, 2, 3], [0, 0, 1])
    with pytest.raises(ValueError, match="at least 2 responses"):
        plugin("rloo").advantage(ctx=None, batch=batch)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_need_group_ids(name):
    batch = make_batch([1.0, 0.0], [1, 2])
    with pytest.raises(ValueError, match="rollout.n >= 2"):
        plugin(name).advantage(ctx=None, batch=batch)


def test_token_rewards_are_summed_into_the_sequence_return():
    tok = torch.zeros(2, 6)
    tok[0, 2], tok[0, 5] = 0.5, 7.0  # position 5 is padding in row 0: ignored
    tok[1, 3] = -0.25
    batch = make_batch([1.0, 1.0], [2, 3], [0, 0], T=6, token_rewards=tok)
    out = plugin("dr_grpo").advantage(ctx=None, batch=batch)
    # returns 1.5 and 0.75, mean 1.125
    assert seq_values(out.advantages, batch) == pytest.approx([0.375, -0.375])


def rtg_reference(rows: list[list[float]], gamma: float) -> list[list[float]]:
    """Return-to-go of plain Python lists."""
    out = []
    for r in rows:
        g, acc = [], 0.0
        for x in reversed(r):
            acc = x + gamma * acc
            g.append(acc)
        out.append(g[::-1])
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_reinforce_pp_hand_computed(dtype, gamma):
    # row 0: response at positions 1..3, row 1: positions 1..2 (T=5, position 4 is padding)
    tok = torch.tensor([[0.0, -0.125, 0.0, -0.25, 9.0], [0.0, 0.375, 0.0, 0.0, 9.0]])
    batch = make_batch([1.0, 0.0], [3, 2], prompt=1, T=5, token_rewards=tok, dtype=dtype)
    out = plugin("reinforce_pp", gamma=gamma).advantage(ctx=None, batch=batch)
    # per-token rewards, the sequence reward on the last response token
    G = rtg_reference([[-0.125, 0.0, -0.25 + 1.0], [0.375, 0.0]], gamma)
    flat = G[0] + G[1]
    mean, std = statistics.fmean(flat), statistics.stdev(flat)
    want = [[(g - mean) / (std + 1e-8) for g in row] for row in G]
    adv = out.advantages
    assert adv.dtype == torch.float32
    assert adv[0, 1:4].tolist() == pytest.approx(want[0], abs=1e-5)
    assert adv[1, 1:3].tolist() == pytest.approx(want[1], abs=1e-5)
    assert adv[0, [0, 4]].tolist() == [0.0, 0.0] and adv[1, [0, 3, 4]].tolist() == [0.0] * 3


@pytest.mark.parametrize("dtype", DTYPES)
def test_reinforce_pp_group_baseline(dtype):
    batch = make_batch([1.0, 0.0, 0.5, 0.5, 0.25], [2, 1, 3, 2, 1], [0, 0, 1, 1, 0], dtype=dtype)
    out = plugin("reinforce_pp", baseline="group").advantage(ctx=None, batch=batch)
    # group 0 mean 0.41667: returns 0.58333 (x2 tokens), -0.41667 (x1), -0.16667 (x1);
    # group 1 all 0.5 -> 0 (x5 tokens). Not re-centred; divided by the token std.
    mu = (1.0 + 0.0 + 0.25) / 3
    G = [1 - mu, 1 - mu, 0 - mu, 0, 0, 0, 0, 0, 0.25 - mu]
    std = statistics.stdev(G)
    got = seq_values(out.advantages, batch)
    want = [(1 - mu) / std, (0 - mu) / std, 0.0, 0.0, (0.25 - mu) / std]
    assert got == pytest.approx(want, abs=1e-5)


def test_reinforce_moving_average_baseline_and_state():
    p = plugin("reinforce", decay=0.9)
    b1 = make_batch([1.0, 0.0, 0.5], [2, 3, 1])
    # first batch: the baseline starts at the batch mean 0.5
    assert seq_values(p.advantage(ctx=None, batch=b1).advantages, b1) == pytest.approx([0.5, -0.5, 0.0])
    assert p.baseline == pytest.approx(0.5)
    b2 = make_batch([1.0, 1.0, 1.0, 1.0, 1.0], [1, 2, 3, 4, 5])
    assert seq_values(p.advantage(ctx=None, batch=b2).advantages, b2) == pytest.approx([0.5] * 5)
    assert p.baseline == pytest.approx(0.9 * 0.5 + 0.1 * 1.0)
    # save_state / load_state: a fresh plugin continues from the saved baseline
    state = p.save_state()
    q = plugin("reinforce", decay=0.9)
    q.load_state(state=state)
    b3 = make_batch([0.0, 1.0], [2, 2])
    assert seq_values(q.advantage(ctx=None, batch=b3).advantages, b3) == pytest.approx([-0.55, 0.45])
    assert q.baseline == pytest.approx(0.9 * 0.55 + 0.1 * 0.5)


def test_returns_to_go_matches_reference_loop():
    torch.manual_seed(0)
    B, T = 5, 11
    r = torch.randn(B, T, dtype=torch.float64)
    mask = torch.zeros(B, T)
    lengths = [0, 1, 4, 7, 9]
    for i, n in enumerate(lengths):
        mask[i, 2 : 2 + n] = 1
    got = au.returns_to_go(r * mask, mask, 0.9)
    for i, n in enumerate(lengths):
        want = rtg_reference([r[i, 2 : 2 + n].tolist()], 0.9)[0]
        assert got[i, 2 : 2 + n].tolist() == pytest.approx(want)
        assert torch.all(got[i][mask[i] == 0] == 0)


def test_bad_config_is_an_error_naming_the_key():
    from rlfuse.manager import PluginError

    with pytest.raises(PluginError, match="baseline"):
        plugin("reinforce_pp", baseline="mean")
    with pytest.raises(PluginError, match="advantage.scale"):
        plugin("grpo", scale=True)
