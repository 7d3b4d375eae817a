"""``rollout=policy_pairs``: preference pairs of the policy's own answers, labelled in the loop.

At setup the plugin asks the labeller (the ``compare`` hook: ``labeller=simulated`` or
``labeller=human``) to compare answers sampled from a policy, writes every answer to
``<run_dir>/<output>``, and then serves batches of the labelled pairs exactly like
``rollout=preference_data`` (chosen rows first, then rejected). This is InstructGPT's
reward-model data: comparisons of samples from the policy the reward model will judge.

::

    prompts  = block `round` of `prompts` prompts of data.prompts (seeded order)
    answers  = k samples per prompt from `policy` (null: the stage's own initial model)
    pairs    = every pair (i < j) of distinct answers of a prompt -> labeller
    output   = one JSON line per answered pair (+ the first `data_pairs` pairs of
               data.preferences, if asked) -> the training pairs (ties and skips left out)

With ``algo=reward_model`` the reward model learns to rank the policy's answers; with
``algo=dpo`` (sampling from the policy being trained) it is online / iterative DPO. A pipeline
passes ``round={round}`` so every round labels fresh prompts, and ``policy`` to sample from
the latest policy while the reward model itself starts from the SFT model.

Resumable: rows are appended in chunks of ``label_batch`` pairs with one fsync'ed write each;
on a re-run the answers are sampled again with the same seed and the pairs already in the
file are not asked again (a person's labelling session continues where it stopped).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from rlfuse import hookimpl
from rlfuse.data import Batch
from rlfuse.plugins._data.pairs import PairItem, load_pairs, pair_batch
from rlfuse.plugins._data.records import DataError, encode_prompts, prompt_text, read_jsonl
from rlfuse.plugins._data.stream import RecordStream, StreamPlugin, shard
from rlfuse.plugins._sampling import SamplingConfig, sample


@dataclass
class Config:
    prompts: int = 256  # prompts labelled (per round)
    k: int = 4  # answers sampled per prompt; every distinct pair of them is compared
    round: int = 1  # which block of `prompts` prompts (a pipeline passes {round})
    policy: str | None = None  # model to sample from; null = the stage's initial model
    max_new_tokens: int = 10
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    sample_batch: int = 256  # sequences per generate call
    label_batch: int = 64  # pairs per compare call (and per fsync'ed write)
    output: str = "pairs.jsonl"  # under the run dir
    data_pairs: int = 0  # also train on the first N pairs of data.preferences (shipped pairs)
    batch_size: int = 32  # pairs per training step
    shuffle: bool = True


class Plugin(StreamPlugin):
    Config = Config

    def __init__(self, cfg: Config, name: str = "policy_pairs") -> None:
        if cfg.k < 2:
            raise ValueError(f"rollout.k must be >= 2 (answers compared per prompt), got {cfg.k}")
        if cfg.prompts < 1 or cfg.round < 1 or cfg.batch_size < 1 or cfg.label_batch < 1:
            raise ValueError("rollout.prompts, rollout.round, rollout.batch_size and rollout.label_batch must be >= 1")
        if cfg.data_pairs < 0:
            raise ValueError(f"rollout.data_pairs must be >= 0, got {cfg.data_pairs}")
        self.cfg = cfg
        self.name = name
        self.items: list[PairItem] = []
        self.stream: RecordStream | None = None
        self.stats: dict[str, float] = {}

    # ------------------------------------------------------------------ labelling
    def pick_prompts(self, ctx: Any) -> list[tuple[int, Any]]:
        """(index in data.prompts, record) of this round's prompts."""
        data = ctx.cfg.data
        if not data.prompts:
            raise ValueError("rollout=policy_pairs needs data.prompts (a JSONL file of prompts)")
        recs = read_jsonl(data.prompts, required=(("prompt",), ("messages",)))
        order = list(range(len(recs)))
        random.Random(ctx.cfg.seed * 100_003 + 11).shuffle(order)
        start = (self.cfg.round - 1) * self.cfg.prompts
        picked = [order[(start + i) % len(order)] for i in range(min(self.cfg.prompts, len(order)))]
        return [(i, recs[i]) for i in picked]

    def sample_answers(self, ctx: Any, picked: list[tuple[int, Any]]) -> tuple[list[str], list[list[str]]]:
        """Prompt texts and ``k`` sampled answers per prompt (seeded: a re-run gets the same)."""
        model = ctx.policy
        tok = ctx.tokenizer
        if self.cfg.policy:
            from rlfuse import models

            model = models.load_pretrained(self.cfg.policy, ctx.cfg.model).to(ctx.device)
        data = ctx.cfg.data
        texts = [prompt_text(r, tok) for _, r in picked]
        ids = encode_prompts(tok, texts, data.max_prompt_length, data.truncation, [r.where for _, r in picked])
        flat = [p for p in ids for _ in range(self.cfg.k)]
        sampling = SamplingConfig(self.cfg.max_new_tokens, self.cfg.temperature, self.cfg.top_p, self.cfg.top_k)
        state = torch.random.get_rng_state()
        torch.manual_seed(ctx.cfg.seed * 1_000_003 + self.cfg.round)
        try:
            answers: list[str] = []
            for s in range(0, len(flat), self.cfg.sample_batch):
                answers += sample(model, tok, flat[s : s + self.cfg.sample_batch], sampling, ctx.device).responses
        finally:
            torch.random.set_rng_state(state)
        k = self.cfg.k
        return texts, [answers[i * k : (i + 1) * k] for i in range(len(picked))]

    def label(self, ctx: Any, out: Path) -> None:
        from rlfuse.plugins.commands.label import stored_prompt

        picked = self.pick_prompts(ctx)
        texts, answers = self.sample_answers(ctx, picked)
        done = _done_keys(out)
        todo = []  # (key, prompt index, text, a, b, row)
        for (idx, rec), text, ans in zip(picked, texts, answers, strict=True):
            for i, j in combinations(range(len(ans)), 2):
                key = f"{self.cfg.round}:{idx}:{i}:{j}"
                if ans[i] != ans[j] and key not in done:
                    todo.append((key, idx, rec, text, ans[i], ans[j]))
        self.stats = {"data/prompts": len(picked), "data/pairs_asked": len(todo), "data/pairs_done_before": len(done)}
        policy = self.cfg.policy or str(ctx.cfg.model.name_or_path or "builtin-tiny")
        fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        answered = 0
        try:
            for s in range(0, len(todo), self.cfg.label_batch):
                chunk = todo[s : s + self.cfg.label_batch]
                labels = ctx.hook.compare(
                    ctx=ctx,
                    prompts=[t[3] for t in chunk],
                    first=[t[4] for t in chunk],
                    second=[t[5] for t in chunk],
                    rows=[t[2].row for t in chunk],
                )
                if labels is None:
                    raise ValueError("rollout=policy_pairs needs a labeller (labeller=simulated or labeller=human)")
                lines = []
                for (key, idx, rec, _, a, b), lab in zip(chunk, labels, strict=False):
                    if lab not in ("A", "B", "tie", "skip"):
                        raise ValueError(f"the labeller returned '{lab}'; expected A, B, tie or skip")
                    chosen, rejected = (a, b) if lab != "B" else (b, a)
                    row = {"prompt": stored_prompt(rec.row), "chosen": chosen, "rejected": rejected, "label": lab,
                           "key": key, "prompt_index": idx, "round": self.cfg.round, "policy": policy}
                    lines.append(json.dumps(row, ensure_ascii=False) + "\n")
                if lines:
                    data = "".join(lines).encode("utf-8")
                    os.write(fd, data)
                    os.fsync(fd)
                answered += len(lines)
                if len(labels) < len(chunk):
                    raise ValueError(
                        f"labelling stopped after {len(done) + answered} answers ({len(todo) - answered} pairs left); "
                        f"they are saved in {out} -- run the same command again to continue"
                    )
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ hooks
    @hookimpl
    def setup(self, ctx: Any) -> None:
        out = ctx.run_dir / self.cfg.output
        out.parent.mkdir(parents=True, exist_ok=True)
        self.label(ctx, out)
        try:
            self.items = load_pairs(ctx, str(out))
        except DataError:
            if not self.cfg.data_pairs:  # every answer tied: nothing to learn from
                raise
            print(f"[rlfuse] rollout=policy_pairs: {out} holds no preference (all ties); training on shipped pairs only")
            self.items = []
        rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines() if x.strip()]
        labels = [r.get("label") for r in rows if r.get("round", self.cfg.round) == self.cfg.round]
        self.stats.update({"data/pairs": len(self.items), "data/ties": sum(lab == "tie" for lab in labels),
                           "data/skips": sum(lab == "skip" for lab in labels)})
        if self.cfg.data_pairs:
            path = ctx.cfg.data.preferences
            if not path:
                raise ValueError("rollout.data_pairs > 0 needs data.preferences (the shipped pairs)")
            extra = load_pairs(ctx, path)[: self.cfg.data_pairs]
            self.items += extra
            self.stats["data/shipped_pairs"] = len(extra)
        print(f"[rlfuse] rollout=policy_pairs: {self.stats}")
        ctx.set_train_records(self.items)  # for plugins that score every pair (the reward model's stats, DPO)
        self.stream = RecordStream(self.items, seed=ctx.cfg.seed, shuffle=self.cfg.shuffle, **shard(ctx))

    @hookimpl
    def rollout(self, ctx: Any, step: int) -> Batch:
        assert self.stream is not None
        return pair_batch(self.stream.take(self.cfg.batch_size), ctx.tokenizer, ctx.cfg.data.max_length, ctx.device)

    @hookimpl
    def teardown(self, summary: dict[str, Any]) -> None:
        summary.update(self.stats)


def _done_keys(out: Path) -> set[str]:
    """Keys of the pairs already answered in ``out`` (a torn last line is dropped)."""
    if not out.exists():
        return set()
    from rlfuse.plugins.commands.label import load_done

    load_done(out)  # repairs a torn last line
    keys = set()
    for line in out.read_text(encoding="utf-8").splitlines():
        if line.strip():
            key = json.loads(line).get("key")
            if key:
                keys.add(key)
    return keys

