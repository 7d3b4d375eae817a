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


def _head_model(vocab=8192, hidden=16):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_skinny_lm_head_pads_decode_rows_and_gives_the_same_logits(monkeypatch):
    import rlfuse.plugins._sampling as S

    model = _head_model()
    head = model.get_output_embeddings()
    h = torch.randn(5, 1, 16)
    plain = head(h)
    seen = []
    real_linear = S.F.linear
    monkeypatch.setattr(S.F, "linear", lambda x, w, b=None: seen.append(x.shape[0]) or real_linear(x, w, b))
    S._skinny_choice.clear()

    def fake_time(fn, reps=3):  # the padded product "measures" faster
        fn()
        return 1.0 if seen[-1] == S.SKINNY_ROWS else 2.0

    monkeypatch.setattr(S, "_time", fake_time)
    with S.skinny_lm_head(model, rows=5):
        padded = head(h)
        assert head(torch.randn(20, 1, 16)).shape == (20, 1, 8192)  # 16 rows or more: as it was
    assert S._skinny_choice == {((8192, 16), 5, torch.get_num_threads()): True}
    assert seen[-2:] == [S.SKINNY_ROWS, 20]
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)
    assert "forward" not in vars(head)  # the module's own forward again


def test_skinny_lm_head_keeps_the_plain_product_when_padding_is_not_faster(monkeypatch):
    import rlfuse.plugins._sampling as S

    model = _head_model()
    S._skinny_choice.clear()
    monkeypatch.setattr(S, "_time", lambda fn, reps=3: 1.0)  # padded not 10% faster
    with S.skinny_lm_head(model, rows=4):
        assert "forward" not in vars(model.get_output_embeddings())
    small = _head_model(vocab=512)  # a small vocabulary: never measured, never padded
    with S.skinny_lm_head(small, rows=4):
        assert "forward" not in vars(small.get_output_embeddings())
    assert len(S._skinny_choice) == 1


def test_sampling_with_the_skinny_head_gives_the_same_tokens_greedy():
    import rlfuse.plugins._sampling as S

    tok = build_tiny_tokenizer()
    model = _head_model(vocab=8192)
    model.generation_config.pad_token_id = tok.pad_token_id
    prompts = [[tok.bos_token_id, 5, 6, 7], [tok.bos_token_id, 8, 9], [tok.bos_token_id, 10]]
    cfg = SamplingConfig(max_new_tokens=6, greedy=True)
    S._skinny_choice.clear()
    S._skinny_choice[((8192, 16), 3, torch.get_num_threads())] = False
    plain = sample(model, tok, prompts, cfg, torch.device("cpu"))
    S._skinny_choice[((8192, 16), 3, torch.get_num_threads())] = True
    padded = sample(model, tok, prompts, cfg, torch.device("cpu"))
    assert torch.equal(plain.input_ids, padded.input_ids)
