"""Preference pairs: reading them from JSONL and laying ``P`` pairs out as one ``2P``-row batch.

Shared by ``rollout=preference_data``, ``loss=dpo`` and ``loss=bradley_terry`` (their held-out
evaluation). The layout -- all chosen rows first, then the rejected ones in the same pair
order -- is described in :mod:`rlfuse.plugins.rollout.preference_data`;
:func:`split_pairs` undoes it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from rlfuse.data import Batch
from rlfuse.plugins._data.records import (
    ChatStats,
    DataError,
    answer_messages,
    chat_prompt,
    completion_text,
    encode_answer,
    encode_chat,
    encode_prompt,
    pack,
    prompt_text,
    read_jsonl,
    report_chat,
)

NO_PREFERENCE = ("tie", "skip")  # `label` values written by `rlfuse label` that carry no pair


@dataclass
class PairItem:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt: str
    chosen: str
    rejected: str
    row: dict[str, Any]
    key: str  # "file:line"
    margin: float = 0.0


def load_pairs(ctx: Any, path: str) -> list[PairItem]:
    """Read and tokenise a preference JSONL file (errors name file, line and field)."""
    data, tok = ctx.cfg.data, ctx.tokenizer
    items: list[PairItem] = []
    skipped = 0
    chat = ChatStats()
    for r in read_jsonl(path):
        if r.row.get("label") in NO_PREFERENCE:
            skipped += 1
            continue
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in r.row]
        if missing:
            raise DataError(f"{r.where}: missing field(s) {missing}; a preference row needs prompt, chosen, rejected")
        c = completion_text(r, tok, field="chosen")
        j = completion_text(r, tok, field="rejected")
        margin = r.row.get("margin", 0.0)
        if not isinstance(margin, (int, float)) or isinstance(margin, bool):
            raise DataError(f"{r.where}: field 'margin' must be a number, got {type(margin).__name__}")
        msgs = chat_prompt(r)
        if msgs is not None:  # chat: both answers through the template, cut on token ids
            args = (data.max_prompt_length, data.truncation, r.where, chat)
            p_ids, c_ids, p = encode_chat(tok, msgs, answer_messages(r, "chosen"), *args)
            p_ids_r, j_ids, _ = encode_chat(tok, msgs, answer_messages(r, "rejected"), *args)
            if p_ids_r != p_ids:  # re-tokenised differently at the two answers: keep both exact
                common = next((i for i, (a, b) in enumerate(zip(p_ids, p_ids_r, strict=False)) if a != b), min(len(p_ids), len(p_ids_r)))
                c_ids, j_ids = p_ids[common:] + c_ids, p_ids_r[common:] + j_ids
                p_ids = p_ids[:common]
        else:
            p = prompt_text(r, tok)
            p_ids = encode_prompt(tok, p, data.max_prompt_length, data.truncation, r.where)
            c_ids, j_ids = encode_answer(tok, c), encode_answer(tok, j)
        items.append(
            PairItem(
                prompt_ids=p_ids, chosen_ids=c_ids, rejected_ids=j_ids,
                prompt=p, chosen=c, rejected=j, row=r.row, key=r.where, margin=float(margin),
            )
        )
    report_chat(chat, path)
    if not items:
        raise DataError(f"{path}: no preference pairs (all {skipped} rows are ties or skips)")
    cut = sum(
        len(it.prompt_ids) + max(len(it.chosen_ids), len(it.rejected_ids)) > data.max_length for it in items
    )
    if cut:
        print(
            f"[rlfuse] {path}: {cut} of {len(items)} pairs have an answer cut at data.max_length="
            f"{data.max_length} tokens",
            file=sys.stderr,
        )
    if skipped:
        print(f"[rlfuse] {path}: {skipped} tie/skip rows carry no preference, left out", file=sys.stderr)
    return items


def pair_batch(items: list[PairItem], tokenizer: Any, max_length: int | None, device: Any) -> Batch:
    """``P`` pairs -> one ``2P``-row batch: chosen rows first, then rejected (same order)."""
    P = len(items)
    prompts = [it.prompt_ids for it in items] * 2
    answers = [it.chosen_ids for it in items] + [it.rejected_ids for it in items]
    ids, attn, resp = pack(prompts, answers, tokenizer.pad_token_id, max_length)
    pair = torch.arange(P).repeat(2)
    return Batch(
        input_ids=ids,
        attention_mask=attn,
        response_mask=resp,
        prompts=[it.prompt for it in items] * 2,
        responses=[it.chosen for it in items] + [it.rejected for it in items],
        rows=[it.row for it in items] * 2,
        group_ids=pair,
        extras={
            "pair": pair,
            "chosen": torch.cat([torch.ones(P, dtype=torch.long), torch.zeros(P, dtype=torch.long)]),
            "pair_key": [it.key for it in items] * 2,
            "margin": torch.tensor([it.margin for it in items] * 2, dtype=torch.float32),
        },
    ).to(device)


def split_pairs(batch: Batch, device: Any, who: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Undo :func:`pair_batch`'s layout on a (mini/micro-)batch of it.

    :returns: ``(pair_ids, chosen_rows, rejected_rows)``, each ``(P,)`` and ordered by pair id:
        the row indices of each pair's chosen and rejected answer. Raises when a pair's two
        rows are not both in ``batch`` (``who`` names the plugin that needs whole pairs).
    """
    pair = batch.extras["pair"].to(device)
    is_c = batch.extras["chosen"].to(device).bool()
    rows = torch.arange(len(pair), device=device)
    ids_c, oc = pair[is_c].sort()
    ids_r, orr = pair[~is_c].sort()
    if ids_c.shape != ids_r.shape or not torch.equal(ids_c, ids_r):
        raise ValueError(
            f"a micro-batch holds a chosen row without its rejected row (or the reverse): {who} "
            "needs whole pairs; set trainer.shuffle=false and leave trainer.mini_batch_size / "
            "micro_batch_size null or even multiples of rollout.batch_size pairs"
        )
    return ids_c, rows[is_c][oc], rows[~is_c][orr]
