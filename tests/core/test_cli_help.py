"""`rlfuse --help` is rlfuse's own; Hydra's help stays reachable; run info and the sweep objective."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from rlfuse import help as rhelp
from rlfuse import runinfo
from rlfuse.report import objective


def test_help_lists_commands_groups_options_and_overrides():
    text = rhelp.render()
    assert "cli is powered by Hydra" not in text
    for cmd in ("plugins", "label", "plot", "sweep"):
        assert f"\n  {cmd} " in text
    groups = {line.split()[0]: line.split()[1:] for line in text.split("config groups")[1].split("common overrides")[0].splitlines()[1:] if line.strip()}
    assert "gae*" in groups["advantage"] and "grpo" in groups["advantage"]
    assert "wandb" in groups["logger"] and "rlhf*" in groups["algo"]
    assert "-m seed=0,1,2" in text and "--hydra-help" in text


def test_help_and_hydra_help_from_the_command_line():
    out = subprocess.run([sys.executable, "-m", "rlfuse", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: rlfuse")
    argv = ["rlfuse", "--hydra-help"]
    rhelp.handle_help(argv)
    assert argv == ["rlfuse", "--help"]  # handed to Hydra as its own --help
    argv = ["rlfuse", "plot", "--help"]
    rhelp.handle_help(argv)  # a sub-command's help is its own: untouched, no exit
    assert argv == ["rlfuse", "plot", "--help"]


def test_run_info_from_a_multirun_job():
    hc = SimpleNamespace(overrides=SimpleNamespace(task=["seed=1", "algo.lr=0.001"]), mode="RunMode.MULTIRUN",
                         sweep=SimpleNamespace(dir="multirun/2026-12-02/10-00-00"), job={"num": 1})
    info = runinfo.from_hydra(hc)
    assert (info.sweep, info.job_num, info.name) == ("2026-12-02/10-00-00", 1, "seed=1,algo.lr=0.001")
    single = runinfo.from_hydra(SimpleNamespace(overrides=SimpleNamespace(task=["seed=1"]), mode="RunMode.RUN"))
    assert single.sweep is None and single.name == "seed=1"


def test_objective_for_optimising_sweepers():
    summary = {"eval/reward_after": 0.75, "algo": "ppo"}
    assert objective(summary, None) is summary
    assert objective(summary, "eval/reward_after") == 0.75
    with pytest.raises(ValueError, match="objective=eval/nope: .*eval/reward_after"):
        objective(summary, "eval/nope")
