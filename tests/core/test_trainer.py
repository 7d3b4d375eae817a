"""Pieces of the loop: the Batch record, the learning-rate schedule, reward weighting."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from rlfuse.data import Batch
from rlfuse.trainer import lr_factor


def _batch(B=5, T=7):
    ids = torch.arange(B * T).reshape(B, T)
    return Batch(
        input_ids=ids,
        attention_mask=torch.ones(B, T, dtype=torch.long),
        response_mask=torch.zeros(B, T),
        prompts=[f"p{i}" for i in range(B)],
        responses=[f"r{i}" for i in range(B)],
        rows=[{"i": i} for i in range(B)],
        group_ids=torch.arange(B) // 2,
        extras={"per_row": torch.arange(B) * 10, "constant": 3},
    )


def test_select_slices_every_per_row_field():
    b = _batch()
    s = b.select([4, 1])
    assert s.input_ids[:, 0].tolist() == [28, 7]
    assert s.prompts == ["p4", "p1"] and s.rows == [{"i": 4}, {"i": 1}]
    assert s.group_ids.tolist() == [2, 0]
    assert s.extras["per_row"].tolist() == [40, 10] and s.extras["constant"] == 3
    assert s.totals == {} and set(s.cache) == {"parent"}  # no forward results carried over


def test_split_covers_the_batch_in_order():
    parts = list(_batch(B=5).split(2))
    assert [len(p) for p in parts] == [2, 2, 1]
    assert torch.cat([p.input_ids for p in parts]).equal(_batch(B=5).input_ids)


def _cfg(**trainer):
    base = dict(warmup_steps=0, schedule="constant", max_steps=10, min_lr_ratio=0.0)
    base.update(trainer)
    return OmegaConf.create({"trainer": base})


def test_lr_schedules():
    assert [lr_factor(s, _cfg(warmup_steps=4)) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    cos = _cfg(schedule="cosine", max_steps=10)
    assert lr_factor(0, cos) == pytest.approx(1.0)
    assert lr_factor(5, cos) == pytest.approx(0.5)
    assert lr_factor(10, cos) == pytest.approx(0.0)
    lin = _cfg(schedule="linear", max_steps=10, min_lr_ratio=0.1)
    assert lr_factor(5, lin) == pytest.approx(0.1 + 0.9 * 0.5)
    with pytest.raises(ValueError, match="trainer.schedule"):
        lr_factor(3, _cfg(schedule="exp"))


def test_reward_weights_and_shapes():
    from types import SimpleNamespace

    from rlfuse.manager import PluginError
    from rlfuse.trainer import _apply_rewards

    b = _batch(B=3, T=4)
    b.response_mask[:, 2:] = 1

    class Hook:
        def __init__(self, results):
            self.results = results

        def reward(self, ctx, batch):
            return self.results

    seq = torch.tensor([1.0, 2.0, 3.0])
    tok = torch.ones(3, 4)
    ctx = SimpleNamespace(hook=Hook([{"a": seq}, {"b": tok}]), reward_weights={"a": 2.0, "b": 0.5})
    m = {}
    _apply_rewards(ctx, b, m)
    assert b.rewards.tolist() == [2.0, 4.0, 6.0]
    assert b.token_rewards.tolist() == (0.5 * tok).tolist()
    assert m["reward/a/mean"] == pytest.approx(2.0)
    assert m["reward/b/mean"] == pytest.approx(2.0)  # 2 response tokens x 1.0, unweighted
    assert m["reward/mean"] == pytest.approx(4.0 + 1.0)
    ctx.hook = Hook([{"bad": torch.ones(2)}])
    with pytest.raises(PluginError, match="reward 'bad' returned shape"):
        _apply_rewards(ctx, _batch(B=3, T=4), {})


def test_reference_logprobs_are_computed_once_per_rollout(monkeypatch):
    """Mini/micro-batches slice the rollout batch's reference log-probs instead of
    recomputing them (one reference forward per step, whatever the epochs and splits)."""
    from types import SimpleNamespace

    from rlfuse import models
    from rlfuse.data import ForwardOutput
    from rlfuse.trainer import Context

    calls = []

    def fake_forward(model, batch, **kw):
        calls.append(len(batch))
        return ForwardOutput(logprobs=batch.input_ids.float() / 100)

    monkeypatch.setattr(models, "forward", fake_forward)
    ctx = Context.__new__(Context)
    ctx._reference = SimpleNamespace()
    b = _batch(B=6, T=3)
    b.response_mask[:] = 1
    for _ in range(2):  # two epochs, reshuffled mini-batches, micro-batches
        mini = b.select(torch.randperm(6)[:4])
        for micro in mini.split(2):
            ref = ctx.ref_logprobs(micro)
            assert torch.equal(ref, micro.input_ids.float() / 100)
    assert calls == [6]


def _bare_context(fused_loss="auto"):
    """A Context with only the shared-forward state (no models, no plugins)."""
    from omegaconf import OmegaConf

    from rlfuse.trainer import Context

    ctx = Context.__new__(Context)
    ctx.policy = None
    ctx.cfg = OmegaConf.create({"kernels": {"backend": "torch", "fused_loss": fused_loss}})
    ctx._forward_needs = {"entropy": False, "hidden": False}
    ctx._head_readers = 0
    ctx._logprob_readers = False
    return ctx


@pytest.mark.parametrize(
    "declared, mode, want",
    [
        ([{"entropy": True, "head": True}, {"hidden": True}], "auto", True),  # ppo + gae's critic
        ([{"entropy": True, "head": True}, {"logprobs": True}], "auto", False),  # + a log-prob reader
        ([{"entropy": True, "head": True}, {"entropy": True}], "auto", False),  # + an entropy reader
        ([{"entropy": True, "head": True}, {"logprobs": True}], "true", True),
        ([{"entropy": True, "head": True}], "false", False),
        ([{"head": True}, {"head": True}], "true", False),  # two head readers: no one owns the head
        ([{"entropy": True}], "true", False),  # an entropy reader, nobody takes head inputs
        ([{"logprobs": True}, {"hidden": True}], "auto", False),  # loss=sft-like reader
        ([{"hidden": True}], "auto", True),  # a reward model: nobody reads log-probs, no lm_head
        ([{"hidden": True}], "false", False),
    ],
)
def test_head_mode_follows_declarations(declared, mode, want, monkeypatch):
    """The shared forward stops before the lm_head only when one plugin takes head inputs
    and (``kernels.fused_loss=auto``) nobody else declared reading log-probs or entropy."""
    from rlfuse import models
    from rlfuse.data import ForwardOutput

    seen = []

    def fake_forward(model, batch, *, head=False, **kw):
        seen.append(head)
        return ForwardOutput(logprobs=batch.input_ids.float().requires_grad_())

    monkeypatch.setattr(models, "forward", fake_forward)
    ctx = _bare_context(mode)
    for kw in declared:
        ctx.require_forward(**kw)
    ctx.forward(_batch())
    with torch.no_grad():  # no-grad forwards never stop early: nothing would train on them
        ctx.forward(_batch())
    assert seen == [want, False]


def test_shared_forward_computes_what_plugins_declared_once(monkeypatch):
    """What the shared forward must hold is declared at setup (``ctx.require_forward``), so
    the first loss plugin's call computes it all, whatever order pluggy calls them in; an
    undeclared call honours its own ``entropy`` argument."""
    from rlfuse import models
    from rlfuse.data import ForwardOutput

    calls = []

    def fake_forward(model, batch, *, entropy=False, hidden=False, **kw):
        calls.append((entropy, hidden))
        lp = batch.input_ids.float().requires_grad_()
        return ForwardOutput(logprobs=lp, entropy=lp if entropy else None, hidden=lp[..., None] if hidden else None)

    monkeypatch.setattr(models, "forward", fake_forward)
    ctx = _bare_context()
    ctx.forward(_batch())
    assert calls == [(False, False)]  # entropy is no longer forced
    calls.clear()
    ctx.require_forward(entropy=True)  # loss=ppo's setup
    ctx.require_forward(hidden=True)  # advantage=gae's setup
    b = _batch()
    ctx.forward(b)  # ppo's loss first: computes hidden states too
    ctx.forward(b, hidden=True)  # gae's loss: served from the cache
    assert calls == [(True, True)]


def test_hidden_only_forward_skips_the_lm_head_until_logprobs_are_read(monkeypatch):
    """A reward model's training forward (only ``hidden`` declared) stops before the lm_head:
    same hidden states and gradients as the full forward, no log-softmax unless a plugin
    reads ``out.logprobs`` -- which then gives the full forward's numbers."""
    from rlfuse import models
    from rlfuse.config import ModelConfig
    from rlfuse.data import HeadInputs

    torch.manual_seed(0)
    policy = models.build_tiny_model(ModelConfig(), models.build_tiny_tokenizer(), seed=0)
    ids = torch.randint(4, 90, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    batch = Batch(ids, mask, (torch.arange(9) >= 4).float().expand(3, 9) * mask)
    calls = []
    real = HeadInputs.logprobs
    monkeypatch.setattr(HeadInputs, "logprobs", lambda self, e: calls.append(e) or real(self, e))

    def run(mode):
        ctx = _bare_context(mode)
        ctx.policy = policy
        ctx.require_forward(hidden=True)
        part = batch.select(torch.arange(3))
        policy.zero_grad(set_to_none=True)
        out = ctx.forward(part)
        (out.hidden * mask[..., None]).sum().backward()
        grads = {k: p.grad.clone() for k, p in policy.named_parameters() if p.grad is not None}
        return out, grads

    calls.clear()
    lazy, g_lazy = run("auto")
    assert lazy.head is not None and calls == []  # the lm_head never ran
    eager, g_eager = run("false")
    assert eager.head is None and len(calls) == 1
    torch.testing.assert_close(lazy.hidden, eager.hidden)
    assert g_lazy.keys() == g_eager.keys()
    for k in g_lazy:
        torch.testing.assert_close(g_lazy[k], g_eager[k], msg=k)
    with torch.no_grad():
        torch.testing.assert_close(lazy.logprobs, eager.logprobs)  # an undeclared reader
    assert len(calls) == 2
