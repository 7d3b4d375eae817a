"""``loss=ppo`` against a hand-computed case (both clip sides, dual clip, masking, every
aggregation mode, fp32 and bf16)."""

from __future__ import annotations

import math

import pytest
import torch

from rlfuse.data import Batch, ForwardOutput
from rlfuse.manager import PluginError, instantiate, resolve


class FakeCtx:
    """Just what the ppo plugin uses: the policy forward and the reference."""

    def __init__(self, logprobs, entropy=None):
        self.out = ForwardOutput(logprobs=logprobs, entropy=entropy)
        self.recorded = {}

    def forward(self, batch, **_):
        return self.out

    def ref_logprobs(self, batch):
        return batch.ref_logprobs

    def record(self, metrics):
        self.recorded.update(metrics)


# Two rows, T = 5: column 0 is the prompt, row 0 has 3 response tokens (a, b, f), row 1 has
# 2 (c, d) and then a masked token e with a huge ratio and advantage that must not count.
#   token  A     ratio  clip range [0.8, 1.28]       pg      d pg / d logp
#   a     +1     1.5    upper clip: -1 * 1.28        -1.28   0 (clipped)
#   b     -1     0.5    lower clip: +1 * 0.8          0.8    0 (clipped)
#   f     +0.5   1.0    inside                       -0.5   -0.5
#   c     +2     0.9    inside                       -1.8   -1.8
#   d     -1     4.0    max(4, 1.28) = 4; dual clip 3 -> 3   0 (dual clipped)
#   e     +5     10     masked
RATIOS = [[1.0, 1.5, 0.5, 1.0, 1.0], [1.0, 0.9, 4.0, 10.0, 1.0]]
ADV = [[0.0, 1.0, -1.0, 0.5, 0.0], [0.0, 2.0, -1.0, 5.0, 0.0]]
MASK = [[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]]
PG = {"a": -1.28, "b": 0.8, "f": -0.5, "c": -1.8, "d": 3.0}
ROW0, ROW1 = PG["a"] + PG["b"] + PG["f"], PG["c"] + PG["d"]  # -0.98, 1.2
HAND = {  # loss and d loss / d logp at f (row 0, col 3) and c (row 1, col 1)
    "token-mean": ((ROW0 + ROW1) / 5, -0.5 / 5, -1.8 / 5),
    "seq-mean-token-mean": ((ROW0 / 3 + ROW1 / 2) / 2, -0.5 / 6, -1.8 / 4),
    "seq-mean-token-sum": ((ROW0 + ROW1) / 2, -0.5 / 2, -1.8 / 2),
    "seq-mean-token-sum-norm": ((ROW0 + ROW1) / (2 * 4), -0.5 / 8, -1.8 / 8),
}


def make(dtype=torch.float32, old_shift=-0.3):
    old = torch.full((2, 5), old_shift)
    lp = (old + torch.log(torch.tensor(RATIOS))).to(dtype).requires_grad_(True)
    batch = Batch(
        input_ids=torch.zeros(2, 5, dtype=torch.long),
        attention_mask=torch.ones(2, 5, dtype=torch.long),
        response_mask=torch.tensor(MASK, dtype=torch.float32),
        old_logprobs=old,
        advantages=torch.tensor(ADV),
        totals={"tokens": 5.0, "sequences": 2.0},
    )
    return lp, batch


def ppo(**options):
    return instantiate(resolve("ppo"), options, name="ppo", where="loss.ppo")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("aggregation", list(HAND))
def test_clipped_loss_hand_computed(aggregation, dtype):
    lp, batch = make(dtype)
    plugin = ppo(clip_low=0.2, clip_high=0.28, dual_clip=3.0, aggregation=aggregation, norm_length=4)
    out = plugin.loss(ctx=FakeCtx(lp), batch=batch)
    loss = out.terms["policy"]
    want, g_f, g_c = HAND[aggregation]
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 log-probs round the ratios
    assert float(loss.detach()) == pytest.approx(want, abs=tol)
    loss.backward()
    grad = lp.grad.float()
    expect = torch.zeros(2, 5)
    # d(-A ratio)/d logp = -A ratio, times the aggregation weight, only where unclipped
    expect[0, 3], expect[1, 1] = g_f * 1.0, g_c  # ratio(f) = 1, c's -1.8 already has ratio 0.9
    assert torch.allclose(grad, expect, atol=tol)
    assert float(out.metrics["policy/clipfrac"]) == pytest.approx(2 / 5)  # a and b


def test_without_dual_clip_the_negative_advantage_loss_is_unbounded():
    lp, batch = make()
    out = ppo(clip_low=0.2, clip_high=0.28).loss(ctx=FakeCtx(lp), batch=batch)
    assert float(out.terms["policy"].detach()) == pytest.approx((ROW0 + ROW1 - 3.0 + 4.0) / 5, abs=1e-5)
    out.terms["policy"].backward()
    assert float(lp.grad[1, 2]) == pytest.approx(4.0 / 5, abs=1e-5)  # d is live: -A * ratio = 4


def test_kl_term_and_entropy_bonus_hand_computed():
    lp, batch = make()
    batch.advantages = torch.zeros(2, 5)
    batch.ref_logprobs = lp.detach() - 0.5  # log(pi / ref) = 0.5 on every token
    ent = torch.full((2, 5), 2.0, requires_grad=True)
    plugin = ppo(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)
    out = plugin.loss(ctx=FakeCtx(lp, ent), batch=batch)
    k3 = math.exp(-0.5) + 0.5 - 1  # exp(ref - logp) - (ref - logp) - 1
    assert float(out.terms["policy"].detach()) == pytest.approx(0.1 * k3 - 0.01 * 2.0, abs=1e-6)
    assert float(out.metrics["kl/ref_token"]) == pytest.approx(k3, abs=1e-6)
    out.terms["policy"].backward()
    m = torch.tensor(MASK, dtype=torch.float32)
    assert torch.allclose(lp.grad, 0.1 * (1 - math.exp(-0.5)) * m / 5, atol=1e-7)
    assert torch.allclose(ent.grad, -0.01 * m / 5, atol=1e-8)


def test_ppo_bad_options_are_errors_naming_the_key():
    with pytest.raises(PluginError, match="aggregation"):
        ppo(aggregation="mean")
    with pytest.raises(PluginError, match="dual_clip"):
        ppo(dual_clip=0.5)
    with pytest.raises(PluginError, match="kl_estimator"):
        ppo(kl_estimator="k4")
