"""`rlfuse sweep check` accepts the shipped W&B sweep file and rejects broken ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlfuse.plugins.commands import sweep

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = ROOT / "docs" / "sweeps" / "advantage.yaml"


def test_the_shipped_sweep_file_composes_at_every_corner(capsys):
    spec = yaml.safe_load(SHIPPED.read_text())
    n = 1
    for p in spec["parameters"].values():
        n *= len(p["values"])
    assert sweep.main(["check", str(SHIPPED)]) == 0
    assert f"{n}/{n} corners" in capsys.readouterr().out


def write(tmp_path, parameters, command=("rlfuse", "algo=ppo", "${args_no_hyphens}")):
    path = tmp_path / "sweep.yaml"
    spec = {"method": "grid", "parameters": parameters}
    if command is not None:
        spec["command"] = list(command)
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_group_swap_whose_option_lacks_a_swept_key_fails(tmp_path, capsys):
    path = write(tmp_path, {"advantage": {"values": ["gae", "grpo"]}, "advantage.lam": {"min": 0.9, "max": 0.99}})
    n, failures = sweep.check(path)
    assert n == 4
    assert sorted(f[0] for f in failures) == ["advantage=grpo advantage.lam=0.9", "advantage=grpo advantage.lam=0.99"]
    assert all("advantage.lam" in f[1] for f in failures)
    assert sweep.main(["check", str(path)]) == 1
    assert "FAILED advantage=grpo" in capsys.readouterr().out


def test_a_plugin_option_of_the_wrong_type_fails(tmp_path):
    path = write(tmp_path, {"loss.ppo.clip_low": {"values": [0.2, "wide"]}})
    _, failures = sweep.check(path)
    assert [f[0] for f in failures] == ["loss.ppo.clip_low=wide"]


@pytest.mark.parametrize(
    "parameters, command, message",
    [
        ({"+trainer.max_steps": {"values": [1, 2]}}, ("rlfuse", "${args_no_hyphens}"), "cannot pass '\\+key'"),
        ({"seed": {"values": [0, 1]}}, None, "args_no_hyphens"),
        ({"seed": {"values": [0, 1]}}, ("rlfuse", "${args}"), "args_no_hyphens"),
        ({"seed": {"distribution": "normal"}}, ("rlfuse", "${args_no_hyphens}"), "no values"),
    ],
)
def test_files_rlfuse_cannot_run_are_rejected(tmp_path, parameters, command, message):
    path = write(tmp_path, parameters, command)
    with pytest.raises(sweep.SweepFileError, match=message):
        sweep.check(path)
    assert sweep.main(["check", str(path)]) == 2
