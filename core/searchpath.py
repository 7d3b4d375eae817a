"""Config files shipped by plugin packages: the entry-point group ``rlfuse.configs``.

A package that ships config files declares, in its pyproject::

    [project.entry-points."rlfuse.configs"]
    rlfuse-brevity = "rlfuse_brevity.conf"     # an importable package holding config groups

where ``rlfuse_brevity/conf/`` holds ``<group>/<option>.yaml`` files laid out like rlfuse's own
``conf/`` (``reward/brevity.yaml``, ``advantage/my_estimator.yaml``). rlfuse adds
``pkg://rlfuse_brevity.conf`` to Hydra's config search path (a Hydra ``SearchPathPlugin``
registered by :func:`enable`), so after ``pip install`` -- editable or not -- a user writes
``reward=[rule,brevity]`` or ``advantage=my_estimator``.

Order: rlfuse's own tree comes first, then the packages in entry-point order, so a built-in
option wins over a package's option of the same ``group/option``; two sources offering the
same ``group/option`` is a warning naming both. ``RLFUSE_CONFIGS_FIRST=name[,name]`` (entry-point
or distribution names) puts those packages before the built-ins: the user's choice wins.
``RLFUSE_DISABLE_PLUGIN_AUTOLOAD`` / ``RLFUSE_PLUGINS`` apply here as to plugins
(see :func:`rlfuse.manager.enabled_entry_points`).

The core knows nothing about any plugin: this is Hydra's search path, filled from metadata.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from rlfuse.manager import enabled_entry_points

GROUP = "rlfuse.configs"
BUILTIN = "rlfuse.conf"
_warned: set[tuple[str, ...]] = set()


@dataclass
class ConfigSource:
    """One package of config files: where it comes from and the options it offers."""

    name: str  # entry-point name (``builtin`` for rlfuse's own tree)
    package: str  # importable package holding <group>/<option>.yaml
    dist: str = ""  # distribution name
    version: str = ""
    options: dict[str, list[str]] = field(default_factory=dict)  # group -> options
    error: str | None = None  # why the package could not be read

    @property
    def path(self) -> str:
        return f"pkg://{self.package}"


def scan(package: str) -> dict[str, list[str]]:
    """``{group: [option, ...]}`` of the YAML files in a config package (nested groups as
    ``a/b``). Raises ``ModuleNotFoundError`` when the package does not import."""
    root = resources.files(package)
    out: dict[str, list[str]] = {}

    def walk(node: Any, prefix: str) -> None:
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            if child.is_dir() and not child.name.startswith(("_", ".")):
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(".yaml") and prefix:
                out.setdefault(prefix[:-1], []).append(child.name[: -len(".yaml")])

    walk(root, "")
    return out


def sources(builtin: bool = True) -> list[ConfigSource]:
    """rlfuse's own config tree (first) and every enabled ``rlfuse.configs`` package."""
    out = [ConfigSource("builtin", BUILTIN, "rlfuse", _version("rlfuse"), scan(BUILTIN))] if builtin else []
    for ep in enabled_entry_points(GROUP):
        dist = ep.dist.name if ep.dist else ""
        src = ConfigSource(ep.name, ep.value.split(":")[0], dist, ep.dist.version if ep.dist else "")
        try:
            src.options = scan(src.package)
        except Exception as e:  # noqa: BLE001 - reported, never fatal for the others
            src.error = f"{type(e).__name__}: {e}"
        out.append(src)
    return out


def conflicts(srcs: list[ConfigSource]) -> dict[str, list[ConfigSource]]:
    """``group/option`` -> the sources offering it, for every option offered more than once."""
    seen: dict[str, list[ConfigSource]] = {}
    for s in srcs:
        for group, opts in s.options.items():
            for o in opts:
                seen.setdefault(f"{group}/{o}", []).append(s)
    return {k: v for k, v in seen.items() if len(v) > 1}


def ordered(srcs: list[ConfigSource]) -> list[ConfigSource]:
    """The search order: ``RLFUSE_CONFIGS_FIRST`` packages, the built-ins, then the rest."""
    first = {n.strip().lower().replace("_", "-") for n in os.environ.get("RLFUSE_CONFIGS_FIRST", "").split(",") if n.strip()}

    def chosen(s: ConfigSource) -> bool:
        return s.name != "builtin" and (s.name.lower().replace("_", "-") in first or s.dist.lower().replace("_", "-") in first)

    return [s for s in srcs if chosen(s)] + [s for s in srcs if not chosen(s)]


def warn_conflicts(srcs: list[ConfigSource]) -> None:
    """One warning per ``group/option`` offered by two sources, naming both (once per process)."""
    for key, by in conflicts(srcs).items():
        names = tuple(f"{s.dist or s.name} ({s.path})" for s in by)
        if (key,) + names in _warned:
            continue
        _warned.add((key,) + names)
        warnings.warn(
            f"config '{key}' is offered by {' and '.join(names)}; using the first "
            "(RLFUSE_CONFIGS_FIRST=<package> picks another)",
            stacklevel=2,
        )


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return ""


@functools.cache
def _plugin_class() -> type:
    from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    class RlfuseConfigsSearchPath(SearchPathPlugin):
        """Adds every ``rlfuse.configs`` package to Hydra's search path (see module doc)."""

        def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
            srcs = [s for s in ordered(sources()) if s.error is None]
            warn_conflicts(srcs)
            main = [e.provider for e in search_path.get_path()]
            before_main = True
            for s in srcs:
                if s.name == "builtin":
                    before_main = False
                    continue
                provider = f"rlfuse.configs:{s.name}"
                if before_main and "main" in main:
                    search_path.prepend(provider, s.path, anchor=SearchPathQuery(provider="main"))
                else:
                    search_path.append(provider, s.path)

    return RlfuseConfigsSearchPath


def enable() -> None:
    """Register the search-path plugin with Hydra. Idempotent (Hydra keeps a class once), so
    :func:`rlfuse.config.register_configs` calls it before any config is composed."""
    from hydra.core.plugins import Plugins

    Plugins.instance().register(_plugin_class())
