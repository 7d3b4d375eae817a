"""``rollout=sft_data``: demonstrations packed as ``prompt + completion + EOS`` with the
response mask on the completion; chat rows; errors naming file:line."""

from __future__ import annotations

import pytest

from rlfuse.manager import instantiate, resolve
from rlfuse.plugins._data.records import DataError
from support import data_ctx, write_jsonl


def sft_ctx(path, **data):
    return data_ctx(None, **{"sft": str(path), **data})


def sft_data(**options):
    return instantiate(resolve("sft_data"), options, name="sft_data", where="rollout")


def test_completion_tokens_are_the_response(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "cba=", "completion": "abc"}, {"prompt": "ba=", "completion": "ab", "id": 7}])
    ctx = sft_ctx(f)
    p = sft_data(batch_size=2, shuffle=False)
    p.setup(ctx=ctx)
    b = p.rollout(ctx=ctx, step=0)
    tok = ctx.tokenizer
    assert b.prompts == ["cba=", "ba="] and b.rows[1]["id"] == 7
    ids = b.input_ids[0][b.attention_mask[0].bool()].tolist()
    assert ids == [tok.bos_token_id] + tok("cba=abc", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # the mask covers "abc" + EOS and nothing of the prompt
    assert b.response_mask[0].tolist()[:9] == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert b.response_mask[1].sum() == 3 and b.response_mask.shape == b.input_ids.shape
    # the stream wraps around: the next step starts the file again
    assert p.rollout(ctx=ctx, step=1).prompts == ["cba=", "ba="]


def test_chat_rows_and_long_rows(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "sort dcb"}, {"role": "assistant", "content": "bcd"}]},
        {"prompt": "ba=", "completion": "x" * 40},
    ])  # fmt: skip
    ctx = sft_ctx(f, max_prompt_length=64, max_length=40)
    p = sft_data(batch_size=2, shuffle=False)
    p.setup(ctx=ctx)
    b = p.rollout(ctx=ctx, step=0)
    assert b.prompts[0] == "user: sort dcb\nassistant: "
    # the answer is what the chat template puts after the generation prompt: "bcd\n" (the tiny
    # template ends a turn with a newline), then EOS since the template has none
    assert int(b.response_mask[0].sum()) == 5
    assert int(b.attention_mask[1].sum()) == 40  # cut at data.max_length


def test_bad_rows_and_missing_file_are_errors(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a=", "completion": "a"}, {"prompt": "b="}])
    with pytest.raises(DataError, match="d.jsonl:2: missing field"):
        sft_data().setup(ctx=sft_ctx(f))
    with pytest.raises(ValueError, match="rollout=sft_data needs data.sft"):
        sft_data().setup(ctx=sft_ctx(f, sft=None))
