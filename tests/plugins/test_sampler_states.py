"""``rollout.old_logprobs: sampler``: the old log-probs and the critic's input come from the
states generation computed, not from a second pass -- equal to that pass up to rounding."""

from __future__ import annotations

import json

import pytest
import torch

from rlfuse import models
from rlfuse.data import Batch
from rlfuse.models import build_tiny_tokenizer
from rlfuse.plugins._sampling import SamplingConfig, sample
from support import compose


def _llama(vocab=300, tie=True, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prompts", "distinct-prompts"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("engine", ["hf", "rlfuse"])
def test_sampler_states_equal_a_separate_forward(shared, tie, engine):
    tok = build_tiny_tokenizer()
    model = _llama(tie=tie)
    model.generation_config.pad_token_id = tok.pad_token_id
    bos = tok.bos_token_id
    prompts = [[bos, 5, 6, 7, 8], [bos, 5, 6, 7, 8], [bos, 9, 10], [bos, 9, 10]] if shared else (
        [[bos, 5, 6, 7, 8], [bos, 11], [bos, 9, 10], [bos, 12, 13, 14]])
    torch.manual_seed(1)
    batch = sample(model, tok, prompts, SamplingConfig(max_new_tokens=7, temperature=0.9, engine=engine),
                   torch.device("cpu"), capture=True)
    got = batch.rollout_forward
    assert got is not None and got.hidden.shape == (*batch.input_ids.shape, 32)
    with torch.no_grad():
        want = models.forward(model, Batch(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                           response_mask=batch.response_mask), hidden=True)
    m = batch.response_mask
    torch.testing.assert_close(got.logprobs * m, want.logprobs * m, atol=2e-5, rtol=1e-5)
    # the state before each response token (what a value head reads), zeros elsewhere
    before = torch.zeros_like(m, dtype=torch.bool)
    before[:, :-1] = m[:, 1:] > 0
    torch.testing.assert_close(got.hidden[before], want.hidden[before], atol=2e-5, rtol=1e-5)
    assert not got.hidden[~before].any()


def test_no_capture_without_a_linear_head():
    tok = build_tiny_tokenizer()
    model = _llama()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.get_output_embeddings = lambda: None
    batch = sample(model, tok, [[tok.bos_token_id, 5, 6]], SamplingConfig(max_new_tokens=3), torch.device("cpu"),
                   capture=True)
    assert batch.rollout_forward is None  # the rollout falls back to the separate forward


BASE = [  # a length reward gives a random model's answers a real signal (the rule scores them all 0)
    "algo=ppo", "algo.warmup=null", "reward=[rule,length,kl_penalty]", "reward.length.weight=1.0", "trainer.max_steps=2", "trainer.progress=false", "eval=[]", "logger=[jsonl]",
    "rollout.batch_size=4", "trainer.mini_batch_size=2", "trainer.threads=1", "rollout.max_new_tokens=6",
]


@pytest.fixture(scope="module")
def small_pretrained(tmp_path_factory):
    """A saved (so: 'pretrained') small Llama with the tiny tokenizer's vocabulary."""
    tok = build_tiny_tokenizer()
    folder = tmp_path_factory.mktemp("small-llama")
    model = _llama(vocab=len(tok))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _run(tmp_path, name, over):
    from rlfuse.trainer import train

    run_dir = tmp_path / name
    train(compose(BASE + over), run_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if "loss/total" in r]


def test_ppo_with_sampler_states_trains_like_the_separate_pass(tmp_path, small_pretrained):
    """Off-policy PPO (two mini-batches, GAE, KL penalty): the same losses, ratios and values
    from the sampler's states as from the separate no-grad forward. (With no reward signal
    at all the comparison would be meaningless: whitening turns the 1e-7 rounding of a zero
    KL penalty into unit advantages.)"""
    over = ["model=hf", f"model.name_or_path={small_pretrained}", "trainer.precision=fp32"]
    a = _run(tmp_path, "sampler", over + ["rollout.old_logprobs=sampler"])
    r = _run(tmp_path, "rollout", over + ["rollout.old_logprobs=rollout"])
    auto = _run(tmp_path, "auto", over)  # a pretrained model in fp32: the sampler's states
    assert len(a) == len(r) == 2
    for x, y, z in zip(a, r, auto, strict=True):
        for k in ("loss/total", "policy/ratio_mean", "critic/value_mean", "kl/ref"):
            assert x[k] == pytest.approx(y[k], rel=1e-3, abs=1e-5), k
            assert z[k] == x[k], k


def test_auto_keeps_the_separate_pass_for_the_tiny_model_and_under_autocast(tmp_path, small_pretrained):
    from rlfuse.manager import PluginManager
    from rlfuse.plugins.rollout.generate import sampler_states_by_default
    from rlfuse.trainer import Context

    def default(over):
        cfg = compose(BASE + over)
        ctx = Context(cfg, tmp_path, PluginManager())
        ctx.tokenizer = models.load_tokenizer(cfg.model)
        ctx.policy = models.load_policy(cfg.model, ctx.tokenizer, cfg.seed)
        return sampler_states_by_default(ctx)

    assert default(["model=hf", f"model.name_or_path={small_pretrained}", "trainer.precision=fp32"])
    assert not default([])  # the tiny model: the seeded figures of the docs keep their pass
    assert not default([f"model.name_or_path={small_pretrained}", "trainer.precision=fp32"])  # a pipeline stage's
    assert not default(["model=hf", f"model.name_or_path={small_pretrained}", "trainer.precision=bf16-mixed"])
