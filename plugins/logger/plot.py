"""``logger=plot``: reward curves as an SVG picture, ``<run_dir>/curves.svg``.

Training reward (mean per step, and each named reward) and every evaluation of the true task
reward (``eval/reward``) and of learned scores (``eval/score/*``) are drawn against the step,
so a learned reward that rises while the true reward falls is seen at a glance. The file is
rewritten after every evaluation and at the end; no plotting library is needed.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

from rlfuse import hookimpl

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
W, H, PAD = 720, 360, 48


def _keep(key: str) -> bool:
    return key == "reward/mean" or key == "eval/reward" or key.startswith("eval/score/") or (
        key.startswith("reward/") and key.endswith("/mean")
    )


def render_svg(series: dict[str, list[tuple[float, float]]], title: str) -> str:
    """A line chart of ``{name: [(step, value), ...]}`` as an SVG document."""
    pts = [p for s in series.values() for p in s]
    if not pts:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}"><text x="20" y="30">{title}: no data</text></svg>'
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def sx(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (W - 2 * PAD)

    def sy(y: float) -> float:
        return H - PAD - (y - y0) / (y1 - y0) * (H - 2 * PAD)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{PAD}" y="20" font-size="14">{title}</text>',
           f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="black"/>',
           f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="black"/>']
    for i in range(5):  # y ticks
        v = y0 + (y1 - y0) * i / 4
        out.append(f'<text x="4" y="{sy(v) + 4:.1f}">{v:.3g}</text>')
        out.append(f'<line x1="{PAD}" y1="{sy(v):.1f}" x2="{W - PAD}" y2="{sy(v):.1f}" stroke="#eee"/>')
    out.append(f'<text x="{PAD}" y="{H - PAD + 16}">{x0:g}</text><text x="{W - PAD - 20}" y="{H - PAD + 16}">{x1:g}</text>')
    out.append(f'<text x="{W / 2 - 15:.0f}" y="{H - 8}">step</text>')
    for i, (name, s) in enumerate(sorted(series.items())):
        c = COLOURS[i % len(COLOURS)]
        dash = ' stroke-dasharray="5,3"' if name.startswith("eval/") else ""
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(s))
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2"{dash} points="{path}"/>')
        if name.startswith("eval/"):
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{c}"/>' for x, y in s]
        out.append(f'<text x="{W - PAD - 150}" y="{PAD + 14 * i}" fill="{c}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out)


class Plugin:
    def __init__(self, cfg: Any = None, name: str = "plot") -> None:
        self.series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.path = None
        self.title = ""

    @hookimpl
    def setup(self, ctx: Any) -> None:
        self.path = ctx.run_dir / "curves.svg"
        self.title = f"{ctx.cfg.algo.name}: rewards (solid: training, dashed: evaluation)"

    @hookimpl
    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            if _keep(k):
                self.series[k].append((float(step), float(v)))
        if any(k.startswith("eval/") for k in metrics):
            self._write()

    @hookimpl
    def teardown(self) -> None:
        self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".svg.tmp")
        tmp.write_text(render_svg(self.series, self.title))
        os.replace(tmp, self.path)
