"""``reward=kl_penalty``: the per-token KL penalty to the reference, its fixed and adaptive
coefficient, and the coefficient's checkpoint state."""

from __future__ import annotations

import pytest
import torch

from rlfuse.data import Batch
from rlfuse.manager import PluginError, instantiate, resolve


class FakeCtx:
    """Just what the kl_penalty plugin uses: the reference log-probs and ``record``."""

    def __init__(self):
        self.recorded = {}

    def ref_logprobs(self, batch):
        return batch.ref_logprobs

    def record(self, metrics):
        self.recorded.update(metrics)


# Two rows, T = 5: column 0 is the prompt, row 0 has 3 response tokens, row 1 has 2.
MASK = [[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]]


def make():
    return Batch(
        input_ids=torch.zeros(2, 5, dtype=torch.long),
        attention_mask=torch.ones(2, 5, dtype=torch.long),
        response_mask=torch.tensor(MASK, dtype=torch.float32),
        old_logprobs=torch.full((2, 5), -0.3),
    )


def test_kl_controller_fixed_and_adaptive():
    from rlfuse.plugins.reward.kl_penalty import KLController

    fixed = KLController(0.1)
    assert fixed.update(5.0, 64) == 0.1
    ctl = KLController(0.1, adaptive=True, target=1.0, horizon=100)
    # KL 2 is above target: error clipped to +0.2, beta *= 1 + 0.2 * 10 / 100
    assert ctl.update(2.0, 10) == pytest.approx(0.1 * 1.02)
    # KL 0.5 is below: error -0.5 clipped to -0.2
    assert ctl.update(0.5, 10) == pytest.approx(0.1 * 1.02 * 0.98)
    # KL 1.1: error +0.1, not clipped
    assert ctl.update(1.1, 50) == pytest.approx(0.1 * 1.02 * 0.98 * 1.05)
    with pytest.raises(ValueError, match="beta"):
        KLController(-1.0)


def test_kl_penalty_reward_and_state():
    plugin = instantiate(resolve("kl_penalty"), {"beta": 0.2, "adaptive": True, "target": 1.0, "horizon": 10},
                         name="kl_penalty", where="reward.kl_penalty")  # fmt: skip
    batch = make()
    batch.ref_logprobs = batch.old_logprobs - torch.tensor([[0, 0.5, 0.5, 0.5, 9], [0, 1.0, 1.0, 9, 9]])
    ctx = FakeCtx()
    out = plugin.reward(ctx=ctx, batch=batch)["kl_penalty"]
    m = torch.tensor(MASK, dtype=torch.float32)
    want = -0.2 * torch.tensor([[0, 0.5, 0.5, 0.5, 0], [0, 1.0, 1.0, 0, 0]]) * m
    assert torch.allclose(out, want)
    # per-sequence KL 1.5 and 2.0, mean 1.75: error clipped to 0.2, beta *= 1 + 0.2 * 2 / 10
    assert ctx.recorded["kl/ref"] == pytest.approx(1.75) and ctx.recorded["kl/beta"] == 0.2
    assert plugin.ctl.beta == pytest.approx(0.2 * 1.04)
    state = plugin.save_state()
    other = instantiate(resolve("kl_penalty"), {"beta": 0.2}, name="kl_penalty", where="reward.kl_penalty")
    other.load_state(state=state)
    assert other.ctl.beta == pytest.approx(0.2 * 1.04)


def test_fixed_beta_does_not_move():
    plugin = instantiate(resolve("kl_penalty"), {"beta": 0.1}, name="kl_penalty", where="reward.kl_penalty")
    batch = make()
    batch.ref_logprobs = batch.old_logprobs - 2.0
    for _ in range(3):
        out = plugin.reward(ctx=FakeCtx(), batch=batch)["kl_penalty"]
    assert plugin.ctl.beta == 0.1
    assert torch.allclose(out, -0.1 * 2.0 * torch.tensor(MASK, dtype=torch.float32))


def test_needs_an_online_rollout_and_a_valid_beta():
    plugin = instantiate(resolve("kl_penalty"), {}, name="kl_penalty", where="reward.kl_penalty")
    batch = make()
    batch.old_logprobs = None
    with pytest.raises(ValueError, match="old log-probs"):
        plugin.reward(ctx=FakeCtx(), batch=batch)
    with pytest.raises(PluginError, match="reward.kl_penalty.*beta"):
        instantiate(resolve("kl_penalty"), {"beta": -1.0}, name="kl_penalty", where="reward.kl_penalty")
