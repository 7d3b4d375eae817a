"""``rlfuse.plugins._rules``: one way to load and call a ``module:function`` reward rule
(``reward=rule``, ``eval=task``)."""

from __future__ import annotations

import pytest

from rlfuse.plugins._rules import call_rule, load_function


def scores(prompt, response, target=None, **kw):
    return float(response == target) + (0.5 if kw else 0.0)


def test_per_answer_call_gets_the_rows_columns_not_the_prompt_fields():
    fn = scores
    rows = [{"prompt": "ba=", "target": "ab"}, {"messages": [], "target": "x", "extra": 1}, {}]
    assert call_rule(fn, ["ba=", "q", "r"], ["ab", "y", "z"], rows) == [1.0, 0.5, 0.0]
    assert call_rule(fn, ["p"], ["a"], None) == [0.0]  # no rows: no columns


def test_batched_call_gets_lists():
    seen = {}

    def batch_fn(prompts, responses, target):
        seen.update(prompts=prompts, target=target)
        return [len(r) for r in responses]

    rows = [{"prompt": "a", "target": "t1"}, {"prompt": "b", "target": "t2"}]
    assert call_rule(batch_fn, ["a", "b"], ["xx", "y"], rows, batched=True) == [2.0, 1.0]
    assert seen == {"prompts": ["a", "b"], "target": ["t1", "t2"]}


def test_load_function_errors_name_the_key():
    assert load_function("rlfuse.plugins.tasks.sort_letters:reward", "k").__name__ == "reward"
    with pytest.raises(ValueError, match="data.reward_fn: expected 'module:function'"):
        load_function("nocolon", "data.reward_fn")
    with pytest.raises(ValueError, match="k: 'rlfuse.plugins._rules:PROMPT_FIELDS' is not callable"):
        load_function("rlfuse.plugins._rules:PROMPT_FIELDS", "k")
