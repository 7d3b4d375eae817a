"""Reading JSONL records and turning them into token ids — shared by the data plugins.

Rows are JSON objects, one per line. Recognised fields:

* prompts (online RL): ``prompt`` (text) or ``messages`` (chat list, rendered with the
  tokenizer's chat template with a generation prompt); any other field is passed to reward
  functions as a column.
* demonstrations (SFT): ``prompt`` + ``completion``, or ``messages`` whose last message is
  the assistant's answer.
* preferences (reward model, DPO): ``prompt`` + ``chosen`` + ``rejected`` — each either text
  or a chat list (the prompt as messages, chosen/rejected as the assistant's message(s)).

When the prompt is a chat (``messages``, or ``prompt`` as a list) the answer goes through the
chat template too (:func:`encode_chat`): the whole conversation is tokenised once, and the
prompt/answer boundary is found on token ids, so the answer tokens are exactly those the
template puts after the generation prompt (end-of-turn marker included).

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


def chat_prompt(rec: Record) -> list[dict[str, str]] | None:
    """The prompt messages of a row whose prompt is a chat (``prompt`` list or ``messages``
    without its final assistant turn); None for a text prompt."""
    row = rec.row
    if "prompt" in row:
        return _check_messages(row["prompt"], rec.where, "prompt") if isinstance(row["prompt"], list) else None
    msgs = _check_messages(row.get("messages"), rec.where, "messages")
    if msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if not msgs:
        raise DataError(f"{rec.where}: field 'messages' holds only an assistant message")
    return msgs


def answer_messages(rec: Record, field: str = "completion") -> list[dict[str, str]]:
    """The answer of a chat row as assistant message(s): the last message of ``messages``
    (for ``completion``), or the field itself -- a list of messages, or text."""
    row = rec.row
    if field == "completion" and "completion" not in row:
        msgs = _check_messages(row.get("messages"), rec.where, "messages")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{rec.where}: field 'messages' must end with an assistant message")
        return [msgs[-1]]
    if field not in row:
        raise DataError(f"{rec.where}: missing field '{field}'")
    value = row[field]
    if isinstance(value, list):
        return _check_messages(value, rec.where, field)
    return [{"role": "assistant", "content": _text(value, rec.where, field)}]


@dataclass
class ChatStats:
    """How often the template re-tokenised across the prompt/answer boundary (reported)."""

    rows: int = 0
    retokenised: int = 0


def encode_chat(
    tokenizer: Any,
    prompt: list[dict[str, str]],
    answer: list[dict[str, str]],
    max_len: int,
    truncation: str,
    where: str,
    stats: ChatStats | None = None,
) -> tuple[list[int], list[int], str]:
    """Token ids of a chat prompt and its answer, cut on token ids.

    The full conversation and the prompt with the generation prompt are rendered with the
    chat template and tokenised; the prompt's ids must be a prefix of the conversation's. When
    a template (or a tokenizer merge) re-tokenises across the boundary they are not: the
    boundary is then the longest common prefix, and the answer is the rest of the
    conversation's ids -- so prompt + answer is always exactly the tokenised conversation.
    The answer ends at its last EOS (what the template puts after the end-of-turn token is
    dropped: a sampled answer stops there too); EOS is appended when the answer holds none.

    :returns: ``(prompt_ids, answer_ids, prompt_text)``; the prompt is truncated like
        :func:`encode_prompt`.
    """
    p_text = _chat(tokenizer, prompt, where, generation_prompt=True)
    f_text = _chat(tokenizer, prompt + answer, where, generation_prompt=False)
    p_ids, f_ids = tokenizer([p_text, f_text], add_special_tokens=False)["input_ids"]
    k = 0
    for a, b in zip(p_ids, f_ids, strict=False):
        if a != b:
            break
        k += 1
    if stats is not None:
        stats.rows += 1
        stats.retokenised += k < len(p_ids)
    if k == len(f_ids):
        raise DataError(f"{where}: the chat template renders no answer tokens after the prompt")
    answer_ids = list(f_ids[k:])
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in answer_ids:
        answer_ids.append(eos)
    elif eos is not None:  # end at the end-of-turn EOS, as a sampled answer does (drop a trailing "\n")
        answer_ids = answer_ids[: len(answer_ids) - answer_ids[::-1].index(eos)]
    prompt_ids = _fit_prompt(tokenizer, list(f_ids[:k]), max_len, truncation, where)
    return prompt_ids, answer_ids, p_text


def report_chat(stats: ChatStats, path: str) -> None:
    """One stderr line when some rows' boundary had to be found by common prefix."""
    if stats.retokenised:
        import sys

        print(
            f"[rlfuse] {path}: the chat template re-tokenised across the prompt/answer boundary in "
            f"{stats.retokenised} of {stats.rows} rows; cut at the longest common token prefix",
            file=sys.stderr,
        )


def encode_prompt(tokenizer: Any, text: str, max_len: int, truncation: str, where: str) -> list[int]:
    """Token ids of a prompt, BOS first when the tokenizer has one; too long -> as configured."""
    return encode_prompts(tokenizer, [text], max_len, truncation, [where])[0]


def encode_prompts(
    tokenizer: Any, texts: list[str], max_len: int, truncation: str, wheres: list[str]
) -> list[list[int]]:
    """:func:`encode_prompt` for many prompts at once (one batched tokenizer call)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [_fit_prompt(tokenizer, x, max_len, truncation, w) for x, w in zip(ids, wheres, strict=True)]


def _fit_prompt(tokenizer: Any, ids: list[int], max_len: int, truncation: str, where: str) -> list[int]:
    """BOS first when the tokenizer has one; longer than ``max_len`` -> as ``truncation`` says."""
    if truncation not in ("left", "error"):
        raise DataError(f"data.truncation must be 'left' or 'error', got '{truncation}'")
    bos = tokenizer.bos_token_id
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
    return ids


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
