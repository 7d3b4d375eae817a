"""``eval=rm_agreement``: does the reward model still rank the *current* policy's answers the
way the labeller does? An over-optimisation guard.

At every evaluation the policy samples ``k`` answers to each of ``prompts`` held-out prompts
(``data.eval_prompts``); the labeller (the ``compare`` hook) compares every pair of distinct
answers and the reward component ``scorer`` (``reward.model`` by default) scores them::

    eval/rm_agreement = mean over labelled pairs of  1[sign(s_a - s_b) == labeller]  (tie 1/2)

A reward model is accurate on the answers it was trained on; as PPO moves the policy, its
answers leave that distribution and the agreement falls -- the learned score then rises
while the true reward does not (Gao et al. 2022). With ``stop_below`` or ``stop_drop`` the
plugin asks the trainer to stop (``ctx.request_stop``) when the agreement falls below a floor
or that far below its value before training; the run then ends with the last policy, its
final evaluation and ``summary["stopped"]``.

With the simulated labeller the labels come from the true reward, so the guard reads the true
reward indirectly -- as a person's spot checks would: keep ``prompts`` small for people.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any

import torch

from rlfuse import hookimpl
from rlfuse.plugins._data.records import encode_prompts, prompt_text, read_jsonl
from rlfuse.plugins._sampling import SamplingConfig, sample


@dataclass
class Config:
    scorer: str = "model"  # the reward component whose ranking is checked
    prompts: int = 64  # held-out prompts sampled at every evaluation
    k: int = 4  # answers per prompt; every distinct pair is compared
    temperature: float = 1.0
    max_new_tokens: int = 10
    stop_below: float | None = None  # stop when the agreement is below this
    stop_drop: float | None = None  # stop when it fell this much below its first value


def score_with(ctx: Any, component: str, batch: Any) -> torch.Tensor:
    """(B,) scores of ``batch`` by the reward component named ``component`` alone."""
    plugin = ctx.pm.get_plugin(f"reward.{component}")
    if plugin is None:
        raise ValueError(f"eval.rm_agreement.scorer names '{component}', which is not a configured reward")
    others = [p for p in ctx.pm.get_plugins() if p is not plugin]
    caller = ctx.pm.subset_hook_caller("reward", remove_plugins=others)
    results = [r for r in caller(ctx=ctx, batch=batch) if r]
    return torch.cat([v.float().reshape(len(batch), -1).sum(-1).cpu() for r in results for v in r.values()])


def agreement(scores_a: torch.Tensor, scores_b: torch.Tensor, labels: list[str]) -> tuple[float, int]:
    """Fraction of labelled (A/B) pairs the scores rank like the labels (equal scores: 1/2)."""
    hits, n = 0.0, 0
    for a, b, lab in zip(scores_a.tolist(), scores_b.tolist(), labels, strict=False):
        if lab not in ("A", "B"):
            continue
        n += 1
        if a == b:
            hits += 0.5
        elif (a > b) == (lab == "A"):
            hits += 1.0
    return (hits / n if n else float("nan")), n


class Plugin:
    Config = Config

    def __init__(self, cfg: Config, name: str = "rm_agreement") -> None:
        if cfg.k < 2 or cfg.prompts < 1:
            raise ValueError(f"eval.{name}: k must be >= 2 and prompts >= 1")
        self.cfg = cfg
        self.name = name
        self.first: float | None = None

    @hookimpl
    def setup(self, ctx: Any) -> None:
        data = ctx.cfg.data
        if not data.eval_prompts:
            raise ValueError(f"eval={self.name} needs data.eval_prompts")
        recs = read_jsonl(data.eval_prompts, required=(("prompt",), ("messages",)))[: self.cfg.prompts]
        texts = [prompt_text(r, ctx.tokenizer) for r in recs]
        ids = encode_prompts(ctx.tokenizer, texts, data.max_prompt_length, data.truncation, [r.where for r in recs])
        self.items = list(zip(ids, [r.row for r in recs], strict=True))

    @hookimpl
    def evaluate(self, ctx: Any, step: int) -> dict[str, float]:
        k = self.cfg.k
        sampling = SamplingConfig(max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature)
        state = torch.random.get_rng_state()
        torch.manual_seed(ctx.cfg.seed * 1_000_003 + 7 + step)
        try:
            batch = sample(ctx.policy, ctx.tokenizer, [p for p, _ in self.items for _ in range(k)], sampling, ctx.device)
        finally:
            torch.random.set_rng_state(state)
        batch.rows = [row for _, row in self.items for _ in range(k)]
        scores = score_with(ctx, self.cfg.scorer, batch)
        ia, ib = [], []
        for g in range(len(self.items)):
            for i, j in combinations(range(g * k, (g + 1) * k), 2):
                if batch.responses[i] != batch.responses[j]:
                    ia.append(i)
                    ib.append(j)
        labels = ctx.hook.compare(
            ctx=ctx, prompts=[batch.prompts[i] for i in ia], first=[batch.responses[i] for i in ia],
            second=[batch.responses[j] for j in ib], rows=[batch.rows[i] for i in ia],
        ) or []
        acc, n = agreement(scores[ia], scores[ib], labels)
        out = {"eval/rm_agreement": acc, "eval/rm_agreement_pairs": float(n)}
        if self.first is None:
            self.first = acc
        elif step > 0 and n:
            if self.cfg.stop_below is not None and acc < self.cfg.stop_below:
                ctx.request_stop(f"the reward model's agreement with the labeller {acc:.3f} < stop_below {self.cfg.stop_below}")
            elif self.cfg.stop_drop is not None and acc < self.first - self.cfg.stop_drop:
                ctx.request_stop(f"the reward model's agreement with the labeller {acc:.3f} fell more than {self.cfg.stop_drop} below {self.first:.3f}")
        return out
