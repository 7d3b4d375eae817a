"""The house stays true: every list below is derived from the code, so a new hook, plugin,
config option or preset without its module, docs page, test or a clean one-step run fails here.

* every hook in ``rlfuse.hookspecs`` is documented in docs/hooks.md and called by some test;
* for every ``conf/<group>/<option>.yaml``: its ``plugin:`` (if any) is the option name, the
  entry point of that name is ``rlfuse.plugins.<group>.<option>`` at
  ``plugins/<group>/<option>.py``, and ``docs/plugins/<group>/<option>.md`` and
  ``tests/plugins/<group>/test_<option>.py`` exist; every entry point has its config file;
  and nothing in plugins/, docs/plugins/ or tests/plugins/ is left without its option;
* every preset in ``conf/algo/`` runs one tiny step end to end (a pipeline: every stage), and
  every key its run logs is in a namespace of ``rlfuse.metrics.NAMESPACES``;
* docs/architecture.md names every core module and every plugins/ sub-package.
"""

from __future__ import annotations

import json
import re
from importlib.metadata import distribution
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rlfuse import hookspecs, metrics
from rlfuse.config import MULTI_GROUPS, SINGLE_GROUPS
from rlfuse.pipeline import expand_rounds
from support import compose, run_job

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
HOOKS = sorted(n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, "rlfuse_spec"))
GROUPS = [g for g in SINGLE_GROUPS + MULTI_GROUPS if (CONF / g).is_dir()]  # component groups with options
OPTIONS = sorted((g, p.stem) for g in GROUPS for p in (CONF / g).glob("*.yaml"))
ENTRY_POINTS = {ep.name: ep.value for ep in distribution("rlfuse").entry_points if ep.group == "rlfuse"}
PRESETS = sorted(p.stem for p in (CONF / "algo").glob("*.yaml"))


def test_the_lists_are_not_empty():
    assert {"rollout", "reward", "advantage", "loss", "sync"} <= set(GROUPS)
    assert {"rollout", "reward", "advantage", "loss", "sync", "setup", "teardown"} <= set(HOOKS)
    assert len(OPTIONS) >= len(ENTRY_POINTS) > 0 and PRESETS


# ------------------------------------------------------------------ hooks


def test_every_hook_is_documented_and_called_by_a_test():
    doc = (ROOT / "docs" / "hooks.md").read_text()
    headings = [line for line in doc.splitlines() if line.startswith("## ")]
    sources = "\n".join(
        p.read_text() for p in (ROOT / "tests").rglob("*.py") if "benchmarks" not in p.parts and p.name != "test_house.py"
    )
    for hook in HOOKS:
        assert any(f"`{hook}(" in h for h in headings), f"docs/hooks.md has no section for hook '{hook}'"
        # a call like `plugin.reward(batch=...)` or `ctx.hook.setup(ctx=ctx)`, not `math.log(...)`
        assert re.search(rf"(?<!math)(?<!torch)(?<!np)\.{hook}\(", sources), f"no test calls hook '{hook}'"


# ------------------------------------------------------------------ conf <-> plugins <-> docs <-> tests


def plugin_of(group: str, option: str) -> str | None:
    """The ``plugin:`` an option file selects: top level (rollout, advantage, sync) or under
    the option's own key (reward, loss, logger, eval); None for an empty selection. The file
    builds on the plugin's ``Config`` defaults (``/plugin_defaults/<plugin>`` in its defaults
    list), so a default is written once, in the dataclass."""
    node = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml")) or {}
    defaults = node.pop("defaults", [])
    if "plugin" in node:
        plugin = node["plugin"]
    else:
        sections = [v for v in node.values() if isinstance(v, dict) and "plugin" in v]
        assert len(sections) <= 1, f"conf/{group}/{option}.yaml selects several plugins"
        if sections:
            assert list(node) == [option], f"conf/{group}/{option}.yaml: its section must be named '{option}'"
        plugin = sections[0]["plugin"] if sections else None
    if plugin is not None:
        wanted = f"/plugin_defaults/{plugin}"
        assert any(isinstance(d, str) and d.split("@")[0] == wanted for d in defaults), (
            f"conf/{group}/{option}.yaml must build on {wanted} (its defaults list is {defaults})"
        )
    return plugin


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_has_its_module_page_and_test(group, option):
    plugin = plugin_of(group, option)
    if plugin is not None:
        assert plugin == option, f"conf/{group}/{option}.yaml selects plugin '{plugin}'; it must be '{option}'"
        assert (ROOT / "plugins" / group / f"{option}.py").exists(), f"no module plugins/{group}/{option}.py"
        assert ENTRY_POINTS.get(option) == f"rlfuse.plugins.{group}.{option}", (
            f"pyproject: entry point '{option}' must be rlfuse.plugins.{group}.{option}, is {ENTRY_POINTS.get(option)}"
        )
    assert (ROOT / "docs" / "plugins" / group / f"{option}.md").exists(), f"no docs page docs/plugins/{group}/{option}.md"
    assert (ROOT / "tests" / "plugins" / group / f"test_{option}.py").exists(), f"no test tests/plugins/{group}/test_{option}.py"


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_every_entry_point_has_its_config_file(name):
    value = ENTRY_POINTS[name]
    parts = value.split(".")
    assert len(parts) == 4 and parts[:2] == ["rlfuse", "plugins"] and parts[3] == name, (
        f"entry point '{name}' = '{value}': expected rlfuse.plugins.<group>.{name}"
    )
    assert (CONF / parts[2] / f"{name}.yaml").exists(), f"entry point '{name}' has no conf/{parts[2]}/{name}.yaml"


def test_nothing_is_left_without_its_option():
    options = set(OPTIONS)
    modules = {(p.parent.name, p.stem) for g in GROUPS for p in (ROOT / "plugins" / g).glob("*.py")
               if not p.stem.startswith("_")}  # fmt: skip
    pages = {(p.parent.name, p.stem) for g in GROUPS for p in (ROOT / "docs" / "plugins" / g).glob("*.md")}
    tests = {(p.parent.name, p.stem.removeprefix("test_")) for g in GROUPS for p in (ROOT / "tests" / "plugins" / g).glob("test_*.py")}
    for kind, found in (("module", modules), ("docs page", pages), ("test", tests)):
        stray = sorted(f"{g}/{o}" for g, o in found - options)
        assert not stray, f"{kind}(s) without a conf/<group>/<option>.yaml: {stray}"


# ------------------------------------------------------------------ every preset, one tiny step

# Applied where the preset's composed config has the key (a pipeline passes them on to the
# stages that have it).
TINY = [
    "trainer.max_steps=1", "trainer.epochs=1", "trainer.eval_every=0", "trainer.progress=false",
    "algo.warmup=null", "rollout.batch_size=4", "rollout.n=2", "rollout.max_new_tokens=6",
    "eval.task.num_prompts=4", "eval.task.max_new_tokens=6", "loss.dpo.eval_pairs=4", "loss.bradley_terry.eval_pairs=4",
    "loss.bradley_terry.stats_pairs=8",
    # few rows: the 200-row held-out files stand in for the 3000-4000-row training files
    "data.preferences=pkg://rlfuse.plugins/tasks/data/preferences_eval.jsonl",
    "data.prompts=pkg://rlfuse.plugins/tasks/data/prompts_eval.jsonl",
]  # fmt: skip
_RUNS: dict[str, tuple[dict, list[dict]]] = {}


def tiny_overrides(preset: str) -> list[str]:
    cfg = compose([f"algo={preset}"])
    out = [f"algo={preset}"]
    for o in TINY:
        if OmegaConf.select(cfg, o.split("=", 1)[0], default="<absent>") != "<absent>":
            out.append(o)
    return out


def run_preset(preset: str, tmp_path_factory) -> tuple[dict, list[dict]]:
    """(summary, metrics.jsonl rows) of one tiny run of ``preset``, run once per session."""
    if preset not in _RUNS:
        torch.set_num_threads(2)
        run_dir = tmp_path_factory.mktemp(f"preset_{preset}")
        summary = run_job(tiny_overrides(preset), run_dir)
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        _RUNS[preset] = (summary, rows)
    return _RUNS[preset]


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_one_tiny_step(preset, tmp_path_factory):
    summary, rows = run_preset(preset, tmp_path_factory)
    cfg = compose([f"algo={preset}"])
    # the stages in the order they run, rounds expanded (online_dpo: dpo, dpo_r2)
    stages = [run[0] for run in expand_rounds(cfg)] if cfg.algo.stages else []
    steps = [r for r in rows if "loss/total" in r]
    assert steps, f"algo={preset}: no training step in metrics.jsonl"
    assert all(r["step"] == 1 and r["optim/updates"] >= 1 for r in steps), steps
    if stages:  # a pipeline: one step per stage, every stage's summary
        assert [r["stage"] for r in steps] == stages
        assert set(summary["stages"]) == set(stages) and all(summary["stages"][s]["steps"] == 1 for s in stages)
    else:
        assert summary["steps"] == 1 and len(steps) == 1
        assert torch.isfinite(torch.tensor(steps[0]["loss/total"]))


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_logged_key_is_in_a_documented_namespace(preset, tmp_path_factory):
    _, rows = run_preset(preset, tmp_path_factory)
    keys = {k for r in rows for k in r}
    unknown = metrics.unknown_keys(keys)
    assert not unknown, (
        f"algo={preset} logs keys outside rlfuse.metrics.NAMESPACES {sorted(metrics.NAMESPACES)}: {unknown}"
    )


# ------------------------------------------------------------------ docs that name the rooms


def test_architecture_names_every_room():
    text = (ROOT / "docs" / "architecture.md").read_text()
    core = sorted(p.name for p in (ROOT / "core").glob("*.py") if not p.name.startswith("__"))
    subpackages = sorted(p.parent.name for p in (ROOT / "plugins").glob("*/__init__.py"))
    helpers = sorted(p.name for p in (ROOT / "plugins").glob("_*.py") if not p.name.startswith("__"))
    missing = [f"core/{m}" for m in core if f"`{m}`" not in text and f"core/{m}" not in text]
    missing += [f"plugins/{s}/" for s in subpackages if f"plugins/{s}/" not in text]
    missing += [f"plugins/{h}" for h in helpers if h not in text]
    assert not missing, f"docs/architecture.md does not name {missing}"


def test_metrics_md_lists_every_namespace():
    text = (ROOT / "docs" / "metrics.md").read_text()
    missing = [ns for ns in metrics.NAMESPACES if f"`{ns}/`" not in text]
    assert not missing, f"docs/metrics.md does not list the namespace(s) {missing}"
