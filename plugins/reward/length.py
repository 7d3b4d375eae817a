"""``reward=length``: a response-length reward, to combine with a task reward
(``reward=[rule,length]`` with a ``weight`` per component).

With ``L`` the response length (characters or tokens) and ``L*`` the wanted length -- a fixed
``target`` or the length of a dataset column of the prompt's row (``column: target``)::

    mode: abs    r = -|L - L*| / L*            (any deviation costs; 0 at the wanted length)
    mode: over   r = -max(0, L - L*) / L*      (only answers longer than L* are penalised)

Scores are per sequence, (B,); the core multiplies them by the component's ``weight`` and logs
``reward/length/mean`` beside ``reward/rule/mean``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlfuse import hookimpl
from rlfuse.data import Batch
from rlfuse.errors import one_of


@dataclass
class Config:
    target: int | None = None  # wanted length (ignored when column is set)
    column: str | None = None  # dataset column whose length is the wanted length, per row
    unit: str = "chars"  # chars (of the decoded response) | tokens (masked response tokens)
    mode: str = "abs"  # abs | over

    def __post_init__(self) -> None:
        one_of("unit", self.unit, ("chars", "tokens"))
        one_of("mode", self.mode, ("abs", "over"))


class Plugin:
    Config = Config

    def __init__(self, cfg: Config, name: str = "length") -> None:
        where = f"reward.{name}"
        if cfg.column is None and (cfg.target is None or cfg.target < 1):
            raise ValueError(f"{where}: set `target` (an int >= 1) or `column` (a dataset column)")
        self.cfg = cfg
        self.name = name

    def wanted(self, batch: Batch) -> list[float]:
        if self.cfg.column is None:
            return [float(self.cfg.target)] * len(batch)
        rows = batch.rows or []
        if len(rows) != len(batch):
            raise ValueError(f"reward.{self.name}.column needs the dataset rows of the batch")
        out = []
        for i, row in enumerate(rows):
            if self.cfg.column not in row:
                raise ValueError(
                    f"reward.{self.name}.column: row {i} of the batch has no column "
                    f"'{self.cfg.column}' (columns: {sorted(row)})"
                )
            out.append(float(max(len(str(row[self.cfg.column])), 1)))
        return out

    @hookimpl
    def reward(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.cfg.unit == "tokens":
            length = batch.response_mask.sum(-1).float().cpu()
        else:
            length = torch.tensor([float(len(r)) for r in batch.responses])
        want = torch.tensor(self.wanted(batch))
        diff = length - want
        if self.cfg.mode == "over":
            diff = diff.clamp_min(0)
        return {self.name: -(diff.abs() / want).float()}
