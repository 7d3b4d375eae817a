"""``advantage=reinforce``: return-to-go minus a moving-average baseline, saved in checkpoints."""

from __future__ import annotations

import pytest
import torch

from rlfuse.manager import PluginError, instantiate, resolve
from rlfuse.plugins.advantage import _common as au
from support import make_batch, rtg_reference, seq_values


def plugin(name="reinforce", **options):
    return instantiate(resolve(name), options, name=name, where="advantage")


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


def test_reinforce_discounted_token_returns_and_normalize():
    # gamma 0.5, sequence reward 1 on the last of 3 response tokens, row 1 reward 0 (2 tokens):
    # G = (0.25, 0.5, 1) and (0, 0); baseline = batch mean 0.5 on the first batch
    batch = make_batch([1.0, 0.0], [3, 2], prompt=1, T=5)
    out = plugin("reinforce", gamma=0.5).advantage(ctx=None, batch=batch)
    assert out.advantages[0, 1:4].tolist() == pytest.approx([-0.25, 0.0, 0.5])
    assert out.advantages[1, 1:3].tolist() == pytest.approx([-0.5, -0.5])
    assert out.metrics == {"advantage/baseline": 0.5, "advantage/return_mean": 0.5}
    # normalize: divided by the batch std of the sequence returns (std of (1, 0) = 0.7071)
    scaled = plugin("reinforce", gamma=0.5, normalize=True, eps=0.0).advantage(ctx=None, batch=batch)
    assert scaled.advantages[0, 1:4].tolist() == pytest.approx([-0.25 / 0.5**0.5, 0.0, 0.5 / 0.5**0.5])


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


def test_bad_decay_is_an_error_naming_the_key():
    with pytest.raises(PluginError, match="decay"):
        plugin("reinforce", decay=1.0)
