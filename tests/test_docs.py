"""Docs stay true: every hook and every built-in plugin is documented, and README's links resolve."""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from rlfuse import hookspecs

ROOT = Path(__file__).resolve().parents[1]
DOCS = "\n".join(p.read_text() for p in (ROOT / "docs").rglob("*.md"))
HOOKS = ["setup", "evaluate", "log", "save_state", "load_state", "teardown", "rollout", "reward", "advantage", "loss", "sync", "compare"]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_in_hooks_md(hook):
    text = (ROOT / "docs" / "hooks.md").read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert any(f"`{hook}(" in h for h in headings), f"docs/hooks.md has no section for {hook}"
    assert hasattr(hookspecs, hook)


def test_hooks_md_lists_every_hookspec():
    specs = {n for n in dir(hookspecs) if callable(getattr(hookspecs, n)) and hasattr(getattr(hookspecs, n), "rlfuse_spec")}
    assert specs == set(HOOKS)


@pytest.mark.parametrize("name", sorted(ep.name for ep in entry_points(group="rlfuse")))
def test_every_builtin_plugin_is_documented(name):
    assert re.search(rf"(=|\[|,|`){re.escape(name)}(`|\]|,|\b)", DOCS), f"no docs page mentions plugin '{name}'"


def test_readme_links_exist():
    readme = (ROOT / "README.md").read_text()
    for link in re.findall(r"\]\(([^)#]+)\)", readme):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link


def test_readme_opens_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash", 1)[1].split("```", 1)[0]
    assert "bash .ci/setup && .venv/bin/rlfuse" in block
    assert ".venv/bin/python -m pytest" in block
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()
