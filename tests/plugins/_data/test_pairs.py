"""Preference pairs (``rlfuse.plugins._data.pairs``): pair layout, label rows, errors naming
file:line:field."""

from __future__ import annotations

import pytest

from rlfuse.plugins._data.pairs import load_pairs, pair_batch
from rlfuse.plugins._data.records import DataError
from support import data_ctx, write_jsonl


def test_layout_chosen_first_then_rejected(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "cba=", "chosen": "abc", "rejected": "acb"},
        {"prompt": "ba=", "chosen": "ab", "rejected": "b", "margin": 2},
        {"prompt": "dcb=", "chosen": "bcd", "rejected": "bdc"},
    ])
    ctx = data_ctx(tmp_path)
    items = load_pairs(ctx, f)
    b = pair_batch(items, ctx.tokenizer, 32, "cpu")
    assert len(b) == 6
    assert b.extras["chosen"].tolist() == [1, 1, 1, 0, 0, 0]
    assert b.extras["pair"].tolist() == [0, 1, 2, 0, 1, 2] == b.group_ids.tolist()
    assert b.responses == ["abc", "ab", "bcd", "acb", "b", "bdc"]
    assert b.extras["margin"].tolist() == [0, 2, 0, 0, 2, 0]
    assert b.extras["pair_key"][1] == f"{f}:2"
    tok = ctx.tokenizer
    # row = BOS + prompt + answer + EOS; response_mask covers answer + EOS only
    ids = b.input_ids[1][b.attention_mask[1].bool()].tolist()
    assert ids == [tok.bos_token_id] + tok("ba=ab", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert b.response_mask[1].sum() == 3 and b.response_mask[4].sum() == 2


def test_chat_rows_and_label_rows(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": [{"role": "user", "content": "sort cba"}],
         "chosen": [{"role": "assistant", "content": "abc"}], "rejected": [{"role": "assistant", "content": "cab"}]},
        {"prompt": "x=", "chosen": "a", "rejected": "b", "label": "tie"},
        {"prompt": "y=", "label": "skip"},
    ])
    ctx = data_ctx(tmp_path, max_prompt_length=64, max_length=96)
    items = load_pairs(ctx, f)
    assert len(items) == 1
    assert items[0].prompt == "user: sort cba\nassistant: " and items[0].chosen == "abc"


@pytest.mark.parametrize(
    "row, msg",
    [
        ({"prompt": "a=", "chosen": "a"}, "p.jsonl:2: missing field(s) ['rejected']"),
        ({"prompt": "a=", "chosen": 3, "rejected": "b"}, "p.jsonl:2: field 'chosen' must be a string"),
        ({"prompt": "a=", "chosen": "a", "rejected": "b", "margin": "x"}, "p.jsonl:2: field 'margin'"),
        ("{not json", "p.jsonl:2: not valid JSON"),
    ],
)
def test_bad_rows_name_file_line_field(tmp_path, row, msg):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a=", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(DataError, match=msg.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        load_pairs(data_ctx(tmp_path), f)


def test_long_prompt_truncated_or_rejected(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "abcdefghij=", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="p.jsonl:1: prompt is 12 tokens"):
        load_pairs(data_ctx(tmp_path, max_prompt_length=6, truncation="error"), f)
    ctx = data_ctx(tmp_path, max_prompt_length=6, truncation="left")
    item = load_pairs(ctx, f)[0]
    tok = ctx.tokenizer
    assert item.prompt_ids == [tok.bos_token_id] + tok("ghij=", add_special_tokens=False)["input_ids"]
