"""``rlfuse plugins``: list the installed plugins, the hooks they implement and their config files.

For every entry point of the group ``rlfuse`` (built-in ones included): its name, the
distribution and version that provide it, the hooks it implements, the config options that
select it (``group/option`` files whose ``plugin:`` names it, from rlfuse's tree or a plugin
package's ``rlfuse.configs``), and the file it was loaded from. A plugin that fails to import is
listed with its error; the others are still listed. Then the sub-commands (``rlfuse.commands``)
and the config packages (``rlfuse.configs``)::

    rlfuse plugins            # a table
    rlfuse plugins --json     # the same, for scripts

``RLFUSE_DISABLE_PLUGIN_AUTOLOAD=1`` / ``RLFUSE_PLUGINS=a,b`` restrict what loads; entry points
left out are listed as disabled.
"""

from __future__ import annotations

import argparse
import inspect
import json
from importlib import resources
from importlib.metadata import entry_points
from typing import Any

import yaml

from rlfuse import hookspecs, searchpath
from rlfuse.manager import enabled_entry_points

MARK = f"{hookspecs.PROJECT}_impl"  # the attribute @rlfuse.hookimpl puts on a function


def hooks_of(obj: Any) -> list[str]:
    """Names of the hooks a plugin object (module or class) implements."""
    if inspect.ismodule(obj) and isinstance(getattr(obj, "Plugin", None), type):
        obj = obj.Plugin
    found = set()
    for attr in dir(obj):
        try:
            fn = getattr(obj, attr)
        except Exception:  # noqa: BLE001 - a property that fails is not a hook
            continue
        opts = getattr(fn, MARK, None)
        if isinstance(opts, dict):
            found.add(opts.get("specname") or attr)
    return sorted(found)


def config_options() -> dict[str, list[str]]:
    """Plugin name -> ``group/option`` config files that select it (``plugin: NAME`` at the
    top of the file, or in one of its sections)."""
    out: dict[str, list[str]] = {}
    for src in searchpath.sources():
        if src.error:
            continue
        where = "" if src.name == "builtin" else f" ({src.dist or src.name})"
        for group, options in src.options.items():
            for option in options:
                try:
                    node = yaml.safe_load((resources.files(src.package) / group / f"{option}.yaml").read_text())
                except Exception:  # noqa: BLE001 - a broken file is not this listing's concern
                    continue
                if not isinstance(node, dict):
                    continue
                names = {node.get("plugin")} | {v.get("plugin") for v in node.values() if isinstance(v, dict)}
                for n in names - {None}:
                    out.setdefault(str(n), []).append(f"{group}/{option}{where}")
    return out


def collect() -> dict[str, Any]:
    enabled = {(ep.name, ep.value) for ep in enabled_entry_points("rlfuse")}
    options = config_options()
    plugins = []
    for ep in sorted(entry_points(group="rlfuse"), key=lambda e: e.name):
        row: dict[str, Any] = {
            "name": ep.name, "target": ep.value,
            "distribution": ep.dist.name if ep.dist else None,
            "version": ep.dist.version if ep.dist else None,
            "hooks": [], "config": options.get(ep.name, []), "location": None, "error": None,
            "enabled": (ep.name, ep.value) in enabled,
        }
        if row["enabled"]:
            try:
                obj = ep.load()
                row["hooks"] = hooks_of(obj)
                mod = inspect.getmodule(obj)
                row["location"] = getattr(mod, "__file__", None)
            except Exception as e:  # noqa: BLE001 - listed, never fatal
                row["error"] = f"{type(e).__name__}: {e}"
        plugins.append(row)
    commands = [{"name": ep.name, "target": ep.value, "distribution": ep.dist.name if ep.dist else None}
                for ep in sorted(enabled_entry_points("rlfuse.commands"), key=lambda e: e.name)]
    configs = [{"name": s.name, "package": s.package, "distribution": s.dist, "version": s.version,
                "options": [f"{g}/{o}" for g, opts in s.options.items() for o in opts], "error": s.error}
               for s in searchpath.sources(builtin=False)]
    return {"plugins": plugins, "commands": commands, "configs": configs}


def render(data: dict[str, Any]) -> str:
    lines = ["plugins (entry-point group 'rlfuse'):"]
    for p in data["plugins"]:
        dist = f"{p['distribution']} {p['version']}" if p["distribution"] else "?"
        lines.append(f"  {p['name']:<16} {dist}")
        if not p["enabled"]:
            lines.append("      disabled (RLFUSE_DISABLE_PLUGIN_AUTOLOAD / RLFUSE_PLUGINS)")
            continue
        if p["error"]:
            lines.append(f"      ERROR importing {p['target']}: {p['error']}")
            continue
        lines.append(f"      hooks:  {', '.join(p['hooks']) or '(none)'}")
        if p["config"]:
            lines.append(f"      config: {', '.join(p['config'])}")
        lines.append(f"      from:   {p['location']}")
    lines.append("commands (rlfuse.commands): " + ", ".join(f"{c['name']} ({c['distribution']})" for c in data["commands"]))
    if data["configs"]:
        lines.append("config packages (rlfuse.configs):")
        for c in data["configs"]:
            what = c["error"] and f"ERROR: {c['error']}" or ", ".join(c["options"])
            lines.append(f"  {c['name']} ({c['distribution']} {c['version']}): pkg://{c['package']}: {what}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="rlfuse plugins", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    data = collect()
    print(json.dumps(data, indent=2) if args.json else render(data))
    return 0
