"""``loss=sft``: cross-entropy on the response (completion) tokens only.

    loss = - sum_t m_t log pi(y_t | y_<t) / N_tokens        (token mean over the mini-batch)
"""

from __future__ import annotations

from typing import Any

from rlfuse import hookimpl
from rlfuse.data import Batch, LossOutput


@hookimpl
def setup(ctx: Any) -> None:
    ctx.require_forward(logprobs=True, entropy=True)  # the NLL; entropy logged as policy/entropy


@hookimpl
def loss(ctx: Any, batch: Batch) -> LossOutput:
    out = ctx.forward(batch)
    m = batch.response_mask
    n = batch.totals.get("tokens") or float(m.sum().clamp_min(1))
    nll = -(out.logprobs * m).sum() / n
    tokens = m.sum().clamp_min(1)
    return LossOutput(
        terms={"sft": nll},
        metrics={"policy/nll": (-(out.logprobs * m).sum() / tokens).detach(), "policy/entropy": ((out.entropy * m).sum() / tokens).detach()},
    )
