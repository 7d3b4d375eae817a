"""``reward=model``: score responses with a learned reward model.

``path`` is a transformers ``AutoModelForSequenceClassification`` folder with one label (what
``algo=reward_model`` writes at ``<run_dir>/reward_model``; any such folder works). Each
response is scored exactly as the reward model was trained: the row's prompt and the response
text are re-tokenised with the reward model's own tokenizer as ``prompt + response + EOS``
(prompt truncated as ``data.truncation`` says), and the score is read at the last token::

    s = score(h_last(prompt, response))

then optionally normalised and clipped::

    normalize=none     s
    normalize=saved    (s - mean) / std   with the training-answer statistics saved in the
                                           folder's rlfuse_reward.json (none if absent)
    normalize=batch    (s - mean_batch) / std_batch
    normalize=running  (s - mean_seen) / std_seen   (running over every scored response)
    clip=c             s <- clamp(s, -c, c)          after normalisation

An ensemble (Coste et al. 2023): ``ensemble`` lists more reward-model folders (trained with
other seeds or other halves of the data). Every member's score is normalised with its own
saved statistics (``normalize=saved``), then they are combined, before batch/running
normalisation and clipping::

    combine=mean   s = mean_m s_m
    combine=lcb    s = mean_m s_m - ensemble_k * std_m s_m     (uncertainty-penalised)

Returns a sequence-level reward (B,) named after the component (``reward/model/mean``;
``reward/model/ensemble_std`` with an ensemble).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlfuse import hookimpl
from rlfuse.data import Batch
from rlfuse.errors import one_of, require
from rlfuse.plugins._data.records import Record, encode_answer, encode_prompt, pack, prompt_text
from rlfuse.plugins.loss.bradley_terry import STATS_FILE, last_token_index

NORMALIZE = ("none", "saved", "batch", "running")
COMBINE = ("mean", "lcb")


@dataclass
class Config:
    path: str = "???"  # reward model folder (AutoModelForSequenceClassification, num_labels=1)
    normalize: str = "saved"  # none | saved | batch | running
    clip: float | None = None  # clamp the (normalised) score to [-clip, clip]
    batch_size: int = 64  # responses per reward-model forward
    dtype: str = "float32"  # float32 | bfloat16 | float16
    ensemble: list[str] = field(default_factory=list)  # more reward-model folders (an ensemble)
    combine: str = "mean"  # mean | lcb (mean - ensemble_k * std over the members)
    ensemble_k: float = 1.0

    def __post_init__(self) -> None:
        one_of("normalize", self.normalize, NORMALIZE)
        require(self.clip is None or self.clip > 0, "clip", "> 0 or null", self.clip)
        require(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        one_of("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        one_of("combine", self.combine, COMBINE)


def load_reward_model(path: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) of a reward model folder, with clear errors."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"reward model folder '{path}' does not exist (train one with algo=reward_model)")
    model = AutoModelForSequenceClassification.from_pretrained(p, dtype=dtype).eval()
    model.requires_grad_(False)
    if model.config.num_labels != 1:
        raise ValueError(f"reward model '{path}' has num_labels={model.config.num_labels}; expected 1")
    tok = AutoTokenizer.from_pretrained(p)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


@torch.no_grad()
def score_ids(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) scalar scores read at the last attended token of every row (any padding side)."""
    from rlfuse.models import position_ids

    pos = position_ids(attention_mask)
    idx = last_token_index(attention_mask)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    score = getattr(model, "score", None)
    if isinstance(score, torch.nn.Linear) and getattr(model, "base_model", model) is not model:
        h = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).last_hidden_state
        return score(h[rows, idx]).squeeze(-1).float()
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos)  # pooled by HF
    return out.logits.squeeze(-1).float()


def _saved_stats(path: str, normalize: str) -> tuple[float, float]:
    """(mean, std) saved beside a reward model for ``normalize=saved``; (0, 1) otherwise."""
    stats_file = Path(path).expanduser() / STATS_FILE
    if normalize == "saved" and stats_file.exists():
        stats = json.loads(stats_file.read_text())
        return float(stats.get("mean", 0.0)), float(stats.get("std", 1.0))
    return 0.0, 1.0


class Plugin:
    Config = Config

    def __init__(self, cfg: Config, name: str = "model") -> None:
        self.cfg = cfg
        self.name = name
        from rlfuse.models import DTYPES

        self.model, self.tok = load_reward_model(cfg.path, DTYPES[cfg.dtype])
        self.mean, self.std = _saved_stats(cfg.path, cfg.normalize)
        self.members = [(*load_reward_model(p, DTYPES[cfg.dtype]), *_saved_stats(p, cfg.normalize)) for p in cfg.ensemble]
        if self.members:  # each member is normalised with its own statistics before combining
            self.members.insert(0, (self.model, self.tok, self.mean, self.std))
            self.mean, self.std = 0.0, 1.0
        self.count, self.m2 = 0, 0.0  # running statistics (Welford)

    @hookimpl
    def setup(self, ctx: Any) -> None:
        self.model.to(ctx.device)
        for m in self.members:
            m[0].to(ctx.device)

    def encode(self, ctx: Any, batch: Batch, tok: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        data = ctx.cfg.data
        tok = tok or self.tok
        prompts, answers = [], []
        rows = batch.rows if len(batch.rows) == len(batch) else [None] * len(batch)
        for i, (row, resp) in enumerate(zip(rows, batch.responses, strict=False)):
            where = f"reward.{self.name} row {i}"
            if row is not None and ("prompt" in row or "messages" in row):
                text = prompt_text(Record(row, where), tok)
            else:
                text = batch.prompts[i]
            prompts.append(encode_prompt(tok, text, data.max_prompt_length, data.truncation, where))
            answers.append(encode_answer(tok, resp))
        ids, attn, _ = pack(prompts, answers, tok.pad_token_id)
        return ids, attn

    def raw_scores(self, ctx: Any, batch: Batch, model: Any = None, tok: Any = None) -> torch.Tensor:
        """(B,) scores of one reward model; with an ensemble and no ``model``: the members'
        saved-normalised scores combined (``combine``)."""
        if model is None and self.members:
            each = torch.stack([(self.raw_scores(ctx, batch, m, t) - mu) / max(sd, 1e-6) for m, t, mu, sd in self.members])
            std = each.std(0) if len(self.members) > 1 else torch.zeros_like(each[0])
            ctx.record({f"reward/{self.name}/ensemble_std": std.mean()})
            return each.mean(0) - (self.cfg.ensemble_k * std if self.cfg.combine == "lcb" else 0.0)
        model = model or self.model
        ids, attn = self.encode(ctx, batch, tok)
        dev = next(model.parameters()).device
        parts = [
            score_ids(model, ids[s : s + self.cfg.batch_size].to(dev), attn[s : s + self.cfg.batch_size].to(dev))
            for s in range(0, len(ids), self.cfg.batch_size)
        ]
        return torch.cat(parts)

    def normalise(self, s: torch.Tensor) -> torch.Tensor:
        mode = self.cfg.normalize
        if mode == "batch":
            s = (s - s.mean()) / s.std().clamp_min(1e-6) if len(s) > 1 else s - s.mean()
        elif mode == "running":
            for v in s.tolist():  # Welford update
                self.count += 1
                d = v - self.mean
                self.mean += d / self.count
                self.m2 += d * (v - self.mean)
            std = (self.m2 / (self.count - 1)) ** 0.5 if self.count > 1 else 1.0
            s = (s - self.mean) / max(std, 1e-6)
        elif mode == "saved":
            s = (s - self.mean) / max(self.std, 1e-6)
        if self.cfg.clip is not None:
            s = s.clamp(-self.cfg.clip, self.cfg.clip)
        return s

    @hookimpl
    def reward(self, ctx: Any, batch: Batch) -> dict[str, torch.Tensor]:
        raw = self.raw_scores(ctx, batch)
        ctx.record({f"reward/{self.name}/raw_mean": raw.mean()})
        return {self.name: self.normalise(raw).to(batch.input_ids.device)}

    @hookimpl
    def save_state(self) -> dict[str, Any]:
        return {f"reward.{self.name}": {"mean": self.mean, "count": self.count, "m2": self.m2}}

    @hookimpl
    def load_state(self, state: dict[str, Any]) -> None:
        s = state.get(f"reward.{self.name}")
        if s and self.cfg.normalize == "running":
            self.mean, self.count, self.m2 = s["mean"], s["count"], s["m2"]
