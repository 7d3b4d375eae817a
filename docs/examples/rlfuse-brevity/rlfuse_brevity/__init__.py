"""An rlfuse reward plugin in one file: prefer answers of at most `max_chars` characters.

Install it (`pip install -e .`), then select it by name:

    rlfuse 'reward=[rule,brevity]'            (its config file ships in rlfuse_brevity/conf/)
"""

from dataclasses import dataclass

import torch

from rlfuse import Batch, hookimpl


@dataclass
class Config:
    max_chars: int = 8  # answers up to this length score 1, longer ones less
    penalty_per_char: float = 0.1


class Plugin:
    Config = Config  # options are validated against this dataclass

    def __init__(self, cfg: Config, name: str) -> None:
        self.cfg, self.name = cfg, name

    @hookimpl
    def reward(self, batch: Batch) -> dict[str, torch.Tensor]:
        over = torch.tensor([max(0, len(r) - self.cfg.max_chars) for r in batch.responses], dtype=torch.float32)
        return {self.name: 1.0 - self.cfg.penalty_per_char * over}
