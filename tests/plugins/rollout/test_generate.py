"""``rollout=generate``: ``batch_size`` prompts, ``n`` sampled responses each (rows of one
prompt share a group id and carry the prompt's dataset row), the old policy's log-probs, a
seeded prompt order that survives a resume."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from rlfuse import models, trainer
from rlfuse.manager import PluginError, PluginManager, instantiate, resolve
from support import compose, load_plugins


def make_ctx(overrides):
    cfg = compose(["algo=grpo", "eval=[]", "logger=[]", "reward=[]", *overrides])
    pm = PluginManager()
    ctx = trainer.Context(cfg, Path(tempfile.mkdtemp()), pm)
    load_plugins(cfg, pm)
    ctx.tokenizer = models.load_tokenizer(cfg.model)
    ctx.policy = models.load_policy(cfg.model, ctx.tokenizer, cfg.seed)
    ctx.hook.setup(ctx=ctx)
    return ctx


def test_groups_rows_and_old_logprobs():
    torch.manual_seed(0)
    ctx = make_ctx(["rollout.batch_size=3", "rollout.n=2", "rollout.max_new_tokens=5"])
    batch = ctx.hook.rollout(ctx=ctx, step=0)
    assert len(batch) == 6
    assert batch.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
    for i in range(0, 6, 2):  # the two samples of a prompt: same prompt, same dataset row
        assert batch.prompts[i] == batch.prompts[i + 1] and batch.rows[i] == batch.rows[i + 1]
        assert batch.rows[i]["prompt"] == batch.prompts[i] and "target" in batch.rows[i]
    m = batch.response_mask
    assert int(m.sum(-1).max()) <= 5 and bool((m.sum(-1) >= 1).all())
    # old log-probs are the policy's own, on the response tokens only
    with torch.no_grad():
        lp = models.forward(ctx.policy, batch).logprobs
    torch.testing.assert_close(batch.old_logprobs, lp * m, rtol=1e-5, atol=1e-5)
    assert torch.all(batch.old_logprobs[m == 0] == 0)
    assert batch.cache["rollout_forward"].hidden is not None  # reused by advantage=gae


def test_prompt_order_is_seeded_and_resumes():
    def prompts(ctx, steps):
        return [ctx.hook.rollout(ctx=ctx, step=s).prompts for s in steps]

    over = ["rollout.batch_size=4", "rollout.max_new_tokens=1"]
    a = make_ctx(over)
    first = prompts(a, [0, 1])
    state = {k: v for d in a.hook.save_state(ctx=a) if d for k, v in d.items()}
    third = prompts(a, [2])
    b = make_ctx(over)
    assert prompts(b, [0, 1]) == first
    c = make_ctx(over)
    c.hook.load_state(ctx=c, state=state)
    assert prompts(c, [2]) == third
    assert first[0] != first[1]


def test_bad_sizes_are_errors_naming_the_key():
    with pytest.raises(PluginError, match="rollout.batch_size and rollout.n"):
        instantiate(resolve("generate"), {"n": 0}, name="generate", where="rollout")
