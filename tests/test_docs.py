"""Docs stay true: every hook and every built-in plugin is documented on its own page, with
every option of its ``Config``; every relative link in docs/ and README resolves; every
example command of a plugin page composes."""

from __future__ import annotations

import dataclasses
import inspect
import re
import shlex
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from rlfuse import hookspecs
from rlfuse.manager import resolve
from support import compose

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, "rlfuse_spec"))
PLUGINS = sorted((ep.name, ep.value) for ep in entry_points(group="rlfuse") if ep.value.startswith("rlfuse.plugins."))
PAGES = sorted((ROOT / "docs" / "plugins").rglob("*.md"))
MARKDOWN = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]


def test_hooks_are_read_from_hookspecs():
    assert {"rollout", "reward", "advantage", "loss", "sync", "setup", "teardown"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_in_hooks_md(hook):
    text = (ROOT / "docs" / "hooks.md").read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert any(f"`{hook}(" in h for h in headings), f"docs/hooks.md has no section for {hook}"


def page_of(value: str) -> Path:
    """docs/plugins/<group>/<option>.md of an entry point ``rlfuse.plugins.<group>.<option>``."""
    group, option = value.removeprefix("rlfuse.plugins.").split(":")[0].split(".")
    return ROOT / "docs" / "plugins" / group / f"{option}.md"


@pytest.mark.parametrize("name,value", PLUGINS)
def test_every_builtin_plugin_has_its_own_page(name, value):
    page = page_of(value)
    assert page.exists(), f"plugin '{name}' ({value}) has no page {page.relative_to(ROOT)}"
    title = page.read_text().splitlines()[0]
    group = page.parent.name
    assert title.startswith("# ") and f"`{group}={name}`" in title, f"{page.relative_to(ROOT)}: title must name `{group}={name}`"
    assert f"plugins/{group}/{name}.py" in page.read_text(), f"{page.relative_to(ROOT)} does not name its module"


@pytest.mark.parametrize("name,value", PLUGINS)
def test_every_config_option_is_on_the_page(name, value):
    obj = resolve(name)
    schema = getattr(getattr(obj, "Plugin", obj), "Config", None) if inspect.ismodule(obj) else getattr(obj, "Config", None)
    if schema is None:
        return  # a plugin without options
    text = page_of(value).read_text()
    missing = [f.name for f in dataclasses.fields(schema) if f"`{f.name}`" not in text]
    assert not missing, f"{page_of(value).relative_to(ROOT)} does not document {missing}"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # not inside code blocks
    for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not link.startswith(("http://", "https://", "mailto:")):
            assert (path.parent / link).exists(), f"{path.relative_to(ROOT)}: broken link {link}"


def examples(page: Path) -> list[str]:
    return [" ".join(m.split()) for m in re.findall(r"`rlfuse ([^`]+)`", page.read_text())]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugin_page_examples_compose(page):
    commands = examples(page)
    assert commands, f"{page.relative_to(ROOT)} has no example command (`rlfuse ...`)"
    for cmd in commands:
        overrides = [a for a in shlex.split(cmd) if "=" in a and not a.startswith("-")]
        try:
            compose(overrides)
        except Exception as e:  # noqa: BLE001 - reported with the page and the command
            pytest.fail(f"{page.relative_to(ROOT)}: `rlfuse {cmd}` does not compose: {e} {e.__cause__ or ''}")


def test_readme_opens_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash", 1)[1].split("```", 1)[0]
    assert "bash .ci/setup && .venv/bin/rlfuse" in block
    assert ".venv/bin/python -m pytest" in block
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()


def test_plugin_index_links_every_page():
    index = (ROOT / "docs" / "plugins" / "README.md").read_text()
    missing = [str(p.relative_to(ROOT / "docs" / "plugins")) for p in PAGES
               if p.name != "README.md" and f"({p.relative_to(ROOT / 'docs' / 'plugins')})" not in index]  # fmt: skip
    assert not missing, f"docs/plugins/README.md does not link {missing}"


def metric_keys_in_source(path: Path) -> set[str]:
    """Metric keys a plugin module writes as string literals (``"policy/clipfrac"``), and
    f-string templates (``f"reward/{self.name}/raw_mean"``) with each ``{...}`` as ``{}``."""
    from rlfuse.metrics import NAMESPACES

    ns = "|".join(NAMESPACES)
    text = path.read_text()
    keys = set(re.findall(rf'(?<![f\w])"((?:{ns})/[a-z_/]+)"', text))
    keys |= {re.sub(r"\{[^}]*\}", "{}", k) for k in re.findall(rf'f"((?:{ns})/[^"]*)"', text)}
    return keys


def named_in(key: str, text: str) -> bool:
    """``key`` (a template's fixed parts, in order, the first one opening a code span) is in ``text``."""
    head, *rest = key.split("{}")
    pattern = re.escape(f"`{head}") + "".join(r"[^`\s]*" + re.escape(part) for part in rest)
    return re.search(pattern, text) is not None


@pytest.mark.parametrize("name,value", [(n, v) for n, v in PLUGINS if ".logger." not in v])
def test_every_metric_key_of_a_plugin_is_documented(name, value):
    """Loggers are left out: they name keys they show, not keys they log."""
    module = ROOT / "plugins" / Path(*value.removeprefix("rlfuse.plugins.").split(".")).with_suffix(".py")
    page, metrics_md = page_of(value).read_text(), (ROOT / "docs" / "metrics.md").read_text()
    keys = metric_keys_in_source(module)
    missing = sorted(k for k in keys if not named_in(k, page))
    assert not missing, f"{page_of(value).relative_to(ROOT)} does not name the metric(s) {missing}"
    missing = sorted(k for k in keys if not named_in(k, metrics_md) and not k.endswith(("_before", "_after")))
    assert not missing, f"docs/metrics.md does not name the metric(s) {missing} of plugin '{name}'"
