"""``rollout=preference_data``: batches of preference pairs from ``data.preferences``.

Each row is ``prompt`` + ``chosen`` + ``rejected`` (text, or chat lists: the prompt as
messages rendered with the tokenizer's chat template, the answers as assistant messages; see
:mod:`rlfuse.plugins._data.records`). An optional numeric ``margin`` field is kept per pair (the
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

from dataclasses import dataclass
from typing import Any

from rlfuse import hookimpl
from rlfuse.data import Batch
from rlfuse.plugins._data.pairs import PairItem, load_pairs, pair_batch
from rlfuse.plugins._data.stream import RecordStream, StreamPlugin, shard

__all__ = ["Config", "Plugin", "PairItem", "load_pairs", "pair_batch"]


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
        self.stream = RecordStream(self.items, seed=ctx.cfg.seed, shuffle=self.cfg.shuffle, **shard(ctx))

    @hookimpl
    def rollout(self, ctx: Any, step: int) -> Batch:
        assert self.stream is not None
        return pair_batch(self.stream.take(self.cfg.batch_size), ctx.tokenizer, ctx.cfg.data.max_length, ctx.device)
