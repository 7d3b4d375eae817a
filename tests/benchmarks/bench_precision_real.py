"""Does a precision mode train? DPO at lr 1e-6 on a real model, fraction of weights that moved.

    python tests/benchmarks/bench_precision_real.py --model DIR [--steps 3] [--modes fp32,bf16-mixed,bf16-plain,bf16-true]

``DIR`` is a save_pretrained folder (tests/benchmarks/get_smollm2.py makes SmolLM2-135M). Each
mode runs ``rlfuse algo=dpo`` on a few chat pairs from the same start and reports the fraction
of weights whose value changed and the size of the update relative to fp32's. ``bf16-plain`` is
what ``model.dtype=bfloat16`` used to do -- bf16 weights under plain ``torch.optim.AdamW`` --
reproduced by running ``bf16-true`` with its optimiser swapped for plain AdamW (rlfuse refuses
that combination from the config).

A second table (``--memory``) runs DPO with and without LoRA, each in its own process, and
reports the peak RSS (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

QUESTIONS = [("What colour is the sky?", "Blue", "Green"), ("What is 2+2?", "Four", "Five"),
             ("Capital of France?", "Paris", "Rome"), ("Opposite of hot?", "Cold", "Warm")]  # fmt: skip
SYSTEM = {"role": "system", "content": "Answer with one word."}


def write_pairs(folder: Path) -> str:
    p = folder / "prefs.jsonl"
    rows = [{"prompt": [SYSTEM, {"role": "user", "content": q}], "chosen": c, "rejected": r} for q, c, r in QUESTIONS]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def run(model: str, prefs: str, out: Path, steps: int, extra: list[str], plain_bf16: bool = False) -> dict:
    import torch
    from hydra import compose, initialize_config_module

    import rlfuse.precision
    from rlfuse.trainer import train

    if plain_bf16:
        rlfuse.precision.StochasticRoundingAdamW = torch.optim.AdamW  # the old, silently broken path
    overrides = ["algo=dpo", "model=hf", f"model.name_or_path={model}", "data=jsonl", f"data.preferences={prefs}",
                 "rollout.batch_size=2", f"trainer.max_steps={steps}", "trainer.warmup_steps=0",
                 "trainer.schedule=constant", "trainer.progress=false", "trainer.threads=2", "logger=[]", *extra]  # fmt: skip
    with initialize_config_module("rlfuse.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return train(cfg, out)


def moved(model: str, final: Path, dtype_of_start: str | None) -> tuple[float, float, dict]:
    import torch
    from safetensors.torch import load_file

    start = load_file(f"{model}/model.safetensors")
    end = load_file(str(final / "model.safetensors"))
    n = changed = 0
    deltas = {}
    for k, v in end.items():
        s = start[k].to(getattr(torch, dtype_of_start)) if dtype_of_start else start[k]
        d = v.float() - s.float()
        n += d.numel()
        changed += int((d != 0).sum())
        deltas[k] = d
    return changed / n, sum(float(d.norm() ** 2) for d in deltas.values()) ** 0.5, deltas


def precision_table(a) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="rlfuse-prec-"))
    prefs = write_pairs(tmp)
    modes = a.modes.split(",")
    rows, ref = [], None
    for mode in modes:
        out = tmp / mode
        if mode == "bf16-plain":
            cmd = ["trainer.precision=bf16-true"]
        else:
            cmd = [f"trainer.precision={mode}"]
        # each mode in a fresh process (the bf16-plain patch must not leak)
        here, over = str(Path(__file__).parent), cmd + ["algo.lr=1e-6"]
        code = (
            f"import sys, json; sys.path.insert(0, {here!r}); import bench_precision_real as b; "
            f"s = b.run({a.model!r}, {prefs!r}, b.Path({str(out)!r}), {a.steps:d}, {over!r}, "
            f"plain_bf16={mode == 'bf16-plain'!r}); print(json.dumps(s['last']['loss/total']))"
        )
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if res.returncode:
            print(res.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"{mode} failed")
        frac, norm, deltas = moved(a.model, out / "final", "bfloat16" if mode in ("bf16-plain", "bf16-true") else None)
        if mode == "fp32":
            ref = deltas
        cos = None
        if ref is not None and mode != "fp32":
            num = sum(float((deltas[k] * ref[k]).sum()) for k in ref)
            den = (sum(float(ref[k].norm() ** 2) for k in ref) * sum(float(deltas[k].norm() ** 2) for k in ref)) ** 0.5
            cos = num / den if den else 0.0
        rows.append((mode, frac, norm, cos, float(res.stdout.strip().splitlines()[-1])))
    print("| mode | weights changed | update norm | cosine to fp32's update | last loss |")
    print("|---|---|---|---|---|")
    for mode, frac, norm, cos, loss in rows:
        print(f"| {mode} | {100 * frac:.1f}% | {norm:.3g} | {'-' if cos is None else f'{cos:.3f}'} | {loss:.4f} |")


def memory_table(a) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="rlfuse-mem-"))
    prefs = write_pairs(tmp)
    print("| run | peak RSS MiB |")
    print("|---|---|")
    for name, extra in [("full fine-tuning", []), ("LoRA r=16 (all linear)", ["model.lora.r=16"])]:
        here, out = str(Path(__file__).parent), str(tmp / name.split()[0])
        code = (
            f"import sys, resource; sys.path.insert(0, {here!r}); import bench_precision_real as b; "
            f"b.run({a.model!r}, {prefs!r}, b.Path({out!r}), {a.steps:d}, {extra!r}); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        )
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if res.returncode:
            print(res.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"{name} failed")
        print(f"| {name} | {int(res.stdout.strip().splitlines()[-1]) / 1024:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--modes", default="fp32,bf16-mixed,bf16-plain,bf16-true")
    ap.add_argument("--memory", action="store_true", help="peak RSS of DPO with and without LoRA instead")
    a = ap.parse_args()
    memory_table(a) if a.memory else precision_table(a)


if __name__ == "__main__":
    main()
