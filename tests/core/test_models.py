"""The policy forward: the hidden-state path and the logits path agree with log_softmax."""

from __future__ import annotations

import pytest
import torch

from rlfuse import models
from rlfuse.config import ModelConfig
from rlfuse.data import Batch


def _setup():
    tok = models.build_tiny_tokenizer()
    model = models.build_tiny_model(ModelConfig(), tok, seed=0)
    ids = torch.tensor([[0, 0, 1, 10, 11, 12], [1, 13, 14, 15, 16, 2]])
    mask = (ids != 0).long()
    b = Batch(input_ids=ids, attention_mask=mask, response_mask=mask.float())
    return model, b


def _reference(model, b):
    out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=models.position_ids(b.attention_mask))
    lp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, b.input_ids[:, 1:, None])[..., 0]
    # a row's first real token has no prediction (what precedes it is padding): 0, like column 0
    lp = lp * b.attention_mask[:, 1:] * b.attention_mask[:, :-1]
    return torch.cat([lp.new_zeros(2, 1), lp], 1)


@pytest.mark.parametrize("path", ["hidden", "logits"])
def test_forward_matches_log_softmax(path, monkeypatch):
    model, b = _setup()
    if path == "logits":
        monkeypatch.setattr(models, "_from_hidden_ok", lambda m: False)
    out = models.forward(model, b, entropy=True)
    ref = _reference(model, b)
    assert out.logprobs.shape == b.input_ids.shape
    torch.testing.assert_close(out.logprobs, ref, atol=1e-5, rtol=1e-5)
    scored = (b.attention_mask[:, 1:] * b.attention_mask[:, :-1]) > 0
    assert out.entropy.shape == b.input_ids.shape and (out.entropy[:, 1:][scored] > 0).all()
    out.logprobs.sum().backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_tiny_model_is_deterministic_per_seed():
    tok = models.build_tiny_tokenizer()
    a = models.build_tiny_model(ModelConfig(), tok, seed=3)
    b = models.build_tiny_model(ModelConfig(), tok, seed=3)
    c = models.build_tiny_model(ModelConfig(), tok, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_tiny_tokenizer_round_trips_and_saves(tmp_path):
    from transformers import AutoTokenizer

    tok = models.build_tiny_tokenizer()
    text = "dbca= abcd!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert "user: hi" in again.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def _tied_llama(vocab=8192, tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie, pad_token_id=0)
    return LlamaForCausalLM(cfg).float()


def _tied_batch():
    # left padding (the padding id 0 is looked up, its row must get no gradient), repeated tokens,
    # a prompt shared by both rows (the shared-prefix layout)
    ids = torch.tensor([[0, 0, 7, 8, 9, 7, 7, 4000], [0, 0, 7, 8, 9, 8191, 7, 3]])
    mask = (ids != 0).long()
    resp = torch.zeros_like(mask, dtype=torch.float)
    resp[:, 5:] = 1.0
    return Batch(input_ids=ids, attention_mask=mask, response_mask=resp)


@pytest.mark.parametrize("path", ["hidden", "logits"])
def test_tied_embedding_fold_gives_the_same_gradient(path, monkeypatch):
    """The tied weight's gradient with the row-by-row fold equals the one autograd sums."""
    if path == "logits":
        monkeypatch.setattr(models, "_from_hidden_ok", lambda m: False)
    model, b = _tied_llama(), _tied_batch()
    w = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is w
    grads = {}
    for fold_from in (models.LARGE_VOCAB, 10**9):  # folded, then autograd's sum
        monkeypatch.setattr(models, "LARGE_VOCAB", fold_from)
        model.zero_grad(set_to_none=True)
        out = models.forward(model, b, entropy=True)
        (out.logprobs.sum() + 0.1 * out.entropy.sum()).backward()
        grads[fold_from] = {n: p.grad.clone() for n, p in model.named_parameters()}
    folded, summed = grads.values()
    assert folded.keys() == summed.keys()
    for n in folded:
        torch.testing.assert_close(folded[n], summed[n], rtol=1e-5, atol=1e-7, msg=n)
    assert folded["model.embed_tokens.weight"][0].abs().sum() > 0  # the lm_head's part of the padding row
    emb_only = folded["model.embed_tokens.weight"][5000]  # never looked up, still predicted: the head's gradient
    assert emb_only.abs().sum() > 0


def test_tied_embedding_fold_makes_no_second_vocab_sized_buffer(monkeypatch):
    """autograd's sum of the two gradients allocates a second (V, H) fp32 tensor in the backward;
    the fold allocates none beyond the gradient itself."""
    model, b = _tied_llama(), _tied_batch()
    vh = 8192 * 16 * 4

    def big_allocations():
        model.zero_grad(set_to_none=True)
        out = models.forward(model, b)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            out.logprobs.sum().backward()
        return sum(1 for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() == vh)

    assert big_allocations() == 1
    monkeypatch.setattr(models, "LARGE_VOCAB", 10**9)
    assert big_allocations() == 2


def test_fold_only_where_it_applies():
    b = _tied_batch()
    untied = _tied_llama(tie=False)
    assert set(models.trunk_inputs(untied, b.input_ids)) == {"input_ids"}
    tied = _tied_llama()
    assert set(models.trunk_inputs(tied, b.input_ids)) == {"inputs_embeds"}
    assert set(models.trunk_inputs(tied, b.input_ids, fold=False)) == {"input_ids"}  # fsdp
    with torch.no_grad():
        assert set(models.trunk_inputs(tied, b.input_ids)) == {"input_ids"}
    tied.get_input_embeddings().weight.requires_grad_(False)  # a LoRA base
    assert set(models.trunk_inputs(tied, b.input_ids)) == {"input_ids"}
    small, _ = _setup()  # the tiny model: vocabulary below LARGE_VOCAB
    assert set(models.trunk_inputs(small, b.input_ids.clamp_max(50))) == {"input_ids"}
