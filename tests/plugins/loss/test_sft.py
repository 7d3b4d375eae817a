"""``loss=sft``: cross-entropy on the response tokens only, divided by the mini-batch's token
count so the micro-batch split does not change it."""

from __future__ import annotations

import pytest
import torch

from rlfuse.data import Batch, ForwardOutput
from rlfuse.manager import instantiate, resolve


class FakeCtx:
    def __init__(self, logprobs, entropy):
        self.out = ForwardOutput(logprobs=logprobs, entropy=entropy)

    def forward(self, batch, **_):
        return self.out


LP = [[-9.0, -1.0, -2.0, -9.0], [-9.0, -0.5, -9.0, -9.0]]  # -9: prompt / padding, never counted
MASK = [[0, 1, 1, 0], [0, 1, 0, 0]]


def batch(totals):
    return Batch(input_ids=torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.long),
                 response_mask=torch.tensor(MASK, dtype=torch.float32), totals=totals)  # fmt: skip


def test_nll_of_response_tokens_hand_computed():
    lp = torch.tensor(LP, requires_grad=True)
    ent = torch.tensor([[5.0, 1.0, 2.0, 5.0], [5.0, 3.0, 5.0, 5.0]])
    plugin = instantiate(resolve("sft"), {}, name="sft", where="loss.sft")
    out = plugin.loss(ctx=FakeCtx(lp, ent), batch=batch({"tokens": 3.0}))
    assert float(out.terms["sft"].detach()) == pytest.approx((1.0 + 2.0 + 0.5) / 3)
    assert float(out.metrics["policy/nll"]) == pytest.approx(3.5 / 3)
    assert float(out.metrics["policy/entropy"]) == pytest.approx((1.0 + 2.0 + 3.0) / 3)
    out.terms["sft"].backward()
    assert torch.equal(lp.grad, -torch.tensor(MASK, dtype=torch.float32) / 3)


def test_divides_by_the_mini_batch_token_count():
    # this micro-batch holds 3 of the mini-batch's 12 tokens: its share is 3.5 / 12
    lp = torch.tensor(LP)
    plugin = instantiate(resolve("sft"), {}, name="sft", where="loss.sft")
    out = plugin.loss(ctx=FakeCtx(lp, torch.zeros(2, 4)), batch=batch({"tokens": 12.0}))
    assert float(out.terms["sft"]) == pytest.approx(3.5 / 12)
    assert float(out.metrics["policy/nll"]) == pytest.approx(3.5 / 3)  # the metric is this batch's mean
