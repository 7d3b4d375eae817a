"""Generation prefills a prompt shared by a group once (plugins/_sampling.py): same samples.

``sample`` with ``share_prompt`` builds the KV cache of each distinct prompt once and repeats
it for the rows of its group; ``generate`` then continues from it. Greedy and seeded sampling
must give the same tokens as the plain path, and the cache must equal the per-row one.
"""

from __future__ import annotations

import pytest
import torch

from rlfuse import models
from rlfuse.config import ModelConfig
from rlfuse.plugins._sampling import SamplingConfig, left_pad, sample, shared_prompt_cache


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    tok = models.build_tiny_tokenizer()
    return tok, models.build_tiny_model(ModelConfig(), tok, seed=0).eval()


def prompts(tok, n):
    ps = [tok("bdag=")["input_ids"], tok("hbhebzzq=")["input_ids"], tok("ca=")["input_ids"]]
    return [p for p in ps for _ in range(n)]


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("engine", ["hf", "rlfuse"])
def test_shared_prompt_generates_the_same(tiny, greedy, engine):
    tok, model = tiny
    ids = prompts(tok, 3)
    out = {}
    for share in (False, True):
        torch.manual_seed(0)
        cfg = SamplingConfig(max_new_tokens=8, greedy=greedy, temperature=0.9, share_prompt=share, engine=engine)
        out[share] = sample(model, tok, ids, cfg, torch.device("cpu"))
    assert torch.equal(out[True].input_ids, out[False].input_ids)
    assert torch.equal(out[True].response_mask, out[False].response_mask)


def test_cache_equals_per_row_prefill(tiny):
    tok, model = tiny
    ids, mask = left_pad(prompts(tok, 2), tok.pad_token_id)
    cache = shared_prompt_cache(model, ids, mask)
    assert cache is not None
    from transformers import DynamicCache

    from rlfuse.plugins._sampling import cache_arg

    ref = DynamicCache(config=model.config)
    m = mask[:, :-1]
    with torch.no_grad():
        model(input_ids=ids[:, :-1], attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp_min(0),
              use_cache=True, **{cache_arg(model): ref})
    for a, b in zip(cache.layers, ref.layers, strict=True):
        real = m.bool()[:, None, :, None]  # padded keys/values are never attended
        torch.testing.assert_close(a.keys * real, b.keys * real, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.values * real, b.values * real, rtol=1e-5, atol=1e-6)


def test_no_cache_without_repeats(tiny):
    tok, model = tiny
    ids, mask = left_pad(prompts(tok, 1), tok.pad_token_id)
    assert shared_prompt_cache(model, ids, mask) is None
