"""JSONL records: package paths, required fields, and errors naming file, line and field."""

from __future__ import annotations

import pytest

from rlfuse.models import build_tiny_tokenizer
from rlfuse.plugins._data.records import (
    DataError,
    Record,
    completion_text,
    encode_prompts,
    pack,
    prompt_text,
    read_jsonl,
    resolve_path,
)


def test_pkg_paths_resolve_to_shipped_files():
    p = resolve_path("pkg://rlfuse.plugins/tasks/data/prompts_eval.jsonl")
    assert p.exists() and p.name == "prompts_eval.jsonl"
    assert len(read_jsonl(str(p), required=(("prompt",),))) == 200


@pytest.mark.parametrize(
    "text, msg",
    [("", "no rows"), ('{"prompt": "a"}\n[1, 2]\n', "f.jsonl:2: expected a JSON object, got list"),
     ('{"x": 1}\n', r"f.jsonl:1: missing field\(s\): need prompt or messages; row has \['x'\]"),
     ('{"prompt": "a"}\n\n{"prompt": \n', "f.jsonl:3: not valid JSON")],
)  # fmt: skip
def test_bad_files_name_file_and_line(tmp_path, text, msg):
    f = tmp_path / "f.jsonl"
    f.write_text(text)
    with pytest.raises(DataError, match=msg):
        read_jsonl(str(f), required=(("prompt",), ("messages",)))
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(str(tmp_path / "missing.jsonl"))


def test_prompt_and_completion_of_chat_rows():
    tok = build_tiny_tokenizer()
    rec = Record({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "f:1")
    assert prompt_text(rec, tok) == "user: hi\nassistant: "
    assert completion_text(rec, tok) == "yo"
    with pytest.raises(DataError, match="f:1: field 'completion' must be a string"):
        completion_text(Record({"prompt": "a", "completion": 3}, "f:1"), tok)
    with pytest.raises(DataError, match=r"f:1: field 'messages\[0\]'"):
        prompt_text(Record({"messages": [{"role": "user"}]}, "f:1"), tok)


def test_prompt_truncation_and_packing():
    tok = build_tiny_tokenizer()
    (ids,) = encode_prompts(tok, ["abcdefgh="], 5, "left", ["f:1"])
    assert ids == [tok.bos_token_id] + tok("fgh=", add_special_tokens=False)["input_ids"]  # BOS + the last 4
    with pytest.raises(DataError, match="f:1: prompt is 10 tokens, longer than data.max_prompt_length=5"):
        encode_prompts(tok, ["abcdefgh="], 5, "error", ["f:1"])
    ids, attn, resp = pack([[1, 2], [1]], [[7, 8, 9], [7]], pad_id=0, max_len=4)
    assert ids.tolist() == [[1, 2, 7, 8], [1, 7, 0, 0]]
    assert attn.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert resp.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
