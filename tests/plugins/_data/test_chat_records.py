"""Chat rows go through the tokenizer's chat template; the prompt/answer cut is made on token ids."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from rlfuse.models import build_tiny_tokenizer
from rlfuse.plugins._data.pairs import load_pairs
from rlfuse.plugins._data.records import (
    ChatStats,
    Record,
    answer_messages,
    chat_prompt,
    encode_chat,
)
from rlfuse.plugins.rollout.sft_data import Config as SftConfig
from rlfuse.plugins.rollout.sft_data import Plugin as SftData

CHAT = [{"role": "system", "content": "Sort."}, {"role": "user", "content": "cba="}]


def _ctx(tok, **data):
    cfg = OmegaConf.create({"seed": 0, "data": {"max_prompt_length": 512, "max_length": 1024, "truncation": "left", **data}})
    return SimpleNamespace(cfg=cfg, tokenizer=tok, device="cpu")


def _write(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def _conversation_ids(tok, msgs):
    text = tok.apply_chat_template(msgs, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_tiny_template_prompt_plus_answer_is_the_tokenised_conversation():
    tok = build_tiny_tokenizer()
    st = ChatStats()
    p, a, text = encode_chat(tok, CHAT, [{"role": "assistant", "content": "abc"}], 512, "left", "f:1", st)
    full = _conversation_ids(tok, CHAT + [{"role": "assistant", "content": "abc"}])
    assert p[0] == tok.bos_token_id and p[1:] + a[:-1] == full  # BOS, conversation, EOS
    assert tok.decode(a) == "abc\n<eos>" and text.endswith("assistant: ")
    assert st.rows == 1 and st.retokenised == 0


def test_template_that_differs_across_the_boundary_is_cut_at_the_common_prefix():
    tok = build_tiny_tokenizer()
    # the generation prompt says "A: " but the conversation renders the answer right after "A:"
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}A:{{ m['content'] }}\n"
        "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}"
    )
    st = ChatStats()
    p, a, _ = encode_chat(tok, CHAT[1:], [{"role": "assistant", "content": "abc"}], 512, "left", "f:1", st)
    full = _conversation_ids(tok, CHAT[1:] + [{"role": "assistant", "content": "abc"}])
    assert p[1:] + a[:-1] == full  # nothing lost or doubled at the seam
    assert tok.decode(p[1:]) == "cba=\nA:" and tok.decode(a) == "abc\n<eos>"
    assert st.retokenised == 1


def test_sft_and_pairs_readers_use_the_template(tmp_path):
    tok = build_tiny_tokenizer()
    sft = _write(tmp_path, "sft.jsonl", [{"messages": CHAT + [{"role": "assistant", "content": "abc"}]}, {"prompt": "ba=", "completion": "ab"}])
    plugin = SftData(SftConfig(batch_size=2, shuffle=False))
    ctx = _ctx(tok, sft=sft)
    plugin.setup(ctx)
    b = plugin.rollout(ctx, 0)
    answers = [tok.decode(ids[m.bool()]) for ids, m in zip(b.input_ids, b.response_mask, strict=True)]
    assert answers == ["abc\n<eos>", "ab<eos>"]  # chat row: the template's answer; text row: as before
    prefs = _write(tmp_path, "p.jsonl", [{"prompt": CHAT, "chosen": "abc", "rejected": [{"role": "assistant", "content": "cab"}]}])
    (it,) = load_pairs(_ctx(tok), prefs)
    assert tok.decode(it.prompt_ids).endswith("assistant: ")
    assert tok.decode(it.chosen_ids) == "abc\n<eos>" and tok.decode(it.rejected_ids) == "cab\n<eos>"


def test_chat_rows_errors_name_the_row():
    tok = build_tiny_tokenizer()
    with pytest.raises(ValueError, match=r"f:3: field 'messages' must end with an assistant message"):
        answer_messages(Record({"messages": CHAT}, "f:3"))
    with pytest.raises(ValueError, match=r"f:4: field 'prompt\[0\]'"):
        chat_prompt(Record({"prompt": [{"role": "user"}]}, "f:4"))
    tok.chat_template = None
    with pytest.raises(ValueError, match="f:5: chat messages given but the tokenizer has no chat template"):
        encode_chat(tok, CHAT, [{"role": "assistant", "content": "a"}], 512, "left", "f:5")


def test_smollm2_template(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    st = ChatStats()
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    p, a, _ = encode_chat(tok, msgs, [{"role": "assistant", "content": "4"}], 512, "left", "f:1", st)
    full = _conversation_ids(tok, msgs + [{"role": "assistant", "content": "4"}])
    assert p + a == full[: len(p) + len(a)] and full[len(p) + len(a) :] == tok("\n", add_special_tokens=False)["input_ids"]
    assert tok.decode(p).endswith("<|im_start|>assistant\n") and tok.decode(a) == "4<|im_end|>"
    assert p[0] == tok.bos_token_id == tok.convert_tokens_to_ids("<|im_start|>")  # no BOS added twice
    assert st.retokenised == 0
