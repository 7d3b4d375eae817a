"""Conformance of the critic-free RL pieces, through the real plugins and trainer pieces:

* on the first epoch after a rollout the ratio is exactly 1 and the clip fraction 0;
* the loss and its gradient do not depend on how a mini-batch is cut into micro-batches
  (every aggregation mode promises it when the loss divides by the mini-batch totals;
  seq-mean-token-sum-norm only with a constant normaliser, see the last test);
* a group whose rewards are all equal gets zero advantage, never NaN;
* each KL estimator's value and gradient match its definition on small categorical
  distributions, computed exactly (every outcome weighted by its probability);
* every preset composes and runs a tiny step.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from rlfuse import models, trainer
from rlfuse.config import register_configs
from rlfuse.data import Batch
from rlfuse.kernels import clipped_policy_loss
from rlfuse.manager import PluginManager, instantiate, load_plugins, resolve

register_configs()
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _scalar(t) -> float:
    """A Python float of a 0-d tensor, detached from autograd."""
    return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


def compose_cfg(overrides: list[str]):
    with initialize_config_module("rlfuse.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def make_ctx(overrides: list[str], dtype: str = "float32") -> trainer.Context:
    """A Context with the plugins of a composed config, the tiny model and set-up plugins."""
    precision = "bf16-true" if dtype == "bfloat16" else "fp32"  # bf16 weights need a bf16-true optimiser
    cfg = compose_cfg(["eval=[]", "logger=[]", f"model.dtype={dtype}", f"trainer.precision={precision}", *overrides])
    pm = PluginManager()
    ctx = trainer.Context(cfg, Path(tempfile.mkdtemp()), pm)
    ctx.reward_weights = load_plugins(cfg, pm)["weight"]
    ctx.tokenizer = models.load_tokenizer(cfg.model)
    ctx.policy = models.load_policy(cfg.model, ctx.tokenizer, cfg.seed)
    ctx.hook.setup(ctx=ctx)
    ctx.policy.train()
    return ctx


def rollout(ctx: trainer.Context) -> Batch:
    batch = ctx.hook.rollout(ctx=ctx, step=0)
    trainer._apply_rewards(ctx, batch, {})
    adv = ctx.hook.advantage(ctx=ctx, batch=batch)
    batch.advantages = adv.advantages
    return batch


# ------------------------------------------------------------------ ratio 1 on the first epoch


@pytest.mark.parametrize("share_prefix", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_first_epoch_ratio_is_one(dtype, share_prefix):
    """The loss's forward of a mini/micro-batch reproduces the rollout's log-probs. Not to the
    bit any more: each forward drops its own all-padding columns and (share_prefix) packs its
    own shared prompts, so its matmuls have other shapes than the whole batch's and round
    differently; equal to round-off, checked with a tight tolerance (an on-policy update takes
    its old log-probs from the training forward itself: ratio exactly 1, test_ppo_on_policy)."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    over = ["algo=grpo", "rollout.batch_size=5", "rollout.n=3", "loss.ppo.kl_coef=0", "trainer.mini_batch_size=6",
            f"model.share_prefix={str(share_prefix).lower()}"]
    ctx = make_ctx(over, dtype)
    batch = rollout(ctx)
    assert batch.group_ids.tolist() == [g for g in range(5) for _ in range(3)]
    order = torch.randperm(len(batch))
    for mini, micro in [(15, 15), (15, 4), (9, 2), (6, 1)]:
        mb = batch.select(order[:mini])
        totals = {"tokens": float(mb.response_mask.sum()), "sequences": float(mini)}
        for part in mb.split(micro):
            part.totals = totals
            _, stats = trainer._collect_losses(ctx, part)
            m = part.response_mask > 0
            lp = ctx.forward(part).logprobs.detach()
            # bit-identical log-probs: the rollout's no-grad forward of the whole batch and
            # the loss's forward of a micro-batch see the same rows, positions and padding
            tol = 1e-5 if dtype == "float32" else 2e-2
            torch.testing.assert_close(lp[m], part.old_logprobs[m], atol=tol, rtol=0)
            assert float(stats["policy/ratio_mean"]) == pytest.approx(1.0, abs=tol)
            assert float(stats["policy/clipfrac"]) == 0.0


# ------------------------------------------------------------------ micro-batch invariance


def loss_and_grads(ctx, batch: Batch, micro: int):
    ctx.policy.zero_grad(set_to_none=True)
    totals = {"tokens": float(batch.response_mask.sum()), "sequences": float(len(batch))}
    total = 0.0
    for part in batch.split(micro):
        part.totals = totals
        terms, _ = trainer._collect_losses(ctx, part)
        loss = sum(terms.values())
        loss.backward()
        total += float(loss.detach())
    grads = [p.grad.detach().clone() for p in ctx.policy.parameters() if p.grad is not None]
    return total, grads


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_loss_and_gradient_independent_of_micro_batching(aggregation):
    torch.set_num_threads(2)
    torch.manual_seed(1)
    ctx = make_ctx([
        "algo=grpo", "rollout.batch_size=4", "rollout.n=3", f"loss.ppo.aggregation={aggregation}",
        "loss.ppo.kl_coef=0.1", "loss.ppo.kl_estimator=k3", "++loss.ppo.entropy_coef=0.01",
        "++loss.ppo.dual_clip=3.0", "loss.ppo.clip_high=0.28",
    ])  # fmt: skip
    batch = rollout(ctx)
    # move the behaviour policy away so clipping, dual clipping and the KL term are all live
    noise = torch.randn_like(batch.old_logprobs) * 0.5
    batch.old_logprobs = (batch.old_logprobs + noise) * batch.response_mask
    batch.ref_logprobs = (batch.old_logprobs - noise.flip(0)) * batch.response_mask
    full, g_full = loss_and_grads(ctx, batch, micro=len(batch))
    for micro in (5, 1):
        part, g_part = loss_and_grads(ctx, batch, micro=micro)
        assert part == pytest.approx(full, rel=1e-5, abs=1e-6)
        for a, b in zip(g_full, g_part, strict=True):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_seq_mean_token_sum_norm_needs_a_constant_normaliser():
    """With ``norm_length`` unset the constant is the padded width T of the tensor the loss
    sees. The trainer keeps the rollout's width for every micro-batch, so the loss is still
    invariant there; a micro-batch trimmed to its own longest row would change it."""
    lp = torch.zeros(2, 6, requires_grad=True)
    old = torch.zeros(2, 6)
    adv = torch.ones(2, 6)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]], dtype=torch.float32)
    opts = dict(aggregation="seq-mean-token-sum-norm", num_seqs=2)
    whole = clipped_policy_loss(lp, old, adv, mask, **opts).loss.detach()
    split = sum(clipped_policy_loss(lp[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], **opts).loss
                for i in range(2)).detach()  # fmt: skip
    assert float(whole) == pytest.approx(float(split))
    trimmed = clipped_policy_loss(lp[1:, :3], old[1:, :3], adv[1:, :3], mask[1:, :3], **opts).loss.detach()
    assert float(trimmed) != pytest.approx(float(clipped_policy_loss(lp[1:], old[1:], adv[1:], mask[1:], **opts).loss.detach()))
    fixed = dict(opts, norm_length=8)
    assert float(clipped_policy_loss(lp[1:, :3], old[1:, :3], adv[1:, :3], mask[1:, :3], **fixed).loss.detach()) == pytest.approx(
        float(clipped_policy_loss(lp[1:], old[1:], adv[1:], mask[1:], **fixed).loss.detach())
    )


# ------------------------------------------------------------------ all-equal groups


def equal_group_batch(dtype):
    # group 0 all 0.3 (not exactly representable: a naive mean leaves round-off), group 1
    # mixed, group 2 a single row
    rewards = torch.tensor([0.3, 0.3, 1.0, 0.3, 0.0, 0.3, 0.7], dtype=dtype)
    groups = torch.tensor([0, 0, 1, 0, 1, 0, 2])
    mask = torch.zeros(7, 6)
    for i, n in enumerate([1, 2, 3, 4, 5, 2, 3]):
        mask[i, 1 : 1 + n] = 1
    return Batch(input_ids=torch.zeros(7, 6, dtype=torch.long), attention_mask=torch.ones(7, 6, dtype=torch.long),
                 response_mask=mask, rewards=rewards, group_ids=groups)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "name,options",
    [("grpo", {}), ("grpo", {"eps": 0.0}), ("dr_grpo", {}), ("rloo", {}), ("rloo", {"scale_std": True}),
     ("reinforce_pp", {"baseline": "group"})],
)  # fmt: skip
def test_all_equal_group_gives_zero_advantage(name, options, dtype):
    batch = equal_group_batch(dtype)
    if name == "rloo":  # RLOO needs >= 2 rows per group
        batch = batch.select([0, 1, 2, 3, 4, 5])
    adv = instantiate(resolve(name), options, name=name, where="advantage").advantage(ctx=None, batch=batch).advantages
    assert torch.isfinite(adv).all()
    same = batch.group_ids == 0
    assert torch.all(adv[same] == 0)
    assert torch.any(adv[batch.group_ids == 1] != 0)


@pytest.mark.parametrize("name", ["reinforce_pp", "reinforce", "grpo"])
def test_batch_of_equal_rewards_gives_zero_advantage(name):
    batch = equal_group_batch(torch.float32)
    batch.rewards = torch.full((7,), 0.3)
    adv = instantiate(resolve(name), {}, name=name, where="advantage").advantage(ctx=None, batch=batch).advantages
    assert torch.isfinite(adv).all() and torch.all(adv == 0)


# ------------------------------------------------------------------ KL estimators, exactly


def categorical(seed: int, V: int = 7):
    g = torch.Generator().manual_seed(seed)
    theta = (torch.randn(V, generator=g, dtype=torch.float64) * 0.7).requires_grad_(True)
    ref = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64) * 0.7, -1)
    return theta, ref


def exact_expectation(estimator: str, theta: torch.Tensor, ref: torch.Tensor, clamp=None):
    """E_{y ~ p}[k(y)] through the loss plugin's kernel: every outcome y is one token whose
    weight is p(y) (a float mask with aggregation=seq-mean-token-sum, one sequence), the
    advantage is 0 and kl_coef is 1, so the loss is sum_y p(y) k(y) and its gradient w.r.t.
    theta is sum_y p(y) d k(y) / d theta -- the expected gradient of the KL loss term."""
    logp = torch.log_softmax(theta, -1)
    p = logp.exp().detach()
    res = clipped_policy_loss(
        logp.float()[None], logp.detach().float()[None], torch.zeros(1, len(p)), p.float()[None],
        ref_logprobs=ref.float()[None], kl_coef=1.0, kl_estimator=estimator, kl_clamp=clamp,
        aggregation="seq-mean-token-sum", num_seqs=1,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(res.loss, theta)
    return res.loss.double(), grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_estimators_value_and_gradient_exact(seed):
    theta, ref = categorical(seed)
    logp = torch.log_softmax(theta, -1)
    p, q = logp.exp(), ref.exp()
    kl_pq = (p * (logp - ref)).sum()  # KL(p || q), the reverse KL a policy loss means
    kl_qp = (q * (ref - logp)).sum()  # KL(q || p)
    (g_pq,) = torch.autograd.grad(kl_pq, theta, retain_graph=True)
    (g_qp,) = torch.autograd.grad(kl_qp, theta, retain_graph=True)

    # k1 = log p - log q: unbiased value; its expected gradient is E_p[grad log p] = 0
    v, g = exact_expectation("k1", theta, ref)
    assert _scalar(v.detach()) == pytest.approx(_scalar(kl_pq.detach()), rel=1e-5)
    assert torch.allclose(g, torch.zeros_like(g), atol=1e-6)

    # k2 = 0.5 (log p - log q)^2: biased value E_p[k2], but its gradient is exactly grad KL(p||q)
    v, g = exact_expectation("k2", theta, ref)
    assert _scalar(v) == pytest.approx(_scalar((p * 0.5 * (logp - ref) ** 2).sum()), rel=1e-5)
    assert _scalar(v) != pytest.approx(_scalar(kl_pq), rel=1e-3)
    assert torch.allclose(g, g_pq, atol=1e-6)

    # k3 = q/p - 1 - log(q/p): unbiased value; its expected gradient is grad KL(q||p)
    v, g = exact_expectation("k3", theta, ref)
    assert _scalar(v) == pytest.approx(_scalar(kl_pq), rel=1e-5)
    assert torch.allclose(g, g_qp, atol=1e-6)
    assert not torch.allclose(g, g_pq, atol=1e-3)


def test_k3_clamp_caps_the_value_and_cuts_the_gradient():
    theta, ref = categorical(3)
    with torch.no_grad():
        ref[0] = ref[0] + 4.0  # a token the policy finds very unlikely relative to ref
    logp = torch.log_softmax(theta, -1)
    k3 = torch.exp(ref - logp) - (ref - logp) - 1
    clamp = _scalar(k3.sort().values[-2])  # above every value but the largest
    v, g = exact_expectation("k3", theta, ref, clamp=clamp)
    p = logp.exp()
    capped = torch.minimum(k3, torch.tensor(clamp, dtype=k3.dtype))
    assert _scalar(v) == pytest.approx(_scalar((p * capped).sum()), rel=1e-5)
    # gradient of sum_y p(y) k(y) with k frozen where it is clamped
    live = (k3 <= clamp).double()
    want = torch.autograd.grad((p.detach() * k3 * live).sum(), theta)[0]
    assert torch.allclose(g, want, atol=1e-6)


# ------------------------------------------------------------------ presets


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "rloo", "reinforce_pp"])
def test_preset_runs_a_tiny_step(algo, tmp_path):
    torch.set_num_threads(2)
    cfg = compose_cfg([
        f"algo={algo}", "algo.warmup=null", "trainer.max_steps=2", "rollout.batch_size=3", "rollout.n=2",
        "trainer.mini_batch_size=3", "eval.task.num_prompts=4", "logger=[jsonl]", f"run_dir={tmp_path}",
    ])  # fmt: skip
    assert cfg.rollout.plugin == "generate" and cfg.advantage.plugin
    summary = trainer.train(cfg, tmp_path)
    assert summary["steps"] == 2 and "eval/reward_after" in summary
    assert summary["last"]["optim/updates"] == 2 * cfg.trainer.epochs
