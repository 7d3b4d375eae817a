"""``eval=task``: evaluate the policy on held-out prompts with the task's true reward.

Greedy (or sampled) responses to ``data.eval_prompts`` are scored by ``data.reward_fn``
(``module:function``, called like a ``reward=rule`` function). Reports ``eval/reward`` (mean
true reward) and ``eval/exact`` (fraction scoring 1.0). When the data has no ``eval_prompts`` or no
``reward_fn`` (your own preference or SFT data, say) it skips itself with a one-line notice, so
the default ``eval: [task]`` never blocks a run on data that has no task. Reward components named in
``scorers`` (e.g. ``[model]`` for a learned reward model) also score the same responses, as
``eval/score/<name>``: the learned score sits beside the true reward, so a policy that games
the reward model shows up as a rising score with a flat or falling true reward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rlfuse import hookimpl
from rlfuse.errors import require
from rlfuse.plugins._data.records import encode_prompts, prompt_text, read_jsonl
from rlfuse.plugins._rules import call_rule, load_function
from rlfuse.plugins._sampling import ENGINES, SamplingConfig, sample


@dataclass
class Config:
    num_prompts: int = 200  # first N eval prompts
    batch_size: int = 200
    max_new_tokens: int = 16
    greedy: bool = True
    temperature: float = 1.0
    scorers: list[str] = field(default_factory=list)  # reward components that also score
    samples: int = 3  # example responses recorded in eval_samples.jsonl
    engine: str = "auto"  # auto | rlfuse | hf: as rollout=generate's engine

    def __post_init__(self) -> None:
        require(self.num_prompts >= 1, "num_prompts", ">= 1", self.num_prompts)
        require(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        require(self.max_new_tokens >= 1, "max_new_tokens", ">= 1", self.max_new_tokens)
        require(self.temperature > 0, "temperature", "> 0", self.temperature)
        require(self.samples >= 0, "samples", ">= 0", self.samples)
        require(self.engine in ENGINES, "engine", "auto, rlfuse or hf", self.engine)


class Plugin:
    Config = Config

    def __init__(self, cfg: Config, name: str = "task") -> None:
        self.cfg = cfg
        self.name = name
        self.items: list[Any] | None = None  # None: skipped (no eval prompts or reward function)
        self.started = False  # eval_samples.jsonl: started anew by a fresh run

    @hookimpl
    def load_state(self, ctx: Any) -> None:
        from rlfuse.metrics import truncate_jsonl

        truncate_jsonl(ctx.run_dir / "eval_samples.jsonl", ctx.step)  # a resume logs later steps again
        self.started = True

    @hookimpl
    def setup(self, ctx: Any) -> None:
        data = ctx.cfg.data
        missing = [k for k in ("eval_prompts", "reward_fn") if not getattr(data, k, None)]
        if missing:
            import sys

            print(
                f"[rlfuse] eval.{self.name} skipped: data.{' and data.'.join(missing)} not set "
                "(set them to evaluate on a task, or eval=[] to silence this)",
                file=sys.stderr,
            )
            return
        recs = read_jsonl(data.eval_prompts, required=(("prompt",), ("messages",)))[: self.cfg.num_prompts]
        texts = [prompt_text(r, ctx.tokenizer) for r in recs]
        ids = encode_prompts(ctx.tokenizer, texts, data.max_prompt_length, data.truncation, [r.where for r in recs])
        self.items = [(i, r.row) for i, r in zip(ids, recs, strict=True)]
        self.fn = load_function(data.reward_fn, "data.reward_fn")
        self.sampling = SamplingConfig(
            max_new_tokens=self.cfg.max_new_tokens, greedy=self.cfg.greedy, temperature=self.cfg.temperature,
            engine=self.cfg.engine,
        )

    @hookimpl
    def evaluate(self, ctx: Any, step: int) -> dict[str, float]:
        if self.items is None:
            return {}
        true, scores = [], {n: [] for n in self.cfg.scorers}
        examples = []
        for s in range(0, len(self.items), self.cfg.batch_size):
            chunk = self.items[s : s + self.cfg.batch_size]
            batch = sample(ctx.policy, ctx.tokenizer, [p for p, _ in chunk], self.sampling, ctx.device)
            batch.rows = [row for _, row in chunk]
            chunk_true = call_rule(self.fn, batch.prompts, batch.responses, batch.rows)
            true += chunk_true
            for p, r, t in zip(batch.prompts, batch.responses, chunk_true, strict=True):
                if len(examples) < self.cfg.samples:
                    examples.append({"prompt": p, "response": r, "reward": t})
            for n in self.cfg.scorers:
                try:
                    scored = ctx.score(batch, [n])
                except LookupError as e:
                    raise ValueError(f"eval.{self.name}.scorers names '{n}', which is not a configured reward ({e})") from None
                scores[n].append(torch.cat([v.cpu() for v in scored.values()]))
        out = {
            "eval/reward": sum(true) / len(true),
            "eval/exact": sum(t == 1.0 for t in true) / len(true),
        }
        for n, parts in scores.items():
            out[f"eval/score/{n}"] = float(torch.cat(parts).mean())
        with (ctx.run_dir / "eval_samples.jsonl").open("a" if self.started else "w", encoding="utf-8") as f:
            self.started = True
            import json

            for e in examples:
                f.write(json.dumps({"step": step, **e}) + "\n")
        return out
