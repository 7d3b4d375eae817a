"""logger=plot draws the reward curves as a well-formed SVG."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from rlfuse.plugins.logger.plot import render_svg
from support import FAST, run_job

NS = "{http://www.w3.org/2000/svg}"


def test_render_svg_one_line_per_series():
    svg = render_svg({"reward/mean": [(1, 0.1), (2, 0.3), (3, 0.2)], "eval/reward": [(0, 0.5), (3, 0.7)]}, "t")
    root = ET.fromstring(svg)
    lines = root.findall(f"{NS}polyline")
    assert len(lines) == 2
    pts = [p.split(",") for p in lines[1].get("points").split()]  # sorted: eval/reward, reward/mean
    assert len(pts) == 3
    ys = [float(y) for _, y in pts]
    assert ys[1] < ys[0] and ys[1] < ys[2]  # 0.3 is the highest value: smallest y on screen
    assert {t.text for t in root.findall(f"{NS}text")} >= {"reward/mean", "eval/reward"}


def test_render_svg_without_data():
    assert "no data" in render_svg({}, "t")


def test_run_writes_curves(tmp_path):
    run_job(FAST, tmp_path / "run")
    root = ET.fromstring((tmp_path / "run" / "curves.svg").read_text())
    names = {t.text for t in root.findall(f"{NS}text")}
    assert {"reward/mean", "eval/reward", "reward/rule/mean"} <= names
