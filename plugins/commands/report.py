"""``rlfuse report RUN_DIR...``: before/after figures of several runs (seeds), mean ± std.

Each argument is a run dir (holding ``summary.json``) or a sweep dir (``rlfuse -m ...``:
every ``*/summary.json`` below it). For every run it reads the seed (``config.yaml``) and the
before -> after pairs of its summary:

* the true task reward: ``eval/reward_sft -> eval/reward_rlhf`` (pipelines such as
  ``algo=rlhf``) or ``eval/reward_before -> eval/reward_after``;
* every other ``eval/<name>_before -> eval/<name>_after`` pair (the learned score
  ``eval/score/model``, DPO's implicit-reward accuracy ``eval/pref/accuracy``, ...).

It prints one Markdown table per figure -- per seed: before, after, gain -- and the mean ±
std (sample std, n-1) over the runs, with the machine and the date, so the figures can be
pasted into docs as they are. ``--json FILE`` also writes them as JSON.

    rlfuse -m seed=0,1,2,3,4 hydra.sweep.dir=sweeps/rlhf
    rlfuse report sweeps/rlhf
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

# (name, before key, after key): the true reward under the names pipelines give it
TRUE_REWARD = [("eval/reward", "eval/reward_sft", "eval/reward_rlhf"),
               ("eval/reward", "eval/reward_before", "eval/reward_after")]


def find_runs(paths: list[str]) -> list[Path]:
    """Run dirs: each path that holds summary.json, or every */summary.json under a sweep dir."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if (p / "summary.json").exists():
            runs.append(p)
        elif p.is_dir():
            found = sorted({s.parent for s in p.glob("*/summary.json")}, key=lambda d: (len(d.name), d.name))
            if not found:
                raise SystemExit(f"rlfuse report: {p}: no summary.json in it or in its sub-folders")
            runs += found
        else:
            raise SystemExit(f"rlfuse report: {p}: no such run dir")
    return runs


def read_seed(run: Path) -> int | None:
    """The run's seed from its config.yaml (a warm-up pipeline saves only its stages' shape
    there: then from the first stage's config.yaml)."""
    import yaml

    for cfg in [run / "config.yaml", *sorted(run.glob("*/config.yaml"))]:
        if cfg.exists():
            seed = (yaml.safe_load(cfg.read_text()) or {}).get("seed")
            if seed is not None:
                return seed
    return None


def figures(summary: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """``{figure: (before, after)}`` of one summary."""
    out: dict[str, tuple[float, float]] = {}
    for name, b, a in TRUE_REWARD:
        if name not in out and _num(summary.get(b)) and _num(summary.get(a)):
            out[name] = (float(summary[b]), float(summary[a]))
    for key, v in summary.items():
        if key.startswith("eval/") and key.endswith("_before") and _num(v):
            name = key[: -len("_before")]
            after = summary.get(name + "_after")
            if name not in out and _num(after):
                out[name] = (float(v), float(after))
    return out


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def collect(paths: list[str]) -> dict[str, Any]:
    """Everything the report prints, as data (the test compares it with the summaries)."""
    runs = []
    for run in find_runs(paths):
        summary = json.loads((run / "summary.json").read_text())
        runs.append({"run": str(run), "seed": read_seed(run), "algo": summary.get("algo"),
                     "figures": figures(summary)})
    names: list[str] = []
    for r in runs:
        names += [n for n in r["figures"] if n not in names]
    table: dict[str, Any] = {}
    for name in names:
        rows = [r for r in runs if name in r["figures"]]
        before = [r["figures"][name][0] for r in rows]
        after = [r["figures"][name][1] for r in rows]
        gain = [a - b for a, b in zip(after, before, strict=True)]
        table[name] = {
            "runs": [{"seed": r["seed"], "run": r["run"], "before": r["figures"][name][0],
                      "after": r["figures"][name][1]} for r in rows],
            "before": mean_std(before), "after": mean_std(after), "gain": mean_std(gain),
            "raised": sum(g > 0 for g in gain), "n": len(rows),
        }
    return {"runs": runs, "figures": table, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def machine() -> str:
    return f"{os.cpu_count()} CPU cores ({platform.machine()}, {platform.system()})"


def render(rep: dict[str, Any], only: list[str] | None = None) -> str:
    algos = sorted({str(r["algo"]) for r in rep["runs"]})
    lines = [f"{len(rep['runs'])} runs of {', '.join(algos)}; machine: {rep['machine']}; date: {rep['date']}", ""]
    for name, f in rep["figures"].items():
        if only and name not in only:
            continue
        lines += [f"### {name}", "", "| seed | before | after | gain |", "|---|---|---|---|"]
        for r in f["runs"]:
            lines.append(f"| {r['seed']} | {r['before']:.3f} | {r['after']:.3f} | {r['after'] - r['before']:+.3f} |")
        (bm, bs), (am, as_), (gm, gs) = f["before"], f["after"], f["gain"]
        lines.append(f"| mean ± std | {bm:.3f} ± {bs:.3f} | {am:.3f} ± {as_:.3f} | {gm:+.3f} ± {gs:.3f} |")
        lines += [f"\nraised on {f['raised']} of {f['n']} runs", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rlfuse report", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run dirs, or sweep dirs holding one run dir per job")
    ap.add_argument("--only", nargs="*", default=None, help="figures to print (default: all), e.g. eval/reward")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    rep = collect(args.runs)
    print(render(rep, args.only))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
