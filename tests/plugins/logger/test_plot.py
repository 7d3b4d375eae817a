"""logger=plot and `rlfuse plot` draw PNG curves (one renderer: rlfuse.plugins.commands.plot.draw)."""

from __future__ import annotations

import json

import pytest

from rlfuse.plugins.commands import plot
from support import FAST, run_job

pytest.importorskip("matplotlib")
PNG = b"\x89PNG\r\n\x1a\n"


def rows(scale: float) -> list[dict]:
    return [{"step": s, "reward/mean": scale * s, "loss/total": 1 / s, "response/length_mean": 5.0} for s in range(1, 5)]


def test_draw_writes_a_png_with_the_panels_that_have_data(tmp_path):
    out = plot.draw({"a": rows(1.0), "b": rows(2.0)}, tmp_path / "c.png")
    data = out.read_bytes()
    assert data.startswith(PNG) and len(data) > 5000
    with pytest.raises(ValueError, match="nothing to plot"):
        plot.draw({"a": [{"step": 1, "perf/step_time": 1.0}]}, tmp_path / "d.png")


def test_find_runs_reads_runs_pipelines_and_sweeps(tmp_path):
    for job, scale in (("0", 1.0), ("1", 2.0)):
        d = tmp_path / "sweep" / job
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        (d / "metrics.jsonl").write_text("\n".join(json.dumps({**r, "stage": st}) for st in ("sft", "ppo") for r in rows(scale)))
        (d / "sft").mkdir()
        (d / "sft" / "metrics.jsonl").write_text(json.dumps(rows(scale)[0]))  # a stage's own file: not counted twice
    runs = plot.find_runs(tmp_path / "sweep")
    assert sorted(runs) == ["seed=0:ppo", "seed=0:sft", "seed=1:ppo", "seed=1:sft"]
    assert len(runs["seed=1:ppo"]) == 4
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot.find_runs(tmp_path / "sweep" / "0" / ".hydra")


def test_run_writes_curves_and_rlfuse_plot_overlays_runs(tmp_path, capsys):
    run_job(FAST, tmp_path / "run")
    assert (tmp_path / "run" / "curves.png").read_bytes().startswith(PNG)
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows(0.1)))
    assert plot.main([str(tmp_path / "run"), str(tmp_path / "run2"), "--out", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").read_bytes().startswith(PNG)
    assert "2 curve sets" in capsys.readouterr().out
    assert plot.main([str(tmp_path / "missing")]) == 2
