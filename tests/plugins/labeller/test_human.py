"""labeller=human: rlfuse label's side-by-side prompt, scripted answers, quitting stops."""

from __future__ import annotations

import io

from rlfuse.plugins.labeller.human import Config, Plugin


def test_reads_answers_and_stops_on_quit(tmp_path):
    answers = tmp_path / "answers.txt"
    answers.write_text("a\nx\nb\nt\ns\nq\n")
    plugin = Plugin(Config(input=str(answers), width=60))
    plugin.out = io.StringIO()
    n = 6
    labels = plugin.compare(ctx=None, prompts=["cab="] * n, first=["abc"] * n, second=["cba"] * n, rows=[{}] * n)
    assert labels == ["A", "B", "tie", "skip"]  # 'x' is asked again; 'q' stops: a shorter list
    shown = plugin.out.getvalue()
    assert "cab=" in shown and "abc" in shown and "cba" in shown and "'x' is not one of" in shown
    assert plugin.compare(ctx=None, prompts=["cab="], first=["a"], second=["b"], rows=[{}]) == []  # stopped
    plugin.teardown()


def test_end_of_input_stops_like_quit(tmp_path):
    answers = tmp_path / "answers.txt"
    answers.write_text("b\n")
    plugin = Plugin(Config(input=str(answers)))
    plugin.out = io.StringIO()
    assert plugin.compare(ctx=None, prompts=["ba="] * 3, first=["ab"] * 3, second=["ba"] * 3, rows=[{}] * 3) == ["B"]
    plugin.teardown()
