"""``advantage=reinforce_pp``: token returns-to-go normalised over the batch, and the group
baseline of REINFORCE++-baseline, against hand-computed cases."""

from __future__ import annotations

import statistics

import pytest
import torch

from rlfuse.manager import PluginError, instantiate, resolve
from support import make_batch, rtg_reference, seq_values

DTYPES = [torch.float32, torch.bfloat16]


def plugin(name="reinforce_pp", **options):
    return instantiate(resolve(name), options, name=name, where="advantage")


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


def test_bad_config_is_an_error_naming_the_key():
    with pytest.raises(PluginError, match="baseline"):
        plugin("reinforce_pp", baseline="mean")
