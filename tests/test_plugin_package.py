"""A plugin package ships plugins *and* config files: installed, it is selected by `group=option`,
listed by `rlfuse plugins`, checked by `rlfuse sweep check`; clashes and the autoload switches."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from rlfuse import searchpath
from rlfuse.manager import PluginError, available_plugins, resolve
from rlfuse.plugins.commands import plugins as plugins_cmd
from rlfuse.plugins.commands import sweep
from support import compose, run_job

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "rlfuse-brevity"


def fake_dist(site: Path, name: str, entry_points: str, files: dict[str, str]) -> None:
    """A minimal installed distribution: a dist-info folder and the files of its packages."""
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)


@pytest.mark.slow
def test_installed_package_is_selected_by_group_equals_option(with_example, tmp_path):
    cfg = compose(["algo=grpo", "reward=[rule,brevity]", "advantage=median_baseline"])
    assert cfg.advantage.plugin == "median_baseline" and cfg.reward.brevity.weight == 0.1
    run = ["algo=grpo", "algo.warmup=null", "trainer.max_steps=2", "trainer.progress=false", "rollout.batch_size=4",
           "rollout.n=4", "trainer.mini_batch_size=8", "eval.task.num_prompts=4",
           "reward=[rule,brevity]", "advantage=median_baseline", "logger=[jsonl]"]
    run_job(run, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward/brevity/mean" in r]
    assert len(train) == 2 and all("advantage/abs_mean" in r for r in train)


def test_median_baseline_is_robust_to_one_outlier(with_example):
    import torch
    from rlfuse_brevity.median_baseline import Config, Plugin

    from rlfuse import Batch

    ones = torch.ones(5, 3)
    batch = Batch(input_ids=ones.long(), attention_mask=ones.long(), response_mask=ones,
                  group_ids=torch.tensor([0, 0, 0, 0, 1]), rewards=torch.tensor([0.0, 0.0, 0.0, 10.0, 3.0]))
    adv = Plugin(Config(scale=1.0), "median_baseline").advantage(batch).advantages
    assert adv[:, 0].tolist() == [0.0, 0.0, 0.0, 10.0, 0.0]  # GRPO's mean baseline gives -2.5 to the zeros
    assert (adv == adv[:, :1]).all()


def test_rlfuse_plugins_lists_builtins_and_the_example(with_example, capsys):
    data = plugins_cmd.collect()
    by = {p["name"]: p for p in data["plugins"]}
    assert by["gae"]["distribution"] == "rlfuse" and {"advantage", "loss", "setup"} <= set(by["gae"]["hooks"])
    assert by["gae"]["config"] == ["advantage/gae"]
    assert by["median_baseline"]["distribution"] == "rlfuse-brevity" and by["median_baseline"]["hooks"] == ["advantage"]
    assert by["median_baseline"]["config"] == ["advantage/median_baseline (rlfuse-brevity)"]
    assert by["brevity"]["location"].startswith(str(with_example))
    assert {"plot", "plugins", "sweep", "label"} <= {c["name"] for c in data["commands"]}
    assert plugins_cmd.main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["configs"][0]["distribution"] == "rlfuse-brevity"


def test_the_tutorial_sweep_file_composes(with_example):
    n, failures = sweep.check(EXAMPLE / "sweep.yaml")
    assert (n, failures) == (6, [])


def test_import_error_is_listed_not_fatal(tmp_path, monkeypatch):
    fake_dist(tmp_path, "rlfuse-broken", "[rlfuse]\nbroken = rlfuse_broken_mod\n",
              {"rlfuse_broken_mod.py": "import not_a_module_anywhere\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    by = {p["name"]: p for p in plugins_cmd.collect()["plugins"]}
    assert "not_a_module_anywhere" in by["broken"]["error"] and by["gae"]["error"] is None
    assert "ERROR importing rlfuse_broken_mod" in plugins_cmd.render(plugins_cmd.collect())


def test_duplicate_option_warns_naming_both_and_builtins_win(tmp_path, monkeypatch):
    fake_dist(tmp_path, "rlfuse-dup", "[rlfuse.configs]\ndup = rlfuse_dup_conf\n", {
        "rlfuse_dup_conf/__init__.py": "",
        "rlfuse_dup_conf/reward/rule.yaml": "rule:\n  plugin: rule\n  weight: 7.0\n",
        "rlfuse_dup_conf/reward/other.yaml": "other:\n  plugin: length\n",
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(searchpath, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = compose(["algo=ppo", "reward=[rule,other]"])
    msgs = [str(w.message) for w in caught if "reward/rule" in str(w.message)]
    assert len(msgs) == 1 and "rlfuse (pkg://rlfuse.conf)" in msgs[0] and "rlfuse-dup (pkg://rlfuse_dup_conf)" in msgs[0]
    assert cfg.reward.rule.weight == 1.0 and cfg.reward.other.plugin == "length"  # the built-in won
    monkeypatch.setenv("RLFUSE_CONFIGS_FIRST", "rlfuse-dup")
    with pytest.warns(UserWarning, match="offered by rlfuse-dup .* and rlfuse"):
        assert compose(["algo=ppo", "reward=[rule]"]).reward.rule.weight == 7.0  # the user's choice


def test_autoload_switches(with_example, monkeypatch):
    assert "brevity" in available_plugins()
    monkeypatch.setenv("RLFUSE_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "brevity" not in available_plugins() and "gae" in available_plugins()
    assert [s.name for s in searchpath.sources()] == ["builtin"]
    with pytest.raises(PluginError, match="Unknown plugin 'median_baseline'"):
        resolve("median_baseline")
    assert resolve("rlfuse_brevity.median_baseline").__name__ == "rlfuse_brevity.median_baseline"  # dotted path
    monkeypatch.setenv("RLFUSE_PLUGINS", "rlfuse-brevity")
    assert {"brevity", "median_baseline", "gae"} <= set(available_plugins())
    by = {p["name"]: p for p in plugins_cmd.collect()["plugins"]}
    assert by["brevity"]["enabled"]
    monkeypatch.setenv("RLFUSE_PLUGINS", "someone-else")
    assert not {p["name"]: p for p in plugins_cmd.collect()["plugins"]}["brevity"]["enabled"]
