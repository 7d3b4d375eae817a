"""``labeller=human``: a person compares the answers in the terminal, with the interface of
``rlfuse label`` (the two answers side by side; ``a`` / ``b`` / ``t`` tie / ``s`` skip /
``q`` quit).

Used wherever a plugin asks for preferences -- e.g. ``rlfuse algo=rlhf labeller=human``: the
reward-model stage shows the policy's own answers and waits for the person. Every answer is
saved by the asking plugin as soon as its chunk is done (``rollout=policy_pairs`` appends one
fsync'ed JSON line per pair); ``q``, end of input or Ctrl-C stops, and re-running the same
command resumes with the pairs not answered yet.

Answers are read line by line from standard input, or from the file ``input`` (scripted use).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from typing import Any, TextIO

from rlfuse import hookimpl
from rlfuse.plugins.commands.label import ask, side_by_side


@dataclass
class Config:
    input: str | None = None  # file of answers, one per line; null = standard input
    width: int | None = None  # display width; null = the terminal's


class Plugin:
    Config = Config

    def __init__(self, cfg: Config, name: str = "human") -> None:
        self.cfg = cfg
        self.name = name
        self.inp: TextIO | None = None
        self.out: TextIO = sys.stdout
        self.asked = 0
        self.stopped = False

    def _stream(self) -> TextIO:
        if self.inp is None:
            self.inp = open(self.cfg.input, encoding="utf-8") if self.cfg.input else sys.stdin  # noqa: SIM115
        return self.inp

    @hookimpl
    def compare(
        self, ctx: Any, prompts: list[str], first: list[str], second: list[str], rows: list[dict[str, Any]]
    ) -> list[str]:
        if self.stopped:
            return []
        width = self.cfg.width or shutil.get_terminal_size((100, 24)).columns
        labels: list[str] = []
        try:
            for p, a, b in zip(prompts, first, second, strict=True):
                self.asked += 1
                self.out.write(f"\n[{self.asked}] prompt:\n{p}\n\n{side_by_side(a, b, width)}\n\n")
                choice = ask(self._stream(), self.out)
                if choice == "quit":
                    self.stopped = True
                    break
                labels.append(choice)
        except KeyboardInterrupt:
            self.stopped = True
        return labels

    @hookimpl
    def teardown(self) -> None:
        if self.inp is not None and self.inp is not sys.stdin:
            self.inp.close()
