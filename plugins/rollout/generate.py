"""``rollout=generate``: sample responses to dataset prompts from the current policy.

Draws ``batch_size`` prompts from ``data.prompts``, samples ``n`` responses to each (rows of
one prompt share a ``group_id``), and records the old policy's token log-probs.

On-policy updates (``trainer.epochs == 1`` and one mini-batch per rollout) need no separate
old-log-prob pass: the policy that generated the batch is the one the single update starts
from, so ``loss=ppo`` takes the old log-probs from the training forward itself (ratio = 1
exactly, the same gradient). With ``old_logprobs: auto`` the rollout then leaves
``batch.old_logprobs`` unset and marks the batch ``extras["on_policy"] = True``; a plugin that
needs them before training (``reward=kl_penalty``) computes them itself.

Off-policy updates need the old log-probs (and PPO's critic the old values) before training.
``old_logprobs: sampler`` takes them from the generation itself: the hidden state each decode
step fed the lm_head is kept, and the log-probs of the sampled tokens and the value head's
input come from those states -- no second pass over the sequences (equal to it up to float
rounding: cached decoding adds in another order). ``rollout`` always runs the separate no-grad
forward. ``auto`` uses the sampler's states for a pretrained model (``model=hf``) in fp32 and the
separate forward otherwise (under autocast cached decoding and a full forward round differently at
bf16's precision; the tiny model keeps the seeded figures of the docs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlfuse import hookimpl
from rlfuse.data import Batch
from rlfuse.errors import require
from rlfuse.plugins._data.records import encode_prompts, prompt_text, read_jsonl
from rlfuse.plugins._data.stream import RecordStream, StreamPlugin, shard
from rlfuse.plugins._sampling import ENGINES, SamplingConfig, sample


@dataclass
class Config:
    batch_size: int = 32  # prompts per step
    n: int = 1  # responses sampled per prompt (a group)
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    shuffle: bool = True
    # auto: none when updates are on-policy, else sampler for model=hf in fp32, else rollout |
    # sampler: from the generation's own states | rollout: a separate no-grad forward
    old_logprobs: str = "auto"
    # auto: rlfuse's decode loop for a vocabulary >= 8192, else transformers' generate |
    # rlfuse | hf (plugins/rollout/generate.md)
    engine: str = "auto"

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        require(self.n >= 1, "n", ">= 1", self.n)
        require(self.max_new_tokens >= 1, "max_new_tokens", ">= 1", self.max_new_tokens)
        require(self.temperature > 0, "temperature", "> 0", self.temperature)
        require(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        require(self.old_logprobs in ("auto", "rollout", "sampler"), "old_logprobs", "auto, rollout or sampler",
                self.old_logprobs)
        require(self.top_k >= 0, "top_k", ">= 0 (0 = off)", self.top_k)
        require(self.engine in ENGINES, "engine", "auto, rlfuse or hf", self.engine)


class Plugin(StreamPlugin):
    Config = Config

    def __init__(self, cfg: Config, name: str = "generate") -> None:
        self.cfg = cfg
        self.name = name
        self.stream: RecordStream | None = None
        self.sampling = SamplingConfig(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            engine=cfg.engine,
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
        mode = self.cfg.old_logprobs
        skip = mode == "auto" and on_policy(ctx.cfg.trainer, len(ids))
        # on-policy the states still serve a critic's old values (and a KL reward's old log-probs)
        capture = (mode == "sampler" or (mode == "auto" and sampler_states_by_default(ctx))) and (
            not skip or ctx.forward_needs["hidden"])
        batch = sample(ctx.policy, ctx.tokenizer, ids, self.sampling, ctx.device, capture=capture)
        batch.rows = [row for _, row in picked for _ in range(n)]
        batch.group_ids = torch.arange(len(picked), device=ctx.device).repeat_interleave(n)
        if skip:
            batch.extras["on_policy"] = True  # loss=ppo: old log-probs = the training forward's
            return batch
        out = batch.rollout_forward
        if out is None:  # rollout, or a model whose lm_head the sampler cannot read
            with torch.no_grad():
                out = ctx.forward(batch, model=ctx.policy, hidden=True)
            batch.rollout_forward = out
        batch.old_logprobs = out.logprobs * batch.response_mask
        return batch


def on_policy(trainer: Any, rows: int) -> bool:
    """One optimiser update per rollout: one epoch, one mini-batch."""
    mini = trainer.mini_batch_size
    return trainer.epochs == 1 and (mini is None or mini >= rows)


def sampler_states_by_default(ctx: Any) -> bool:
    """``old_logprobs: auto``: the sampler's states for a pretrained model (``model=hf``) trained
    in fp32 (no autocast), unsharded and without adapters; else the separate forward. (The tiny
    model, also when a pipeline stage loads it from the previous stage, keeps the pass: the
    docs quote its seeded figures.)"""
    from rlfuse import fsdp, models

    return (
        ctx.cfg.model.kind == "hf" and ctx.precision.compute_dtype is None
        and not models.is_peft(ctx.policy) and fsdp.root_of(ctx.policy) is None
    )


def old_policy_forward(ctx: Any, batch: Batch) -> Any:
    """The no-grad forward of the policy that generated ``batch`` (log-probs + hidden states),
    once per rollout: for plugins that need old log-probs before training on an on-policy
    batch. Sets ``batch.old_logprobs``."""
    out = batch.rollout_forward
    if out is None:
        with torch.no_grad():
            out = ctx.forward(batch, model=ctx.policy, hidden=True)
        batch.rollout_forward = out
    batch.old_logprobs = out.logprobs * batch.response_mask
    return out
