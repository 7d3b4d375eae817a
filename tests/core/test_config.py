"""Config composition: every preset composes, typos are errors naming the key, configs ship
inside the package and are found from any working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from support import compose

CONF = Path(str(resources.files("rlfuse.conf")))
PRESETS = sorted(p.stem for p in (CONF / "algo").glob("*.yaml"))
GROUPS = ["rollout", "reward", "advantage", "loss", "sync", "model", "data", "logger", "eval", "kernels"]


def claimed_components(preset: str) -> dict[str, str | list[str]]:
    """``{group: option or [options]}`` from the preset file's ``override /group: ...`` lines."""
    claimed = {}
    for entry in OmegaConf.to_container(OmegaConf.load(CONF / "algo" / f"{preset}.yaml")).get("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key.startswith("override /"):
                    claimed[key.removeprefix("override /")] = value
    return claimed


def test_presets_exist():
    assert {"ppo", "sft"} <= set(PRESETS)
    assert all(claimed_components(p) for p in PRESETS)  # every preset picks its components


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_to_the_components_it_claims(preset):
    cfg = compose([f"algo={preset}"])
    assert cfg.algo.name == preset
    for group, want in claimed_components(preset).items():
        node = cfg[group] or {}
        if isinstance(want, list):  # a list group: one section per option, its plugin = the option
            assert list(node) == want, f"algo={preset}: {group} is {list(node)}, the preset claims {want}"
            for option in want:
                assert node[option].plugin == option, f"algo={preset}: {group}.{option}.plugin"
        elif "plugin" in (OmegaConf.load(CONF / group / f"{want}.yaml") or {}):
            assert node.plugin == want, f"algo={preset}: {group}.plugin is {node.get('plugin')}, the preset claims {want}"
        else:  # an empty selection (advantage=none)
            assert "plugin" not in node, f"algo={preset}: {group}={want} must select no plugin"
    for name, stage in (cfg.algo.stages or {}).items():  # a pipeline's stages are presets too
        assert stage.algo in PRESETS, f"algo={preset}: stage '{name}' runs unknown preset '{stage.algo}'"
    if not cfg.algo.stages:
        assert cfg.rollout.plugin and cfg.loss, preset


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        value = f"[{option}]" if group in ("reward", "loss", "logger", "eval") else option
        compose([f"{group}={value}", "model.name_or_path=/x"])


def test_typo_in_trainer_key_is_an_error_naming_it():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["trainer.max_stpes=3"])
    assert "max_stpes" in str(e.value) or "max_stpes" in str(e.value.__cause__)


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        compose(["trainer.max_steps=many"])
    text = str(e.value) + str(e.value.__cause__)
    assert "max_steps" in text


def test_unknown_top_level_key_rejected(tmp_path):
    from support import run_job

    with pytest.raises(ValueError, match="trainr"):
        run_job(["+trainr.max_steps=3"], tmp_path / "run")


def test_swap_component_with_one_override():
    cfg = compose(["algo=ppo", "advantage=none", "reward=[rule]"])
    assert "plugin" not in (cfg.advantage or {})
    assert list(cfg.reward) == ["rule"]


def test_plugin_option_typo_is_an_error_naming_the_key(tmp_path):
    from rlfuse.manager import PluginError
    from support import FAST, run_job

    with pytest.raises(PluginError, match=r"rollout\.temprature"):
        run_job(FAST + ["+rollout.temprature=0.5"], tmp_path / "run")


def test_configs_found_from_another_directory(tmp_path):
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run(
        [sys.executable, "-m", "rlfuse", "--cfg", "job", "algo=sft"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "name: sft" in out.stdout and "sft_data" in out.stdout


def test_package_data_is_shipped():
    from rlfuse.plugins._data.records import resolve_path

    cfg = compose([])
    for key in ("prompts", "eval_prompts", "sft", "preferences", "eval_preferences"):
        assert resolve_path(cfg.data[key]).exists(), key
