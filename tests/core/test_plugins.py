"""Plugin loading: built-ins through entry points, third-party plugins, and the errors."""

from __future__ import annotations

import json
import sys
import textwrap
from importlib.metadata import entry_points

import pytest

from rlfuse import hookspecs
from rlfuse.manager import PluginError, PluginManager, available_plugins, instantiate, resolve
from support import FAST, run_job

HOOKS = sorted(n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, "rlfuse_spec"))


def _builtins() -> set[str]:
    """Every plugin the shipped config files select (``plugin:`` at the top or in a section)."""
    from importlib import resources

    from omegaconf import OmegaConf

    conf = resources.files("rlfuse.conf")
    names = set()
    for group in ("rollout", "reward", "advantage", "loss", "sync", "logger", "eval"):
        for f in conf.joinpath(group).iterdir():
            if f.name.endswith(".yaml"):
                node = OmegaConf.to_container(OmegaConf.create(f.read_text())) or {}
                names |= {node["plugin"]} if "plugin" in node else {v["plugin"] for v in node.values() if isinstance(v, dict)}
    return names


BUILTINS = _builtins()


def test_builtins_are_entry_points():
    assert {"generate", "sft_data", "rule", "kl_penalty", "gae", "ppo", "sft", "none", "jsonl", "console", "task"} <= BUILTINS
    eps = {ep.name: ep.value for ep in entry_points(group="rlfuse")}
    assert BUILTINS <= set(eps)
    for name in BUILTINS:
        assert eps[name].startswith("rlfuse.plugins.")
        resolve(name)  # every built-in imports


def test_hookspecs_are_the_five_plus_lifecycle():
    pm = PluginManager()
    names = {n for n in dir(pm.hook) if not n.startswith("_")}
    assert {"rollout", "reward", "advantage", "loss", "sync"} <= names
    assert {"setup", "evaluate", "log", "save_state", "load_state", "teardown"} <= names
    # first-result hooks vs collected hooks, as documented
    assert pm.hook.rollout.spec.opts["firstresult"] and pm.hook.advantage.spec.opts["firstresult"]
    assert not pm.hook.reward.spec.opts["firstresult"] and not pm.hook.loss.spec.opts["firstresult"]


def test_every_hook_is_documented():
    assert {"setup", "evaluate", "log", "save_state", "load_state", "teardown", "rollout", "reward", "advantage", "loss", "sync"} <= set(HOOKS)
    for name in HOOKS:
        doc = getattr(hookspecs, name).__doc__
        assert doc and ":param ctx:" in doc and ":returns:" in doc, name


def test_unknown_plugin_lists_available():
    with pytest.raises(PluginError) as e:
        resolve("no_such_plugin")
    msg = str(e.value)
    assert "no_such_plugin" in msg and "generate" in msg and "ppo" in msg


def test_unknown_dotted_path_is_named():
    with pytest.raises(PluginError, match="not_a_module"):
        resolve("not_a_module.sub")


def test_import_error_inside_plugin_is_reported(tmp_path, monkeypatch):
    (tmp_path / "broken_plugin.py").write_text("import does_not_exist_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="Error importing plugin 'broken_plugin:x'.*does_not_exist_xyz"):
        resolve("broken_plugin:x")


def test_misspelled_hook_fails_at_registration(tmp_path, monkeypatch):
    (tmp_path / "typo_plugin.py").write_text(
        textwrap.dedent(
            """
            from rlfuse import hookimpl

            @hookimpl
            def rewrad(batch):
                return None
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = PluginManager()
    with pytest.raises(PluginError, match="rewrad"):
        pm.register_plugin(resolve("typo_plugin:"), "reward.typo")


def test_plugin_exception_names_plugin_and_hook(tmp_path, monkeypatch):
    (tmp_path / "boom_plugin.py").write_text(
        textwrap.dedent(
            """
            from rlfuse import hookimpl

            @hookimpl
            def reward(batch):
                raise ZeroDivisionError("kaboom")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = PluginManager()
    pm.register_plugin(resolve("boom_plugin:"), "reward.boom")
    with pytest.raises(PluginError) as e:
        pm.hook.reward(ctx=None, batch=None)
    assert "reward.boom" in str(e.value) and "'reward'" in str(e.value) and "kaboom" in str(e.value)
    assert isinstance(e.value.__cause__, ZeroDivisionError)  # original traceback kept


def test_plugin_config_is_validated():
    from rlfuse.plugins.rollout import generate

    with pytest.raises(PluginError, match=r"rollout\.tempreature"):
        instantiate(generate, {"tempreature": 0.5}, name="generate", where="rollout")
    with pytest.raises(PluginError, match=r"rollout\.batch_size"):
        instantiate(generate, {"batch_size": "many"}, name="generate", where="rollout")


THIRD_PARTY = '''
from dataclasses import dataclass
import torch
from rlfuse import hookimpl

@dataclass
class Config:
    value: float = 1.0

class Plugin:
    Config = Config

    def __init__(self, cfg, name):
        self.cfg, self.name = cfg, name

    @hookimpl
    def reward(self, batch):
        return {self.name: torch.full((len(batch),), self.cfg.value)}
'''


def test_third_party_plugin_by_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "my_bonus.py").write_text(THIRD_PARTY)
    monkeypatch.syspath_prepend(str(tmp_path))
    run_job(FAST + ["+reward.bonus.plugin=my_bonus", "+reward.bonus.value=0.25", "+reward.bonus.weight=2.0"], tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "reward/bonus/mean" in r]
    assert len(train_rows) == 2
    assert train_rows[0]["reward/bonus/mean"] == pytest.approx(0.25)
    # the core weights it: total reward = rule + kl + 2 * 0.25
    r = train_rows[0]
    assert r["reward/mean"] == pytest.approx(r["reward/rule/mean"] + r["reward/kl_penalty/mean"] + 0.5, abs=1e-5)


def test_third_party_plugin_installed_as_entry_point(tmp_path, monkeypatch):
    """A package that declares `[project.entry-points.rlfuse] mine = ...` is found by name."""
    pkg = tmp_path / "site"
    (pkg / "acme_rl").mkdir(parents=True)
    (pkg / "acme_rl" / "__init__.py").write_text("")
    (pkg / "acme_rl" / "bonus.py").write_text(THIRD_PARTY)
    dist = pkg / "acme_rl-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-rl\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rlfuse]\nacme_bonus = acme_rl.bonus\n")
    monkeypatch.syspath_prepend(str(pkg))
    assert "acme_bonus" in available_plugins()
    run_job(FAST + ["+reward.acme.plugin=acme_bonus", "+reward.acme.value=0.5"], tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("reward/acme/mean") == pytest.approx(0.5) for r in rows)


def test_unknown_plugin_in_config_fails_fast(tmp_path):
    with pytest.raises(PluginError, match="Unknown plugin 'nope'.*Installed plugins"):
        run_job(FAST + ["advantage.plugin=nope"], tmp_path / "run")


def test_core_never_imports_plugins():
    import pathlib
    import re

    core = pathlib.Path(sys.modules["rlfuse"].__file__).parent
    pattern = re.compile(r"^\s*(from|import)\s+rlfuse\.plugins|import_module\(\s*[\"']rlfuse\.plugins", re.M)
    for f in core.glob("*.py"):
        assert not pattern.search(f.read_text()), f"core/{f.name} imports rlfuse.plugins"
