"""Reading JSONL records and turning them into token ids — shared by the data plugins.

Rows are JSON objects, one per line. Recognised fields:

* prompts (online RL): ``prompt`` (text) or ``messages`` (chat list, rendered with the
  tokenizer's chat template with a generation prompt); any other field is passed to reward
  functions as a column.
* demonstrations (SFT): ``prompt`` + ``completion``, or ``messages`` whose last message is
  the assistant's answer.
* preferences (reward model, DPO): ``prompt`` + ``chosen`` + ``rejected`` — each either text
  or a chat list (the prompt as messages, chosen/rejected as the assistant's message(s)).

A bad row is an error naming the file, the line and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from rlfuse.errors import RlfuseError


class DataError(RlfuseError, ValueError):
    """A data file or row is malformed; the message names the file, line and field."""


def resolve_path(path: str) -> Path:
    """A filesystem path, or ``pkg://package.name/relative/path`` for files shipped in a package."""
    if path.startswith("pkg://"):
        pkg, _, rel = path[len("pkg://") :].partition("/")
        return Path(str(resources.files(pkg).joinpath(rel)))
    return Path(path).expanduser()


@dataclass
class Record:
    row: dict[str, Any]
    where: str  # "file:line"


def read_jsonl(path: str, required: tuple[tuple[str, ...], ...] = ()) -> list[Record]:
    """Read a JSONL file. ``required`` lists alternatives: each tuple is a set of fields that
    must all be present, and at least one tuple must be satisfied."""
    p = resolve_path(path)
    if not p.exists():
        raise DataError(f"{path}: no such file")
    out: list[Record] = []
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if required and not any(all(k in row for k in alt) for alt in required):
                want = " or ".join("+".join(alt) for alt in required)
                raise DataError(f"{where}: missing field(s): need {want}; row has {sorted(row)}")
            out.append(Record(row, where))
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def _check_messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of chat messages")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field '{field}[{j}]' must be an object with string 'role' and 'content'")
    return value


def _text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def prompt_text(rec: Record, tokenizer: Any) -> str:
    """The prompt of a row as text (chat messages rendered with the chat template)."""
    row = rec.row
    if "prompt" in row and isinstance(row["prompt"], list):
        msgs = _check_messages(row["prompt"], rec.where, "prompt")
        return _chat(tokenizer, msgs, rec.where, generation_prompt=True)
    if "prompt" in row:
        return _text(row["prompt"], rec.where, "prompt")
    msgs = _check_messages(row.get("messages"), rec.where, "messages")
    if msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if not msgs:
        raise DataError(f"{rec.where}: field 'messages' holds only an assistant message")
    return _chat(tokenizer, msgs, rec.where, generation_prompt=True)


def completion_text(rec: Record, tokenizer: Any, field: str = "completion") -> str:
    """The answer of a demonstration row (``completion`` / ``chosen`` / ``rejected``)."""
    row = rec.row
    if field == "completion" and "completion" not in row:
        msgs = _check_messages(row.get("messages"), rec.where, "messages")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{rec.where}: field 'messages' must end with an assistant message")
        return msgs[-1]["content"]
    if field not in row:
        raise DataError(f"{rec.where}: missing field '{field}'")
    value = row[field]
    if isinstance(value, list):
        msgs = _check_messages(value, rec.where, field)
        return "".join(m["content"] for m in msgs if m["role"] == "assistant")
    return _text(value, rec.where, field)


def _chat(tokenizer: Any, msgs: list[dict[str, str]], where: str, generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: chat messages given but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)


def encode_prompt(tokenizer: Any, text: str, max_len: int, truncation: str, where: str) -> list[int]:
    """Token ids of a prompt, BOS first when the tokenizer has one; too long -> as configured."""
    return encode_prompts(tokenizer, [text], max_len, truncation, [where])[0]


def encode_prompts(
    tokenizer: Any, texts: list[str], max_len: int, truncation: str, wheres: list[str]
) -> list[list[int]]:
    """:func:`encode_prompt` for many prompts at once (one batched tokenizer call)."""
    if truncation not in ("left", "error"):
        raise DataError(f"data.truncation must be 'left' or 'error', got '{truncation}'")
    bos = tokenizer.bos_token_id
    out = []
    for ids, where in zip(tokenizer(texts, add_special_tokens=False)["input_ids"], wheres, strict=True):
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        if len(ids) > max_len:
            if truncation == "error":
                raise DataError(
                    f"{where}: prompt is {len(ids)} tokens, longer than data.max_prompt_length={max_len} "
                    "(set data.truncation=left to keep its last tokens)"
                )
            keep = ids[-(max_len - 1) :] if bos is not None else ids[-max_len:]
            ids = ([bos] if bos is not None else []) + keep
        out.append(ids)
    return out


def encode_answers(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of answers, each ending with EOS (one batched tokenizer call)."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [x + [eos] if eos is not None else x for x in ids]


def encode_answer(tokenizer: Any, text: str) -> list[int]:
    """Token ids of an answer, ending with EOS."""
    return encode_answers(tokenizer, [text])[0]


def pack(
    prompts: list[list[int]], answers: list[list[int]], pad_id: int, max_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + answer`` rows -> (input_ids, attention_mask, response_mask)."""
    rows = []
    for p, a in zip(prompts, answers, strict=True):
        if max_len is not None and len(p) + len(a) > max_len:
            a = a[: max(0, max_len - len(p))]
        rows.append((p, a))
    T = max(len(p) + len(a) for p, a in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    resp = torch.zeros((B, T), dtype=torch.float32)
    for i, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a, dtype=torch.long)
        attn[i, :n] = 1
        resp[i, len(p) : n] = 1.0
    return ids, attn, resp
