"""``reward=rule``: score responses with a Python function named in config.

``function: module:function``. By default it is called once per response as
``fn(prompt=..., response=..., **columns)`` where ``columns`` are the other fields of the
prompt's dataset row (a reference answer, say) and returns a float. With ``batched: true`` it
is called once per batch with lists: ``fn(prompts=[...], responses=[...], **columns)`` ->
list of floats. Accept ``**kwargs`` to ignore columns you do not use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

from rlfuse import hookimpl
from rlfuse.data import Batch


def load_function(spec: str, where: str) -> Any:
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{where}: expected 'module:function', got '{spec}'")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"{where}: cannot import module '{module}': {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{where}: module '{module}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{where}: '{spec}' is not callable")
    return obj


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
        rows = batch.rows or [{} for _ in batch.responses]
        columns = {k: v for k, v in rows[0].items() if k not in ("prompt", "messages")} if rows else {}
        if self.batched:
            cols = {k: [r.get(k) for r in rows] for k in columns}
            scores = list(self.fn(prompts=batch.prompts, responses=batch.responses, **cols))
        else:
            scores = [
                self.fn(prompt=p, response=r, **{k: v for k, v in row.items() if k not in ("prompt", "messages")})
                for p, r, row in zip(batch.prompts, batch.responses, rows, strict=True)
            ]
        if len(scores) != len(batch):
            raise ValueError(f"reward function returned {len(scores)} scores for {len(batch)} responses")
        return {self.name: torch.tensor([float(s) for s in scores], dtype=torch.float32)}
