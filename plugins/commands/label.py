"""``rlfuse label``: collect human preferences in the terminal.

For each prompt of a JSONL file, two completions are sampled from a policy (a
``save_pretrained`` folder, or the built-in tiny model) and shown side by side; the person
answers ``a`` (A is better), ``b`` (B is better), ``t`` (tie), ``s`` (skip) or ``q`` (quit).
Every answer is appended at once as one JSON line of the output file::

    {"prompt": ..., "chosen": ..., "rejected": ..., "label": "A", "prompt_index": 7, ...}

which ``algo=reward_model`` and ``algo=dpo`` read as is (``data.preferences=FILE``; rows with
``"label": "tie"`` or ``"skip"`` carry no preference and are left out by the reader).

Safety: each line is written with one ``write`` system call and fsync'ed, so Ctrl-C (or a
crash) never leaves half a row and never loses a recorded answer; a torn last line left by a
hard kill is repaired on the next start. Re-running with the same output file resumes: the
prompts already answered (including skips) are not asked again, and a prompt's pair is drawn
with a seed derived from its index, so an interrupted session shows the same pairs.

Answers are read line by line from standard input, so the tool is scriptable::

    printf 'a\\nb\\nt\\ns\\nq\\n' | rlfuse label --out prefs.jsonl --num 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
import time
from itertools import zip_longest
from pathlib import Path
from typing import Any, TextIO

from rlfuse import models
from rlfuse.config import ModelConfig
from rlfuse.plugins._data.records import DataError, Record, encode_prompts, prompt_text, read_jsonl
from rlfuse.plugins._sampling import SamplingConfig, sample

DEFAULT_PROMPTS = "pkg://rlfuse.plugins/tasks/data/prompts_train.jsonl"
CHOICES = {"a": "A", "b": "B", "t": "tie", "tie": "tie", "s": "skip", "skip": "skip", "q": "quit", "quit": "quit"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="rlfuse label", description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default=None, help="save_pretrained folder (default: the built-in tiny model)")
    ap.add_argument("--prompts", default=DEFAULT_PROMPTS, help="JSONL file with a `prompt` or `messages` field per row")
    ap.add_argument("--out", default="preferences_human.jsonl", help="preference JSONL to append to")
    ap.add_argument("--num", type=int, default=20, help="answers to collect in this session")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-prompt-length", type=int, default=512, help="longer prompts keep their last tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=None, help="display width (default: the terminal's)")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------ files


def read_prompts(path: str) -> list[Record]:
    """Rows with a usable prompt; a bad row is an error naming file and line."""
    try:
        return read_jsonl(path, required=(("prompt",), ("messages",)))
    except DataError as e:
        raise SystemExit(f"rlfuse label: {e}") from None


def load_done(out: Path) -> set[int]:
    """Prompt indices already answered in ``out``; repairs a torn last line."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):  # a hard kill mid-line: drop the partial row
        cut = data.rfind(b"\n") + 1
        with out.open("r+b") as f:
            f.truncate(cut)
        print(f"rlfuse label: {out}: removed an incomplete last line", file=sys.stderr)
        data = data[:cut]
    done = set()
    for i, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise SystemExit(f"rlfuse label: {out}:{i}: not valid JSON; fix or move the file") from None
        if isinstance(row, dict) and isinstance(row.get("prompt_index"), int):
            done.add(row["prompt_index"])
    return done


def append_row(fd: int, row: dict[str, Any]) -> None:
    """One line, one write() call, then fsync: a row is either fully on disk or absent."""
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    n = os.write(fd, data)
    if n != len(data):  # pragma: no cover - regular files write fully
        raise OSError(f"short write ({n} of {len(data)} bytes)")
    os.fsync(fd)


# ------------------------------------------------------------------------ model


def load_policy(path: str | None, seed: int) -> tuple[Any, Any]:
    if path is None:
        cfg = ModelConfig()
        tok = models.build_tiny_tokenizer()
        return models.build_tiny_model(cfg, tok, seed).eval(), tok
    cfg = ModelConfig(name_or_path=path)
    tok = models.load_tokenizer(cfg)
    return models.load_policy(cfg, tok, seed).eval(), tok


def stored_prompt(row: dict[str, Any]) -> Any:
    """The prompt as it goes into the output row: text, or chat messages (the last assistant
    message of a ``messages`` row removed), so the reader renders it like the prompt file."""
    if "prompt" in row:
        return row["prompt"]
    msgs = list(row["messages"])
    return msgs[:-1] if msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant" else msgs


def sample_pair(model: Any, tok: Any, text: str, args: argparse.Namespace, seed: int) -> tuple[str, str]:
    """Two sampled completions of one prompt (seeded, so a resumed session shows the same)."""
    import torch

    ids = encode_prompts(tok, [text], args.max_prompt_length, "left", ["prompt"])[0]
    torch.manual_seed(seed)
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    batch = sample(model, tok, [ids, ids], cfg, next(model.parameters()).device)
    return batch.responses[0], batch.responses[1]


# ------------------------------------------------------------------------ display


def side_by_side(a: str, b: str, width: int) -> str:
    col = max(10, (width - 3) // 2)
    left = ["A"] + (textwrap.wrap(a, col) or ["(empty)"])
    right = ["B"] + (textwrap.wrap(b, col) or ["(empty)"])
    return "\n".join(f"{x:<{col}} | {y}" for x, y in zip_longest(left, right, fillvalue=""))


def ask(inp: TextIO, out: TextIO) -> str:
    while True:
        out.write("choose: [a] A better  [b] B better  [t] tie  [s] skip  [q] quit > ")
        out.flush()
        line = inp.readline()
        if not line:  # end of input: stop like `q`
            out.write("\n")
            return "quit"
        choice = CHOICES.get(line.strip().lower())
        if choice:
            return choice
        out.write(f"  '{line.strip()}' is not one of a, b, t, s, q\n")


# ------------------------------------------------------------------------ main


def main(argv: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    inp, out = stdin or sys.stdin, stdout or sys.stdout
    rows = read_prompts(args.prompts)
    path = Path(args.out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    done = load_done(path)
    todo = [i for i in range(len(rows)) if i not in done]
    if not todo:
        out.write(f"all {len(rows)} prompts of {args.prompts} are already labelled in {path}\n")
        return 0
    model, tok = load_policy(args.policy, args.seed)
    width = args.width or shutil.get_terminal_size((100, 24)).columns
    policy_name = args.policy or "builtin-tiny"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    n = 0
    try:
        if done:
            out.write(f"resuming: {len(done)} prompts already labelled in {path}\n")
        for idx in todo:
            if n >= args.num:
                break
            prompt = stored_prompt(rows[idx].row)
            text = prompt_text(rows[idx], tok)
            a, b = sample_pair(model, tok, text, args, seed=args.seed * 1_000_003 + idx)
            base = {"prompt": prompt, "prompt_index": idx, "policy": policy_name, "time": round(time.time(), 3)}
            if a == b:
                append_row(fd, {**base, "label": "skip", "reason": "identical completions"})
                out.write(f"[{idx}] both samples are identical; skipped\n")
                continue
            out.write(f"\n[{n + 1}/{args.num}] prompt #{idx}:\n{text}\n\n{side_by_side(a, b, width)}\n\n")
            choice = ask(inp, out)
            if choice == "quit":
                break
            if choice == "A":
                rec = {**base, "chosen": a, "rejected": b, "label": "A"}
            elif choice == "B":
                rec = {**base, "chosen": b, "rejected": a, "label": "B"}
            elif choice == "tie":
                rec = {**base, "chosen": a, "rejected": b, "label": "tie"}
            else:
                rec = {**base, "label": "skip"}
            append_row(fd, rec)
            n += 1
    except KeyboardInterrupt:
        out.write(f"\ninterrupted: {n} answers saved this session in {path} (run again to resume)\n")
        return 130
    finally:
        os.close(fd)
    out.write(f"saved {n} answers in {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
