"""``loss=dpo``: ``preference_loss`` against hand-computed values and its gradient direction;
the plugin on a tiny model (one concatenated forward, cached reference, training raises
accuracy)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rlfuse import models
from rlfuse.config import ModelConfig
from rlfuse.plugins._data.pairs import PairItem, pair_batch
from rlfuse.plugins.loss.dpo import LOSS_TYPES, Config, Plugin, preference_loss


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def expected(pc, pr, rc, rr, beta, loss_type, eps=0.0, gamma=0.5):
    """The papers' formulas, one pair at a time, in plain Python floats."""
    if loss_type == "simpo":
        z = beta * (pc - pr) - gamma
        return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return max(0.0, 1 - beta * h)
    raise AssertionError(loss_type)


# (policy_chosen, policy_rejected, ref_chosen, ref_rejected): odd size 5, both signs of h.
PAIRS = [
    (-3.0, -5.0, -4.0, -4.5),
    (-10.0, -2.0, -9.0, -2.5),
    (-1.25, -1.25, -1.0, -1.0),
    (-7.5, -12.0, -7.0, -8.0),
    (-0.5, -30.0, -6.0, -6.0),
]


def tensors(dtype):
    cols = list(zip(*PAIRS, strict=False))
    return [torch.tensor(c, dtype=dtype) for c in cols]


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "ipo", "hinge", "simpo"])
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hand_computed(loss_type, beta, eps, dtype):
    if eps and loss_type in ("ipo", "hinge"):
        with pytest.raises(ValueError, match="label_smoothing"):
            preference_loss(*tensors(dtype), beta=beta, loss_type=loss_type, label_smoothing=eps)
        return
    pc, pr, rc, rr = tensors(dtype)
    got = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps, simpo_gamma=0.7)
    assert got.shape == (len(PAIRS),) and got.dtype == torch.float32
    # the reference uses the same (possibly bf16-rounded) inputs, in float64
    want = [
        expected(float(a), float(b), float(c), float(d), beta, loss_type, eps, gamma=0.7)
        for a, b, c, d in zip(pc, pr, rc, rr, strict=False)
    ]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=1e-5, atol=1e-5)


def test_known_numbers():
    """A few values worked out by hand."""
    one = torch.tensor([0.0])
    # h = 0: DPO = log 2; IPO = (1/(2 beta))^2; hinge = 1
    assert preference_loss(one, one, one, one, beta=0.1).item() == pytest.approx(math.log(2))
    assert preference_loss(one, one, one, one, beta=0.5, loss_type="ipo").item() == pytest.approx(1.0)
    assert preference_loss(one, one, one, one, beta=0.5, loss_type="hinge").item() == pytest.approx(1.0)
    # h = 2, beta = 0.5: hinge reaches 0; IPO (2 - 1)^2 = 1
    two = torch.tensor([2.0])
    assert preference_loss(two, one, one, one, beta=0.5, loss_type="hinge").item() == 0.0
    assert preference_loss(two, one, one, one, beta=0.5, loss_type="ipo").item() == pytest.approx(1.0)
    # robust at h = 0 with eps: [(1-eps) log 2 - eps log 2] / (1 - 2 eps) = log 2
    assert preference_loss(one, one, one, one, beta=1.0, loss_type="robust", label_smoothing=0.2).item() == pytest.approx(math.log(2))
    # simpo: equal averages -> -log sigma(-gamma)
    assert preference_loss(one, one, None, None, beta=2.0, loss_type="simpo", simpo_gamma=1.0).item() == pytest.approx(
        math.log1p(math.e)
    )


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_gradient_pushes_chosen_up_rejected_down(loss_type, eps):
    if eps and loss_type in ("ipo", "hinge"):
        return
    # h < 0 everywhere so the hinge is active; IPO's target 1/(2 beta) is above h too
    pc = torch.tensor([-5.0, -3.0, -8.0], requires_grad=True)
    pr = torch.tensor([-4.0, -2.0, -6.0], requires_grad=True)
    rc = torch.tensor([-4.0, -3.0, -7.0])
    rr = torch.tensor([-4.0, -3.0, -7.0])
    loss = preference_loss(pc, pr, rc, rr, beta=0.5, loss_type=loss_type, label_smoothing=eps).sum()
    loss.backward()
    # gradient descent moves along -grad: chosen log-prob up, rejected down
    assert (pc.grad < 0).all(), pc.grad
    assert (pr.grad > 0).all(), pr.grad
    # reference tensors carry no gradient
    assert not rc.requires_grad


def test_errors():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(x, x, x, x, beta=0.1, loss_type="nope")
    with pytest.raises(ValueError, match="beta"):
        preference_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="reference"):
        preference_loss(x, x, None, None, beta=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(x, x, x, x, beta=0.1, loss_type="robust", label_smoothing=0.5)


# ------------------------------------------------------------------ the plugin on a tiny model


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
        self.reference_version = 0

    def require_forward(self, **needs):
        self.declared = needs

    @property
    def train_records(self):
        return self.rollout.items

    @property
    def has_reference(self):
        return self._reference is not None

    @property
    def reference(self):
        if self._reference is None:
            self.ref_builds += 1
            self._reference = models.frozen_copy(self.policy)
            self.reference_version += 1
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
    assert set(out.metrics) == {"pref/chosen", "pref/rejected", "pref/margin", "pref/accuracy",
                                "pref/logp_chosen", "pref/logp_rejected"}
    torch.testing.assert_close(out.metrics["pref/logp_chosen"], pc.mean(), rtol=1e-5, atol=1e-5)
    if loss_type != "simpo":
        torch.testing.assert_close(out.metrics["pref/margin"], (0.3 * ((pc - rc) - (pr - rr))).mean(), rtol=1e-4, atol=1e-5)
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
    assert ctx2._reference is None and ctx2.metrics["pref/precomputed_pairs"] == 6  # reference freed
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
    assert s["eval/pref/accuracy_before"] == pytest.approx(0.5)  # policy == reference
    assert s["eval/pref/accuracy_after"] >= 0.6, s
    assert s["last"]["pref/margin"] > 0
