"""``rlfuse plot``: PNG curves of one or more runs, overlaid -- for people who do not use W&B.

    rlfuse plot RUN_DIR [RUN_DIR ...] [--out curves.png]

Each RUN_DIR is a run (its ``metrics.jsonl``), a pipeline (one curve per stage: the rows carry
``stage``) or a sweep directory (``rlfuse -m``: every job below it, labelled by the job's
overrides from ``.hydra/overrides.yaml``). One panel per quantity, drawn when some run has it:
the true reward (``eval/reward``, dots; ``reward/mean``, the training reward), the learned
score (``eval/score/*``, ``reward/model/mean``), each reward component, KL (``kl/*``), the losses (``loss/*``) and the
response length (``response/length_mean``). Default output: ``RUN_DIR/curves.png`` for one run
dir, ``./curves.png`` for several.

This is rlfuse's one plotting path: ``logger=plot`` draws its run's ``curves.png`` with the same
:func:`draw`. It needs matplotlib, an optional extra: ``pip install 'rlfuse[plot]'``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

Rows = list[dict[str, Any]]

# (panel title, predicate on a metric key) -- the order of the panels
PANELS: list[tuple[str, Any]] = [
    ("true reward", lambda k: k in ("eval/reward", "reward/mean")),
    ("learned score", lambda k: k.startswith("eval/score/") or k == "reward/model/mean"),
    ("reward components", lambda k: k.startswith("reward/") and k.endswith("/mean") and k not in ("reward/mean", "reward/model/mean")),
    ("KL", lambda k: k.startswith("kl/") and k != "kl/beta"),
    ("losses", lambda k: k.startswith("loss/")),
    ("response length", lambda k: k == "response/length_mean"),
]
INSTALL = "rlfuse plot needs matplotlib: pip install 'rlfuse[plot]'"


def read_rows(path: Path) -> Rows:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    return rows


def _job_label(job: Path, root: Path) -> str:
    over = job / ".hydra" / "overrides.yaml"
    if over.exists():
        import yaml

        items = [o for o in yaml.safe_load(over.read_text()) or [] if not str(o).startswith(("hydra.", "run_dir="))]
        if items:
            return ",".join(map(str, items))
    return str(job.relative_to(root)) if job != root else root.name


def find_runs(run_dir: Path) -> dict[str, Rows]:
    """Label -> metric rows for a run, pipeline or sweep directory."""
    run_dir = Path(run_dir)
    files = [run_dir / "metrics.jsonl"] if (run_dir / "metrics.jsonl").exists() else sorted(
        p for p in run_dir.rglob("metrics.jsonl") if not (p.parent.parent / "metrics.jsonl").exists())
    if not files:
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir} (nor in its sub-folders): is it a run directory?")
    out: dict[str, Rows] = {}
    for f in files:
        label = _job_label(f.parent, run_dir) if f.parent != run_dir else run_dir.name
        rows = read_rows(f)
        stages = list(dict.fromkeys(r["stage"] for r in rows if "stage" in r))
        if stages:
            for s in stages:
                out[f"{label}:{s}"] = [r for r in rows if r.get("stage") == s]
        else:
            out[label] = rows
    return out


def draw(runs: dict[str, Rows], out: Path, title: str = "") -> Path:
    """Draw ``{label: metric rows}`` (rows hold ``step`` and ``namespace/name`` keys) into a PNG."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError(INSTALL) from None
    panels = []
    for name, wanted in PANELS:
        keys = sorted({k for rows in runs.values() for r in rows for k in r if wanted(k)})
        if keys:
            panels.append((name, keys))
    if not panels:
        raise ValueError("nothing to plot: no reward, score, KL, loss or length metric in the rows")
    fig = Figure(figsize=(6.4 * min(len(panels), 3), 4.2 * ((len(panels) + 2) // 3)), dpi=90)
    FigureCanvasAgg(fig)
    cols = min(len(panels), 3)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    styles = ["-", "--", ":", "-."]
    for p, (name, keys) in enumerate(panels):
        ax = fig.add_subplot((len(panels) + 2) // 3, cols, p + 1)
        for c, (label, rows) in zip(colours, runs.items(), strict=True):
            for i, k in enumerate(keys):
                pts = sorted((r["step"], r[k]) for r in rows if k in r and isinstance(r[k], (int, float)))
                if not pts:
                    continue
                xs, ys = zip(*pts, strict=True)
                marker = "o" if k.startswith("eval/") else None
                text = k if len(runs) == 1 else f"{label} {k}"
                ax.plot(xs, ys, color=c, linestyle=styles[i % len(styles)], marker=marker, markersize=3, label=text)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    tmp.replace(out)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="rlfuse plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="+", type=Path, help="run, pipeline or sweep directories")
    ap.add_argument("--out", type=Path, default=None, help="PNG file (default: RUN_DIR/curves.png, or ./curves.png)")
    args = ap.parse_args(argv)
    runs: dict[str, Rows] = {}
    try:
        for d in args.run_dirs:
            for label, rows in find_runs(d).items():
                runs[label if label not in runs else f"{d}/{label}"] = rows
        out = args.out or (args.run_dirs[0] / "curves.png" if len(args.run_dirs) == 1 else Path("curves.png"))
        draw(runs, out, title=", ".join(d.resolve().name for d in args.run_dirs))
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"rlfuse plot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(runs)} curve set{'s' if len(runs) != 1 else ''})")
    return 0
