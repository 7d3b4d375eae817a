"""``rollout=generate``: sample responses to dataset prompts from the current policy.

Draws ``batch_size`` prompts from ``data.prompts``, samples ``n`` responses to each (rows of
one prompt share a ``group_id``), and records the old policy's token log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlfuse import hookimpl
from rlfuse.data import Batch
from rlfuse.plugins._data.records import encode_prompts, prompt_text, read_jsonl
from rlfuse.plugins._data.stream import RecordStream, StreamPlugin, shard
from rlfuse.plugins._sampling import SamplingConfig, sample


@dataclass
class Config:
    batch_size: int = 32  # prompts per step
    n: int = 1  # responses sampled per prompt (a group)
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    shuffle: bool = True


class Plugin(StreamPlugin):
    Config = Config

    def __init__(self, cfg: Config, name: str = "generate") -> None:
        if cfg.batch_size < 1 or cfg.n < 1:
            raise ValueError("rollout.batch_size and rollout.n must be >= 1")
        self.cfg = cfg
        self.name = name
        self.stream: RecordStream | None = None
        self.sampling = SamplingConfig(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k
        )

    @hookimpl
    def setup(self, ctx: Any) -> None:
        data = ctx.cfg.data
        if not data.prompts:
            raise ValueError("rollout=generate needs data.prompts (a JSONL file of prompts)")
        recs = read_jsonl(data.prompts, required=(("prompt",), ("messages",)))
        texts = [prompt_text(r, ctx.tokenizer) for r in recs]
        ids = encode_prompts(ctx.tokenizer, texts, data.max_prompt_length, data.truncation, [r.where for r in recs])
        self.items = [(i, r.row) for i, r in zip(ids, recs, strict=True)]
        self.stream = RecordStream(self.items, seed=ctx.cfg.seed, shuffle=self.cfg.shuffle, **shard(ctx))

    @hookimpl
    def rollout(self, ctx: Any, step: int) -> Batch:
        assert self.stream is not None
        picked = self.stream.take(self.cfg.batch_size)
        n = self.cfg.n
        ids = [p for p, _ in picked for _ in range(n)]
        batch = sample(ctx.policy, ctx.tokenizer, ids, self.sampling, ctx.device)
        batch.rows = [row for _, row in picked for _ in range(n)]
        batch.group_ids = torch.arange(len(picked), device=ctx.device).repeat_interleave(n)
        with torch.no_grad():
            out = ctx.forward(batch, model=ctx.policy, hidden=True)
        batch.old_logprobs = out.logprobs * batch.response_mask
        batch.cache["rollout_forward"] = out
        return batch
