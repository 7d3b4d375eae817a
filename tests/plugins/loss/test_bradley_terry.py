"""``loss=bradley_terry`` (algo=reward_model): the Bradley-Terry loss, last-token pooling, the
transformers export that ``reward=model`` loads, and a short training run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlfuse.models import forward
from rlfuse.plugins.loss.bradley_terry import (
    bradley_terry_loss,
    last_token_index,
    pool_last,
    save_reward_model,
)
from support import encode_pairs as encode
from support import tiny_scorer as tiny


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bradley_terry_hand_computed(dtype):
    c = torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0], dtype=dtype)
    r = torch.tensor([1.0, 1.0, 0.5, -2.0, 0.0], dtype=dtype)
    for margin in (0.0, 0.5, torch.tensor([0.0, 1.0, 2.0, 0.0, -1.0])):
        got = bradley_terry_loss(c, r, margin)
        m = margin.tolist() if isinstance(margin, torch.Tensor) else [margin] * 5
        want = [math.log1p(math.exp(-(float(a) - float(b) - mm))) for a, b, mm in zip(c, r, m, strict=False)]
        torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)
    # zero margin, equal scores -> log 2; gradient raises chosen, lowers rejected
    c = torch.zeros(3, requires_grad=True)
    r = torch.zeros(3, requires_grad=True)
    loss = bradley_terry_loss(c, r).sum()
    assert loss.item() == pytest.approx(3 * math.log(2))
    loss.backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()


def test_last_token_index_any_padding():
    m = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    assert last_token_index(m).tolist() == [2, 4, 4, 2]


def test_export_loads_in_transformers_and_scores_match(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from rlfuse.data import Batch
    from rlfuse.plugins.reward.model import load_reward_model, score_ids

    model, head, tok = tiny()
    folder = tmp_path / "rm"
    save_reward_model(model, head, tok, folder, {"mean": 1.0, "std": 2.0})
    assert json.loads((folder / "rlfuse_reward.json").read_text())["std"] == 2.0
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    assert hf.config.pad_token_id == tok.pad_token_id

    ids, attn, resp = encode(tok, [("cba=", "abc"), ("ba=", "ab"), ("edcba=", "abcdx")])
    batch = Batch(input_ids=ids, attention_mask=attn, response_mask=resp)
    with torch.no_grad():
        ours = head(pool_last(forward(model, batch, hidden=True).hidden, attn)).squeeze(-1)
        theirs = hf(input_ids=ids, attention_mask=attn).logits.squeeze(-1)  # HF's own pooling
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    loaded, _ = load_reward_model(str(folder))
    torch.testing.assert_close(score_ids(loaded, ids, attn), ours, rtol=1e-4, atol=1e-5)
    # the same rows left-padded score the same
    left = torch.full_like(ids, tok.pad_token_id)
    lmask = torch.zeros_like(attn)
    for i in range(len(ids)):
        n = int(attn[i].sum())
        left[i, -n:], lmask[i, -n:] = ids[i, :n], 1
    torch.testing.assert_close(score_ids(loaded, left, lmask), ours, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_reward_model_learns_builtin_pairs(tmp_path):
    """Short training on the built-in pairs: held-out accuracy clearly above chance."""
    from transformers import AutoModelForSequenceClassification

    from support import run_job

    s = run_job(["algo=reward_model", "trainer.max_steps=60", "trainer.eval_every=0", "trainer.progress=false"], tmp_path)
    assert s["eval/pref/accuracy_after"] >= 0.62, s
    assert s["eval/pref/accuracy_after"] > s["eval/pref/accuracy_before"] + 0.1
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward_model")
    assert rm.config.num_labels == 1
