"""``rlfuse.plugins._sampling`` (shared by rollout=generate, eval=task and ``rlfuse label``):
left padding, the response mask up to and including the first EOS, decoded texts."""

from __future__ import annotations

import torch

from rlfuse.models import build_tiny_tokenizer
from rlfuse.plugins._sampling import SamplingConfig, left_pad, sample


class ScriptedModel:
    """``generate`` appends fixed continuations; records the keyword arguments it got."""

    def __init__(self, continuations):
        self.continuations = torch.tensor(continuations)
        self.training = True
        self.kwargs = None

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def generate(self, input_ids, attention_mask, **kwargs):
        self.kwargs = kwargs
        assert not self.training  # sampled in eval mode
        return torch.cat([input_ids, self.continuations], dim=1)


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_response_mask_stops_after_the_first_eos():
    tok = build_tiny_tokenizer()
    a, b, c = (tok.convert_tokens_to_ids(x) for x in "abc")
    eos, pad = tok.eos_token_id, tok.pad_token_id
    model = ScriptedModel([[a, eos, b, c], [a, b, c, c], [eos, a, eos, b]])
    prompts = [[tok.bos_token_id, c], [tok.bos_token_id, b, a], [tok.bos_token_id]]
    batch = sample(model, tok, prompts, SamplingConfig(max_new_tokens=4, greedy=True), torch.device("cpu"))
    assert model.training and model.kwargs["do_sample"] is False and model.kwargs["max_new_tokens"] == 4
    P = 3  # the longest prompt; responses start at column 3
    assert batch.response_mask[:, P:].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert torch.all(batch.response_mask[:, :P] == 0)
    assert batch.input_ids[0, P:].tolist() == [a, eos, pad, pad]  # after EOS: padding
    assert batch.attention_mask[2].tolist() == [0, 0, 1, 1, 0, 0, 0]
    assert batch.responses == ["a", "abcc", ""]
    assert batch.prompts == ["c", "ba", ""]


def test_sampling_options_reach_generate():
    tok = build_tiny_tokenizer()
    model = ScriptedModel([[tok.eos_token_id]])
    cfg = SamplingConfig(max_new_tokens=1, temperature=0.7, top_p=0.9, top_k=0)
    sample(model, tok, [[tok.bos_token_id]], cfg, torch.device("cpu"))
    assert model.kwargs["do_sample"] is True and model.kwargs["temperature"] == 0.7
    assert model.kwargs["top_p"] == 0.9 and model.kwargs["top_k"] is None  # 0 = off
