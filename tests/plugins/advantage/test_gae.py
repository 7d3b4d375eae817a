"""``advantage=gae``: the vectorised GAE against a plain per-row Python loop and a
hand-computed case; reward placement and whitening."""

from __future__ import annotations

import pytest
import torch

from rlfuse.data import Batch
from rlfuse.plugins.advantage._common import masked_whiten as whiten
from rlfuse.plugins.advantage._common import token_rewards
from rlfuse.plugins.advantage.gae import gae


def gae_reference(rewards: list[float], values: list[float], gamma: float, lam: float):
    """Textbook GAE over one response (lists), the episode ends after the last token."""
    n = len(rewards)
    adv = [0.0] * n
    running = 0.0
    for t in reversed(range(n)):
        next_v = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv, [a + v for a, v in zip(adv, values, strict=True)]


def test_gae_hand_computed():
    # one row: prompt token, three response tokens, padding; reward 1 on the last token
    r = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    v = torch.tensor([[0.0, 0.5, 0.6, 0.7, 0.0]])
    m = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.95)
    # delta = (0 + 0.6 - 0.5, 0 + 0.7 - 0.6, 1 - 0.7) = (0.1, 0.1, 0.3)
    # A_3 = 0.3, A_2 = 0.1 + 0.95 * 0.3 = 0.385, A_1 = 0.1 + 0.95 * 0.385 = 0.46575
    assert adv[0].tolist() == pytest.approx([0.0, 0.46575, 0.385, 0.3, 0.0])
    assert ret[0].tolist() == pytest.approx([0.0, 0.96575, 0.985, 1.0, 0.0])
    adv, _ = gae(r, v, m, gamma=0.9, lam=0.5)
    # delta = (0.9 * 0.6 - 0.5, 0.9 * 0.7 - 0.6, 0.3) = (0.04, 0.03, 0.3); gamma * lam = 0.45
    a3 = 0.3
    a2 = 0.03 + 0.45 * a3
    a1 = 0.04 + 0.45 * a2
    assert adv[0, 1:4].tolist() == pytest.approx([a1, a2, a3])


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (0.7, 0.3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gae_matches_reference_loop(gamma, lam, dtype):
    torch.manual_seed(1)
    B, T, P = 5, 9, 2
    lengths = [1, 3, 7, 5, 0]
    m = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        m[i, P : P + n] = 1
    r = (torch.randn(B, T) * m).to(dtype)
    v = (torch.randn(B, T) * m).to(dtype)
    adv, ret = gae(r.float(), v.float(), m, gamma, lam)
    for i, n in enumerate(lengths):
        rs, vs = r[i, P : P + n].float().tolist(), v[i, P : P + n].float().tolist()
        want_a, want_r = gae_reference(rs, vs, gamma, lam)
        assert adv[i, P : P + n].tolist() == pytest.approx(want_a, abs=1e-5)
        assert ret[i, P : P + n].tolist() == pytest.approx(want_r, abs=1e-5)
        assert torch.all(adv[i][m[i] == 0] == 0) and torch.all(ret[i][m[i] == 0] == 0)


def test_sequence_reward_goes_on_the_last_response_token():
    m = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    tok = torch.tensor([[0.0, -0.1, -0.2, 5.0], [0.0, 0.0, 0.3, 0.0]])
    b = Batch(input_ids=torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.long),
              response_mask=m, rewards=torch.tensor([1.0, 2.0]), token_rewards=tok)  # fmt: skip
    want = torch.tensor([[0.0, -0.1, 0.8, 0.0], [0.0, 0.0, 0.3, 2.0]])
    assert torch.allclose(token_rewards(b).float(), want)  # padding token reward 5.0 is dropped


def test_whiten_masked():
    x = torch.tensor([[9.0, 1.0, 2.0], [3.0, 4.0, 9.0]])
    m = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    w = whiten(x, m)
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0])
    want = (vals - vals.mean()) / vals.std()
    assert w[m > 0].tolist() == pytest.approx(want.tolist(), abs=1e-6)
    assert torch.all(w[m == 0] == 0)
