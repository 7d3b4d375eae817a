"""rlfuse's decode loop (``plugins/_sampling.py``: ``decode``, ``draw``; ``engine: rlfuse``).

Greedy decoding must give transformers' ``generate`` tokens exactly (same model calls, same
cache); sampling must draw from the distribution transformers' warpers define (temperature,
top-k, top-p), checked on the probabilities, not on one seed's tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlfuse import models
from rlfuse.config import ModelConfig
from rlfuse.plugins._sampling import SamplingConfig, draw, sample, use_decode


@pytest.fixture(scope="module")
def tiny():
    """The character tokenizer and a randomly initialised Llama over it whose greedy answers
    vary from row to row and token to token (the untrained tiny model repeats one token)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    tok = models.build_tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    model.generation_config.pad_token_id = tok.pad_token_id
    return tok, model.eval()


def _prompts(tok):
    ps = [tok("bdag=")["input_ids"], tok("hbhebzzq=")["input_ids"], tok("ca=")["input_ids"]]
    return [p for p in ps for _ in range(2)] + [tok("zq=")["input_ids"]]


@pytest.mark.parametrize("share", [True, False], ids=["shared-prompt", "plain"])
def test_greedy_decode_equals_generate(tiny, share):
    tok, model = tiny
    out = {}
    for engine in ("hf", "rlfuse"):
        cfg = SamplingConfig(max_new_tokens=12, greedy=True, share_prompt=share, engine=engine)
        out[engine] = sample(model, tok, _prompts(tok), cfg, torch.device("cpu"))
    assert torch.equal(out["hf"].input_ids, out["rlfuse"].input_ids)
    assert torch.equal(out["hf"].response_mask, out["rlfuse"].response_mask)
    assert out["hf"].responses == out["rlfuse"].responses
    assert (out["hf"].response_mask.sum(-1) > 1).all()  # something was generated
    assert len(set(out["hf"].responses)) > 2


def test_decode_stops_at_eos_like_generate(tiny):
    """An EOS that some rows emit early: each row ends there, pads after, and the tokens equal
    ``generate``'s with the same EOS."""
    from rlfuse.plugins._sampling import decode, left_pad

    tok, model = tiny
    ids, mask = left_pad(_prompts(tok), tok.pad_token_id)
    free = decode(model, ids, mask, SamplingConfig(max_new_tokens=12, greedy=True), None, tok.pad_token_id)
    P = ids.shape[1]
    first = {}  # token -> the column where each row first emits it (12 = never)
    for t in free[:, P:].unique().tolist():
        first[t] = [int((r == t).nonzero()[0]) if (r == t).any() else 12 for r in free[:, P:]]
    # the end-of-sequence: the token that ends the rows at the most different lengths
    eos = max(first, key=lambda t: len(set(first[t])))
    assert len(set(first[eos])) > 2
    got = decode(model, ids, mask, SamplingConfig(max_new_tokens=12, greedy=True), eos, tok.pad_token_id)
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                          eos_token_id=eos, pad_token_id=tok.pad_token_id)
    assert torch.equal(got, want)
    resp = got[:, P:]
    assert resp.shape[1] <= 12
    for r in resp:
        hit = (r == eos).nonzero()
        if len(hit):
            assert (r[int(hit[0]) + 1 :] == tok.pad_token_id).all()
    lengths = [min(f + 1, 12) for f in first[eos]]  # up to and including the EOS
    assert resp.shape[1] == max(lengths)  # stopped when the last row ended
    for r, fr, f, n in zip(resp, free[:, P:], first[eos], lengths, strict=True):
        assert torch.equal(r[:n], fr[:n])  # the same tokens up to the row's end
        if f < 12:
            assert r[f] == eos


def test_seeded_sampling_is_reproducible(tiny):
    tok, model = tiny
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.9, engine="rlfuse")
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(sample(model, tok, _prompts(tok), cfg, torch.device("cpu")).input_ids)
    assert torch.equal(*runs)


def _frequencies(logits, cfg, n=40_000):
    torch.manual_seed(0)
    toks = draw(logits.expand(n, -1), cfg)
    return torch.bincount(toks, minlength=logits.shape[-1]).double() / n


def _hf_probs(logits, cfg):
    """The distribution transformers samples from: its warpers, then softmax."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    x = logits.clone()
    if cfg.temperature != 1.0:
        x = TemperatureLogitsWarper(cfg.temperature)(None, x)
    if cfg.top_k:
        x = TopKLogitsWarper(cfg.top_k)(None, x)
    if cfg.top_p < 1.0:
        x = TopPLogitsWarper(cfg.top_p)(None, x)
    return x.softmax(-1).double()


@pytest.mark.parametrize(
    "opts",
    [{}, {"temperature": 0.7}, {"temperature": 1.3, "top_k": 3}, {"top_p": 0.8}, {"temperature": 0.8, "top_k": 5, "top_p": 0.9}],
    ids=["plain", "temperature", "top-k", "top-p", "all"],
)
def test_draw_samples_the_warped_distribution(opts):
    torch.manual_seed(1)
    logits = torch.randn(1, 9) * 1.5
    cfg = SamplingConfig(**opts)
    want = _hf_probs(logits, cfg)[0]
    got = _frequencies(logits, cfg)
    assert torch.equal(got > 0, want > 0) or (got[want == 0] == 0).all()  # never a filtered token
    # within 5 standard errors per token (binomial), and close in total variation
    se = (want * (1 - want) / 40_000).sqrt()
    assert ((got - want).abs() <= 5 * se + 1e-9).all(), (got, want)
    assert 0.5 * (got - want).abs().sum() < 0.01


def test_draw_greedy_and_rows_are_independent():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    assert draw(logits, SamplingConfig(greedy=True)).tolist() == [1, 0]
    torch.manual_seed(0)
    toks = draw(logits.repeat(2000, 1), SamplingConfig())
    assert toks.shape == (4000,)
    p0 = logits[0].softmax(-1)[1].item()
    assert abs((toks[0::2] == 1).double().mean().item() - p0) < 5 * math.sqrt(p0 * (1 - p0) / 2000)


def test_draw_never_returns_a_zero_weight_token_at_the_top_of_the_range(monkeypatch):
    """u * total can round up to the total: the draw must then be the last token with weight."""
    logits = torch.tensor([[0.0, 1.0, 2.0, float("-inf"), float("-inf")]])
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(*a[0], dtype=k.get("dtype")))
    assert draw(logits, SamplingConfig()).tolist() == [2]


def test_auto_engine_by_vocabulary(tiny):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, _ = tiny
    model = models.build_tiny_model(ModelConfig(), tok, seed=0)
    assert not use_decode(model, "auto")  # 100 tokens: transformers' generate, the seeded figures
    assert use_decode(model, "rlfuse") and not use_decode(model, "hf")
    big = LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1))
    assert use_decode(big, "auto")
    assert not use_decode(object(), "auto")  # no config: nothing to build a cache from


def test_engine_is_checked():
    from rlfuse.errors import ConfigError
    from rlfuse.plugins.rollout.generate import Config

    with pytest.raises(ConfigError, match="engine"):
        Config(engine="vllm")


def test_greedy_decode_equals_generate_with_lora(tiny):
    """A peft model: decoding calls its base model (the adapters live inside it; peft's own
    ``forward`` takes neither positions nor the cache by name): the tokens of peft's
    ``generate``."""
    import copy

    from peft import LoraConfig, get_peft_model

    tok, base = tiny
    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False)).eval()
    out = {}
    for engine in ("hf", "rlfuse"):
        cfg = SamplingConfig(max_new_tokens=10, greedy=True, engine=engine)
        out[engine] = sample(model, tok, _prompts(tok), cfg, torch.device("cpu"))
    assert torch.equal(out["hf"].input_ids, out["rlfuse"].input_ids)
    plain = sample(base, tok, _prompts(tok), SamplingConfig(max_new_tokens=10, greedy=True, engine="rlfuse"),
                   torch.device("cpu"))
    assert not torch.equal(plain.input_ids, out["rlfuse"].input_ids)  # the adapters were applied
