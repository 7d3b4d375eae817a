"""`rlfuse label` driven from stdin: valid rows, resume, interruption."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rlfuse.plugins.commands.label import main


def prompts(tmp_path, n=6):
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"{'cbad'[: 2 + i % 3]}{i}="}) + "\n" for i in range(n)))
    return str(f)


def run(tmp_path, answers, out, num=10):
    so = io.StringIO()
    rc = main(["--prompts", prompts(tmp_path), "--out", str(out), "--num", str(num), "--max-new-tokens", "6", "--width", "60"],
              stdin=io.StringIO(answers), stdout=so)
    return rc, so.getvalue()


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_stdin_choices_write_rows_the_readers_accept(tmp_path):
    from types import SimpleNamespace

    from rlfuse.models import build_tiny_tokenizer
    from rlfuse.plugins._data.pairs import load_pairs

    out = tmp_path / "prefs.jsonl"
    rc, text = run(tmp_path, "a\nwhat\nb\nt\ns\nq\n", out)
    assert rc == 0 and "is not one of" in text and "A" in text and " | " in text
    got = rows(out)
    assert [r["label"] for r in got] == ["A", "B", "tie", "skip"]
    assert [r["prompt_index"] for r in got] == [0, 1, 2, 3]
    for r in got[:3]:
        assert {"prompt", "chosen", "rejected"} <= set(r) and r["chosen"] != r["rejected"]
    ctx = SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(max_prompt_length=16, max_length=64, truncation="left")),
                          tokenizer=build_tiny_tokenizer())
    pairs = load_pairs(ctx, str(out))  # ties and skips carry no preference
    assert [p.prompt for p in pairs] == [got[0]["prompt"], got[1]["prompt"]]


def test_resume_continues_and_shows_the_same_pairs(tmp_path):
    out = tmp_path / "prefs.jsonl"
    run(tmp_path, "a\nq\n", out)
    rc, text = run(tmp_path, "b\nb\n", out, num=2)
    assert rc == 0 and "resuming: 1 prompts" in text
    got = rows(out)
    assert [r["prompt_index"] for r in got] == [0, 1, 2]
    # a fresh file answering prompt 0 differently sees the very same pair (seeded per prompt)
    other = tmp_path / "other.jsonl"
    run(tmp_path, "b\nq\n", other)
    o = rows(other)[0]
    assert (o["chosen"], o["rejected"]) == (got[0]["rejected"], got[0]["chosen"])


class InterruptAfter(io.StringIO):
    """stdin that raises KeyboardInterrupt (Ctrl-C) once its lines are used up."""

    def readline(self, *a):
        line = super().readline(*a)
        if not line:
            raise KeyboardInterrupt
        return line


def test_ctrl_c_keeps_every_answer(tmp_path):
    out = tmp_path / "prefs.jsonl"
    so = io.StringIO()
    rc = main(["--prompts", prompts(tmp_path), "--out", str(out), "--max-new-tokens", "6"], stdin=InterruptAfter("a\nb\n"), stdout=so)
    assert rc == 130 and "interrupted: 2 answers saved" in so.getvalue()
    assert [r["label"] for r in rows(out)] == ["A", "B"]


def test_torn_last_line_is_repaired(tmp_path):
    out = tmp_path / "prefs.jsonl"
    run(tmp_path, "a\nq\n", out)
    with out.open("a") as f:
        f.write('{"prompt": "half a ro')  # what a hard kill mid-write would leave
    rc, text = run(tmp_path, "b\nq\n", out)
    got = rows(out)
    assert rc == 0 and [r["prompt_index"] for r in got] == [0, 1]


def test_bad_prompt_file_names_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a="}\n{"text": "b"}\n')
    with pytest.raises(SystemExit, match=r"p.jsonl:2: missing field.*prompt"):
        main(["--prompts", str(f), "--out", str(tmp_path / "o.jsonl")], stdin=io.StringIO(""), stdout=io.StringIO())


@pytest.mark.slow
def test_sigint_to_the_cli_leaves_a_valid_file(tmp_path):
    out = tmp_path / "prefs.jsonl"
    cmd = [sys.executable, "-c", "import sys; from rlfuse.cli import main; sys.argv=['rlfuse']+sys.argv[1:]; main()",
           "label", "--prompts", prompts(tmp_path), "--out", str(out), "--max-new-tokens", "6"]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdin.write("a\nb\n")
    p.stdin.flush()
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)  # waiting for the third answer
    stdout, _ = p.communicate(timeout=60)
    assert p.returncode == 130, stdout
    assert [r["label"] for r in rows(out)] == ["A", "B"]
    assert out.read_text().endswith("\n")
    os.remove(out)
