"""loss=dpo on a tiny model: one concatenated forward, cached reference, training raises accuracy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlfuse import models
from rlfuse.config import ModelConfig
from rlfuse.plugins.loss.dpo import Config, Plugin, preference_loss
from rlfuse.plugins._data.pairs import PairItem, pair_batch


class FakeCtx:
    """Just what the dpo plugin uses of rlfuse.trainer.Context."""

    def __init__(self):
        self.tokenizer = models.build_tiny_tokenizer()
        self.policy = models.build_tiny_model(ModelConfig(), self.tokenizer, 0)
        self._reference = None
        self.ref_builds = 0
        self.ref_forwards = 0
        self.metrics = {}
        self.device = torch.device("cpu")
        self.cfg = SimpleNamespace(data=SimpleNamespace(max_length=32, eval_preferences=None))
        self.rollout = SimpleNamespace(items=[])
        self.pm = SimpleNamespace(get_plugin=lambda name: self.rollout)

    @property
    def reference(self):
        if self._reference is None:
            self.ref_builds += 1
            self._reference = models.frozen_copy(self.policy)
        return self._reference

    def drop_reference(self):
        self._reference = None

    def forward(self, batch, model=None, **kw):
        if model is self._reference and model is not None:
            self.ref_forwards += 1
        return models.forward(model or self.policy, batch)

    def record(self, m):
        self.metrics.update(m)


def items(tok, n=5):
    out = []
    for i in range(n):
        p = "dcba"[: 2 + i % 3] + "="
        c, r = "".join(sorted(p[:-1])), p[:-1][::-1] + "x" * (i % 2)
        out.append(PairItem(
            prompt_ids=[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"],
            chosen_ids=tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
            rejected_ids=tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
            prompt=p, chosen=c, rejected=r, row={}, key=f"f:{i}",
        ))
    return out


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_loss_matches_preference_loss_on_summed_logps(loss_type):
    torch.manual_seed(0)
    ctx = FakeCtx()
    its = items(ctx.tokenizer)
    b = pair_batch(its, ctx.tokenizer, 32, "cpu")
    b.totals = {"sequences": float(len(b)), "tokens": float(b.response_mask.sum())}
    plugin = Plugin(Config(beta=0.3, loss_type=loss_type, simpo_gamma=0.2))
    _ = ctx.reference  # the reference is the initial policy
    perturb(ctx.policy)  # the policy moved away from it
    out = plugin.loss(ctx, b)
    P = len(its)
    with torch.no_grad():
        lp = models.forward(ctx.policy, b).logprobs
        rp = models.forward(ctx._reference, b).logprobs
    m = b.response_mask
    pc, pr = (lp * m).sum(-1)[:P], (lp * m).sum(-1)[P:]
    rc, rr = (rp * m).sum(-1)[:P], (rp * m).sum(-1)[P:]
    if loss_type == "simpo":
        n = m.sum(-1)
        want = preference_loss(pc / n[:P], pr / n[P:], None, None, beta=0.3, loss_type="simpo", simpo_gamma=0.2).mean()
    else:
        want = preference_loss(pc, pr, rc, rr, beta=0.3, loss_type=loss_type).mean()
    torch.testing.assert_close(out.terms["dpo"].detach(), want, rtol=1e-5, atol=1e-6)
    assert set(out.metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                                "logps/chosen", "logps/rejected"}
    torch.testing.assert_close(out.metrics["logps/chosen"], pc.mean(), rtol=1e-5, atol=1e-5)
    if loss_type != "simpo":
        torch.testing.assert_close(out.metrics["rewards/margins"], (0.3 * ((pc - rc) - (pr - rr))).mean(), rtol=1e-4, atol=1e-5)
    out.terms["dpo"].backward()  # one graph through the single concatenated forward
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ctx.policy.parameters())


def test_reference_cached_and_precomputed():
    torch.manual_seed(0)
    ctx = FakeCtx()
    its = items(ctx.tokenizer, 6)
    b = pair_batch(its, ctx.tokenizer, 32, "cpu")
    b.totals = {"sequences": float(len(b))}
    plugin = Plugin(Config(beta=0.1))
    first = plugin.loss(ctx, b).terms["dpo"].item()
    assert ctx.ref_forwards == 1
    second = plugin.loss(ctx, b.select(list(range(len(b))))).terms["dpo"].item()
    assert ctx.ref_forwards == 1 and second == pytest.approx(first)  # served from the cache

    ctx2 = FakeCtx()
    ctx2.rollout.items = its
    pre = Plugin(Config(beta=0.1, precompute_reference=True))
    pre.setup(ctx2)
    got = pre.loss(ctx2, pair_batch(its[:3], ctx2.tokenizer, 32, "cpu")).terms["dpo"]
    assert ctx2._reference is None and ctx2.metrics["dpo/precomputed_pairs"] == 6  # reference freed
    sub = b.select([0, 1, 2, 6, 7, 8])
    sub.totals = {"sequences": 6.0}
    assert got.item() == pytest.approx(plugin.loss(ctx, sub).terms["dpo"].item(), rel=1e-5)


def test_split_pair_is_an_error():
    ctx = FakeCtx()
    b = pair_batch(items(ctx.tokenizer), ctx.tokenizer, 32, "cpu")
    with pytest.raises(ValueError, match="whole pairs"):
        Plugin(Config()).loss(ctx, b.select([0, 1, 2]))


def test_config_errors():
    with pytest.raises(ValueError, match="loss_type"):
        Plugin(Config(loss_type="kto"))
    with pytest.raises(ValueError, match="label_smoothing"):
        Plugin(Config(loss_type="ipo", label_smoothing=0.1))


@pytest.mark.slow
def test_dpo_raises_implicit_reward_accuracy(tmp_path):
    """SFT warm-up then DPO on the built-in pairs: held-out implicit-reward accuracy rises."""
    from support import run_job

    sft = run_job(["algo=sft", "trainer.max_steps=60", "trainer.progress=false", "eval.task.num_prompts=16"], tmp_path / "sft")
    s = run_job(["algo=dpo", f"model.name_or_path={sft['final_policy']}", "trainer.max_steps=25", "trainer.eval_every=0",
                 "trainer.progress=false", "eval.task.num_prompts=16"], tmp_path / "dpo")
    assert s["eval/rewards/accuracies_before"] == pytest.approx(0.5)  # policy == reference
    assert s["eval/rewards/accuracies_after"] >= 0.6, s
    assert s["last"]["rewards/margins"] > 0


@pytest.mark.slow
def test_online_dpo_two_rounds_on_the_policys_own_pairs(tmp_path):
    """algo=online_dpo: SFT, then DPO on labelled pairs of the current policy's samples, twice;
    round 2 starts from round 1's policy, on fresh prompts, reference = SFT."""
    import json

    from support import run_job

    s = run_job(["algo=online_dpo", "trainer.max_steps=2", "rollout.batch_size=4", "rollout.prompts=8", "rollout.k=3", "rollout.data_pairs=16",
                 "trainer.progress=false", "eval.task.num_prompts=8"], tmp_path)
    assert list(s["stages"]) == ["sft", "dpo", "dpo_r2"]
    cfg2 = (tmp_path / "dpo_r2" / "config.yaml").read_text()
    assert f"name_or_path: {tmp_path}/dpo/final" in cfg2 and f"ref_name_or_path: {tmp_path}/sft/final" in cfg2
    p1 = {json.loads(x)["prompt_index"] for x in (tmp_path / "dpo" / "pairs.jsonl").read_text().splitlines()}
    p2 = {json.loads(x)["prompt_index"] for x in (tmp_path / "dpo_r2" / "pairs.jsonl").read_text().splitlines()}
    assert p1 and p2 and not p1 & p2
    assert s["eval/reward_after"] == s["stages"]["dpo_r2"]["eval/reward_after"]
