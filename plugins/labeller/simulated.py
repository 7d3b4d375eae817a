"""``labeller=simulated``: a simulated annotator that prefers the answer with the higher true
reward of the task.

For each pair ``(a, b)`` the true reward ``r`` (``function``, default ``data.reward_fn``,
called like a ``reward=rule`` function with the prompt row's columns) gives::

    |r(a) - r(b)| <= tie_margin   ->  "tie"
    r(a) > r(b)                   ->  "A"   (flipped to "B" with probability `noise`)
    r(a) < r(b)                   ->  "B"   (flipped to "A" with probability `noise`)

``noise`` is the annotator error rate: real labellers disagree with each other on 25-35% of
InstructGPT's comparisons, so a reward model must cope with wrong labels. The flips are
drawn from a generator seeded by the run's seed (or ``seed``), so a run is reproducible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from rlfuse import hookimpl
from rlfuse.plugins.reward.rule import load_function


@dataclass
class Config:
    function: str | None = None  # module:function of the true reward; null = data.reward_fn
    noise: float = 0.0  # probability of flipping each (non-tie) preference
    tie_margin: float = 0.0  # |r(a) - r(b)| at or below this is a tie
    seed: int | None = None  # seed of the flips; null = the run's seed


def true_rewards(fn: Any, prompts: list[str], answers: list[str], rows: list[dict[str, Any]]) -> list[float]:
    """The true reward of every answer (``fn`` called like a ``reward=rule`` function)."""
    out = []
    for p, a, row in zip(prompts, answers, rows, strict=True):
        cols = {k: v for k, v in (row or {}).items() if k not in ("prompt", "messages")}
        out.append(float(fn(prompt=p, response=a, **cols)))
    return out


class Plugin:
    Config = Config

    def __init__(self, cfg: Config, name: str = "simulated") -> None:
        if not 0.0 <= cfg.noise <= 1.0:
            raise ValueError(f"labeller.noise must be in [0, 1], got {cfg.noise}")
        if cfg.tie_margin < 0:
            raise ValueError(f"labeller.tie_margin must be >= 0, got {cfg.tie_margin}")
        self.cfg = cfg
        self.name = name
        self.fn: Any = None
        self.rng: random.Random | None = None

    def _ready(self, ctx: Any) -> None:
        if self.fn is None:
            spec = self.cfg.function or ctx.cfg.data.reward_fn
            if not spec:
                raise ValueError("labeller=simulated needs labeller.function or data.reward_fn (the true reward)")
            self.fn = load_function(spec, "labeller.function" if self.cfg.function else "data.reward_fn")
            seed = ctx.cfg.seed if self.cfg.seed is None else self.cfg.seed
            self.rng = random.Random(seed * 7919 + 17)

    @hookimpl
    def compare(
        self, ctx: Any, prompts: list[str], first: list[str], second: list[str], rows: list[dict[str, Any]]
    ) -> list[str]:
        self._ready(ctx)
        assert self.rng is not None
        ra = true_rewards(self.fn, prompts, first, rows)
        rb = true_rewards(self.fn, prompts, second, rows)
        labels = []
        for a, b in zip(ra, rb, strict=True):
            if abs(a - b) <= self.cfg.tie_margin:
                labels.append("tie")
                continue
            better = "A" if a > b else "B"
            if self.cfg.noise and self.rng.random() < self.cfg.noise:
                better = "B" if better == "A" else "A"
            labels.append(better)
        return labels
