"""Pipeline rounds: repeated stage blocks, {round} / {stage_dir:...} placeholders, init_from
fallbacks, NAME@last in the summary -- without training anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlfuse.pipeline import _fill, _latest, _run_name, expand_rounds


def _cfg(rounds):
    return OmegaConf.create({"algo": {"rounds": rounds, "stages": {
        "sft": {"algo": "sft"},
        "rm": {"algo": "reward_model", "repeat": True},
        "ppo": {"algo": "ppo", "repeat": True},
        "report": {"algo": "sft"},
    }}})


def test_repeated_block_runs_each_round_in_order():
    runs = expand_rounds(_cfg(3))
    assert [(r[0], r[1], r[2]) for r in runs] == [
        ("sft", "sft", 1), ("rm", "rm", 1), ("ppo", "ppo", 1), ("rm_r2", "rm", 2), ("ppo_r2", "ppo", 2),
        ("rm_r3", "rm", 3), ("ppo_r3", "ppo", 3), ("report", "report", 1)]
    assert [r[0] for r in expand_rounds(_cfg(1))] == ["sft", "rm", "ppo", "report"]
    with pytest.raises(ValueError, match="algo.rounds"):
        expand_rounds(_cfg(0))


def test_placeholders_and_fallbacks_name_the_latest_earlier_run():
    runs = expand_rounds(_cfg(2))
    before_rm2 = runs[:3]  # sft, rm, ppo
    d = Path("/r")
    assert _fill("x={stage_dir:ppo,sft}/final", d, 2, before_rm2, "w") == "x=/r/ppo/final"
    assert _fill("x={stage_dir:ppo,sft}/final", d, 1, runs[:1], "w") == "x=/r/sft/final"
    assert _fill("r={round} {run_dir}", d, 2, before_rm2, "w") == "r=2 /r"
    assert _latest(["ppo", "sft"], runs[:4], "w") == "ppo"
    with pytest.raises(ValueError, match="none of"):
        _latest("ppo", runs[:1], "algo.stages.rm.init_from")
    assert _run_name("ppo", runs) == "ppo" and _run_name("ppo@last", runs) == "ppo_r2"
    assert _run_name("sft@last", runs) == "sft"
