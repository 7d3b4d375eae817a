"""``reward=rule``: a Python function named in config scores each response; it receives the
prompt row's other dataset columns; ``batched: true`` calls it once per batch."""

from __future__ import annotations

import sys

import pytest

from rlfuse.manager import PluginError, instantiate, resolve
from support import text_batch


def rule(**options):
    return instantiate(resolve("rule"), options, name="rule", where="reward.rule")


def test_rule_reward_receives_the_rows_columns():
    # the `target` column disagrees with the prompt on purpose: only a function that was given
    # the column scores "xyz" as right
    plugin = rule(function="rlfuse.plugins.tasks.sort_letters:reward")
    batch = text_batch(["cba=", "cba="], ["xyz", "abc"], [{"prompt": "cba=", "target": "xyz"}, {"prompt": "cba="}])
    assert plugin.reward(batch=batch)["rule"].tolist() == [1.0, 1.0]
    again = rule(function="rlfuse.plugins.tasks.sort_letters:reward")
    assert again.reward(batch=text_batch(["cba="], ["abc"], [{"prompt": "cba=", "target": "xyz"}]))["rule"].tolist() == [0.0]


def test_batched_function_gets_lists(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text(
        "calls = []\n"
        "def score(prompts, responses, target, **kw):\n"
        "    calls.append(len(responses))\n"
        "    return [float(r == t) + 0.5 * len(p) for p, r, t in zip(prompts, responses, target)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin = rule(function="my_scores:score", batched=True)
    rows = [{"prompt": "ba=", "target": "ab"}, {"prompt": "cba=", "target": "abc"}, {"prompt": "a=", "target": "a"}]
    got = plugin.reward(batch=text_batch([r["prompt"] for r in rows], ["ab", "acb", "a"], rows))["rule"]
    assert got.tolist() == [2.5, 2.0, 2.0]
    assert sys.modules["my_scores"].calls == [3]  # one call for the whole batch


def test_wrong_number_of_scores_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "short_scores.py").write_text("def score(prompts, responses, **kw):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin = rule(function="short_scores:score", batched=True)
    with pytest.raises(ValueError, match="returned 1 scores for 2 responses"):
        plugin.reward(batch=text_batch(["a=", "b="], ["a", "b"], [{}, {}]))


@pytest.mark.parametrize(
    "spec, msg",
    [("no_colon", "expected 'module:function'"), ("no_such_module_xyz:f", "cannot import module"),
     ("rlfuse.plugins.tasks.sort_letters:nope", "has no attribute 'nope'")],
)  # fmt: skip
def test_bad_function_is_an_error_naming_the_key(spec, msg):
    with pytest.raises(PluginError, match=f"reward.rule.function.*{msg}"):
        rule(function=spec)
