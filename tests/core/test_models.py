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
