"""``rollout=sft_data``: batches of demonstrations from ``data.sft`` (offline algorithms).

Each row is ``prompt`` + ``completion`` (or chat ``messages`` ending with the assistant's
answer). ``response_mask`` marks the completion tokens (with EOS), so ``loss=sft`` trains on
the answer only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlfuse import hookimpl
from rlfuse.data import Batch
from rlfuse.errors import require
from rlfuse.plugins._data.records import (
    ChatStats,
    answer_messages,
    chat_prompt,
    completion_text,
    encode_answers,
    encode_chat,
    encode_prompts,
    pack,
    prompt_text,
    read_jsonl,
    report_chat,
)
from rlfuse.plugins._data.stream import RecordStream, StreamPlugin, shard


@dataclass
class Config:
    batch_size: int = 32
    shuffle: bool = True

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)


class Plugin(StreamPlugin):
    Config = Config

    def __init__(self, cfg: Config, name: str = "sft_data") -> None:
        self.cfg = cfg
        self.name = name
        self.stream: RecordStream | None = None

    @hookimpl
    def setup(self, ctx: Any) -> None:
        data, tok = ctx.cfg.data, ctx.tokenizer
        if not data.sft:
            raise ValueError("rollout=sft_data needs data.sft (a JSONL file of demonstrations)")
        recs = read_jsonl(data.sft, required=(("prompt", "completion"), ("messages",)))
        chats = [chat_prompt(r) for r in recs]
        text = [r for r, m in zip(recs, chats, strict=True) if m is None]
        prompts = [prompt_text(r, tok) for r in text]
        p_ids = encode_prompts(tok, prompts, data.max_prompt_length, data.truncation, [r.where for r in text])
        a_ids = encode_answers(tok, [completion_text(r, tok) for r in text])
        encoded = iter(zip(p_ids, a_ids, prompts, strict=True))
        stats, items = ChatStats(), []
        for r, msgs in zip(recs, chats, strict=True):
            if msgs is None:  # text prompt + completion (+ EOS)
                items.append((*next(encoded), r.row))
            else:  # chat: the answer through the template too, cut on token ids
                p, a, ptext = encode_chat(
                    tok, msgs, answer_messages(r), data.max_prompt_length, data.truncation, r.where, stats
                )
                items.append((p, a, ptext, r.row))
        report_chat(stats, data.sft)
        self.stream = RecordStream(items, seed=ctx.cfg.seed, shuffle=self.cfg.shuffle, **shard(ctx))

    @hookimpl
    def rollout(self, ctx: Any, step: int) -> Batch:
        assert self.stream is not None
        picked = self.stream.take(self.cfg.batch_size)
        ids, attn, resp = pack([p for p, *_ in picked], [a for _, a, *_ in picked], ctx.tokenizer.pad_token_id, ctx.cfg.data.max_length)
        return Batch(
            input_ids=ids, attention_mask=attn, response_mask=resp, prompts=[x[2] for x in picked], rows=[x[3] for x in picked]
        ).to(ctx.device)
