"""``rollout=preference_data``: batches of preference pairs from ``data.preferences``.

Each row is ``prompt`` + ``chosen`` + ``rejected`` (text, or chat lists: the prompt as
messages rendered with the tokenizer's chat template, the answers as assistant messages; see
:mod:`rlfuse.plugins.records`). An optional numeric ``margin`` field is kept per pair (the
reward model's margin loss uses it). Rows written by ``rlfuse label`` with ``"label": "tie"``
or ``"label": "skip"`` carry no preference and are left out (and counted).

A step's ``P`` pairs become ONE batch of ``2P`` rows — all chosen answers first, then all
rejected ones in the same pair order — so a loss needs a single forward pass::

    rows 0..P-1    prompt_i + chosen_i   + EOS     extras["chosen"] = 1
    rows P..2P-1   prompt_i + rejected_i + EOS     extras["chosen"] = 0

``group_ids`` and ``extras["pair"]`` hold the pair index ``i`` of every row,
``extras["pair_key"]`` a stable id of the pair (``file:line``), ``extras["margin"]`` the
pair's margin (0 when absent). ``response_mask`` marks the answer tokens (with EOS).
Prompts longer than ``data.max_prompt_length`` are truncated or rejected as
``data.truncation`` says; answers are cut at ``data.max_length`` (counted, and reported).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from rlfuse import hookimpl
from rlfuse.data import Batch
from rlfuse.plugins.records import (
    DataError,
    completion_text,
    encode_answer,
    encode_prompt,
    pack,
    prompt_text,
    read_jsonl,
)
from rlfuse.plugins.stream import RecordStream, StreamPlugin

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
    for r in read_jsonl(path):
        if r.row.get("label") in NO_PREFERENCE:
            skipped += 1
            continue
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in r.row]
        if missing:
            raise DataError(f"{r.where}: missing field(s) {missing}; a preference row needs prompt, chosen, rejected")
        p = prompt_text(r, tok)
        c = completion_text(r, tok, field="chosen")
        j = completion_text(r, tok, field="rejected")
        margin = r.row.get("margin", 0.0)
        if not isinstance(margin, (int, float)) or isinstance(margin, bool):
            raise DataError(f"{r.where}: field 'margin' must be a number, got {type(margin).__name__}")
        items.append(
            PairItem(
                prompt_ids=encode_prompt(tok, p, data.max_prompt_length, data.truncation, r.where),
                chosen_ids=encode_answer(tok, c),
                rejected_ids=encode_answer(tok, j),
                prompt=p, chosen=c, rejected=j, row=r.row, key=r.where, margin=float(margin),
            )
        )
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


@dataclass
class Config:
    batch_size: int = 32  # pairs per step (the batch has twice as many rows)
    shuffle: bool = True


class Plugin(StreamPlugin):
    Config = Config

    def __init__(self, cfg: Config, name: str = "preference_data") -> None:
        if cfg.batch_size < 1:
            raise ValueError(f"rollout.batch_size must be >= 1, got {cfg.batch_size}")
        self.cfg = cfg
        self.name = name
        self.items: list[PairItem] = []
        self.stream: RecordStream | None = None

    @hookimpl
    def setup(self, ctx: Any) -> None:
        if not ctx.cfg.data.preferences:
            raise ValueError("rollout=preference_data needs data.preferences (a JSONL file of pairs)")
        self.items = load_pairs(ctx, ctx.cfg.data.preferences)
        self.stream = RecordStream(self.items, seed=ctx.cfg.seed, shuffle=self.cfg.shuffle)

    @hookimpl
    def rollout(self, ctx: Any, step: int) -> Batch:
        assert self.stream is not None
        return pair_batch(self.stream.take(self.cfg.batch_size), ctx.tokenizer, ctx.cfg.data.max_length, ctx.device)
