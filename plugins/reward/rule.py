"""``reward=rule``: score responses with a Python function named in config.

``function: module:function``. By default it is called once per response as
``fn(prompt=..., response=..., **columns)`` where ``columns`` are the other fields of the
prompt's dataset row (a reference answer, say) and returns a float. With ``batched: true`` it
is called once per batch with lists: ``fn(prompts=[...], responses=[...], **columns)`` ->
list of floats. Accept ``**kwargs`` to ignore columns you do not use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlfuse import hookimpl
from rlfuse.data import Batch
from rlfuse.plugins._rules import call_rule, load_function


@dataclass
class Config:
    function: str = "???"  # module:function
    batched: bool = False


class Plugin:
    Config = Config

    def __init__(self, cfg: Config, name: str = "rule") -> None:
        self.name = name
        self.batched = cfg.batched
        self.fn = load_function(cfg.function, f"reward.{name}.function")

    @hookimpl
    def reward(self, batch: Batch) -> dict[str, torch.Tensor]:
        scores = call_rule(self.fn, batch.prompts, batch.responses, batch.rows, batched=self.batched)
        if len(scores) != len(batch):
            raise ValueError(f"reward function returned {len(scores)} scores for {len(batch)} responses")
        return {self.name: torch.tensor([float(s) for s in scores], dtype=torch.float32)}
