"""logger=wandb, offline: what the run file holds, resume, sweeps, failures, no prompt without a key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlfuse import hookimpl
from rlfuse.manager import PluginError, PluginManager
from rlfuse.plugins.logger.wandb import Config, Plugin, read_offline_run, resolve_mode
from rlfuse.runinfo import RunInfo
from support import FAST, compose, run_job

ROOT = Path(__file__).resolve().parents[3]
WANDB = ["logger=[jsonl,wandb]", "logger.wandb.samples_every=1", "logger.wandb.samples_rows=4"]


def run_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def read_run(path: Path) -> dict:
    """The run file once W&B's service has written its exit record (it writes asynchronously)."""
    for _ in range(50):
        run = read_offline_run(path)
        if run["exit_code"] is not None:
            return run
        time.sleep(0.2)
    return run


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A 2-step run with a checkpoint after each step, then resumed for a third step."""
    run_dir = tmp_path_factory.mktemp("wandb") / "run"
    first = run_job(FAST + WANDB + ["trainer.save_every=1"], run_dir)
    files = run_files(run_dir)
    run_job(FAST + WANDB + ["trainer.save_every=1", "trainer.max_steps=3", "trainer.resume=true"], run_dir)
    return run_dir, first, files, run_files(run_dir)


@pytest.mark.slow
def test_offline_run_holds_config_history_and_samples(resumed):
    run_dir, summary, files, _ = resumed
    assert len(files) == 1
    run = read_run(files[0])
    assert run["exit_code"] == 0
    assert run["id"] == (run_dir / "wandb_run_id").read_text().strip()
    # the resolved config, the choices (also as tags) and the installed plugin versions
    assert run["config"]["trainer"]["max_steps"] == 2 and run["config"]["algo"]["name"] == "ppo"
    assert run["config"]["choices"]["advantage"] == "gae"
    assert {"algo:ppo", "advantage:gae", "reward:rule,kl_penalty"} <= set(run["tags"])
    assert "rlfuse" in run["config"]["plugins_installed"]
    # the metric history: one row per training step against `step`, evaluations at 0 and 2
    train = [h for h in run["history"] if "reward/mean" in h]
    assert [h["step"] for h in train] == [1, 2]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first_train = next(m for m in metrics if "reward/mean" in m)
    assert train[0]["reward/mean"] == pytest.approx(first_train["reward/mean"])
    assert [h["step"] for h in run["history"] if "eval/reward" in h] == [0, 2]
    # the samples table, each step, in W&B and as a file
    tables = [h for h in run["history"] if "samples/nrows" in h]
    assert [t["samples/nrows"] for t in tables] == [4, 4]
    table = json.loads((files[0].parent / "files" / tables[0]["samples/path"]).read_text())
    assert table["columns"][:3] == ["step", "prompt", "response"] and len(table["data"]) == 4
    rows = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 3  # 4 rows at steps 1 and 2, then step 3 after the resume
    assert set(rows[0]) == {"step", "prompt", "response", "reward/rule", "reward/kl_penalty", "reward", "advantage", "length"}
    assert all(r["length"] >= 1 and isinstance(r["response"], str) for r in rows)
    # the summary at the end
    assert run["summary"]["eval/reward_after"] == pytest.approx(summary["eval/reward_after"])


@pytest.mark.slow
def test_resume_continues_the_same_run(resumed):
    run_dir, _, files, after = resumed
    assert len(after) == 2
    again = read_run(next(f for f in after if f not in files))
    assert again["id"] == read_run(files[0])["id"]
    assert [h["step"] for h in again["history"] if "reward/mean" in h] == [3]


def _ctx(tmp_path, info=None):
    cfg = compose(FAST + ["logger=[wandb]"])
    return SimpleNamespace(cfg=cfg, run_dir=tmp_path, run_info=info or RunInfo(), batch=None)


def test_an_exception_in_a_hook_finishes_the_run_as_failed(tmp_path):
    class Broken:
        @hookimpl
        def rollout(self):
            raise RuntimeError("boom")

    pm = PluginManager()
    plugin = Plugin(Config(mode="offline"))
    pm.register_plugin(plugin, "logger.wandb")
    pm.register_plugin(Broken(), "rollout")
    ctx = _ctx(tmp_path, RunInfo(("seed=1",), "2026-01-01/10-00-00", "multirun/2026-01-01/10-00-00", 1))
    plugin.setup(ctx)
    with pytest.raises(PluginError, match="boom"):
        pm.hook.rollout(ctx=ctx, step=0)
    run = read_run(run_files(tmp_path)[0])
    assert run["exit_code"] == 1
    assert run["group"] == "2026-01-01/10-00-00" and run["name"] == "seed=1" and "seed=1" in run["tags"]


@pytest.mark.slow
def test_auto_mode_without_key_goes_offline_without_prompting(tmp_path):
    """No API key, no netrc, stdin closed: one line on how to sync, and the run is written."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "none"), PYTHONPATH=str(ROOT / "tests"))
    script = (
        "from types import SimpleNamespace\n"
        "from support import FAST, compose\n"
        "from rlfuse.plugins.logger.wandb import Config, Plugin\n"
        "from rlfuse.runinfo import RunInfo\n"
        f"ctx = SimpleNamespace(cfg=compose(FAST), run_dir=__import__('pathlib').Path({str(tmp_path)!r}), run_info=RunInfo(), batch=None)\n"
        "p = Plugin(Config(mode='auto', network_timeout=1.0))\n"
        "p.setup(ctx); p.log(ctx, 1, {'reward/mean': 0.5, 'step': 1}); p.teardown({'steps': 1})\n"
        # a second run that never reaches teardown (an error in the loop itself): the atexit guard
        f"ctx.run_dir = __import__('pathlib').Path({str(tmp_path / 'crash')!r}); ctx.run_dir.mkdir()\n"
        "Plugin(Config(mode='offline')).setup(ctx)\n"
        "raise SystemExit(3)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 3, out.stderr[-3000:]
    hint = [line for line in out.stderr.splitlines() if line.startswith("[rlfuse] W&B offline")]
    assert len(hint) == 2  # one line per run: the auto one, then the forced-offline one
    assert "no W&B API key" in hint[0] and f"wandb sync {tmp_path}" in hint[0]
    run = read_run(run_files(tmp_path)[0])
    assert run["exit_code"] == 0 and run["history"][0]["reward/mean"] == 0.5
    assert read_run(run_files(tmp_path / "crash")[0])["exit_code"] == 1


def test_mode_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto", 0.1)[0] == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_mode("auto", 0.1) == ("offline", "no W&B API key (WANDB_API_KEY or ~/.netrc)")
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password abc\n")
    assert resolve_mode("auto", 0.1)[0] in ("online", "offline")  # a key: online iff reachable
    assert resolve_mode("offline", 0.1)[0] == "offline"
    with pytest.raises(ValueError, match="logger.wandb.mode"):
        Plugin(Config(mode="cloud"))


@pytest.mark.slow
def test_multirun_makes_one_run_per_job_in_one_group(tmp_path, monkeypatch):
    from hydra.core.global_hydra import GlobalHydra

    from rlfuse import cli

    sweep = tmp_path / "sweep"
    argv = ["rlfuse", "-m", "seed=0,1", *FAST, "logger=[jsonl,wandb]", f"hydra.sweep.dir={sweep}",
            "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        cli.main()
    finally:
        GlobalHydra.instance().clear()
    from rlfuse import runinfo

    assert runinfo.current() == runinfo.RunInfo()  # the jobs' run info does not outlive them
    runs = [read_run(f) for job in ("0", "1") for f in run_files(sweep / job)]
    assert len(runs) == 2 and runs[0]["id"] != runs[1]["id"]
    assert {r["group"] for r in runs} == {"sweep"}
    assert sorted(r["name"].split(",")[0] for r in runs) == ["seed=0", "seed=1"]
    assert all(r["exit_code"] == 0 for r in runs)
