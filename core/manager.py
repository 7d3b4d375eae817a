"""Finding, loading and registering plugins.

A plugin is named in config either by its entry-point name in the ``rlfuse`` group (built-in
plugins are declared in rlfuse's own pyproject exactly like a third-party package declares
its own) or by a dotted module path (``my_pkg.my_plugin``, optionally ``:Attribute``).

What the name resolves to can be

* a module whose top-level functions carry ``@rlfuse.hookimpl``; or
* a class (or a module with a ``Plugin`` class): it is instantiated as
  ``cls(cfg, name=...)`` where ``cfg`` is its config section validated against the class's
  ``Config`` dataclass (an unknown key or a wrong type is an error naming the key).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import os
from importlib.metadata import entry_points
from typing import Any

import pluggy
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlfuse import hookspecs

GROUP = hookspecs.PROJECT
BUILTIN_DIST = "rlfuse"  # the distribution whose entry points are the built-in plugins


def enabled_entry_points(group: str) -> list[Any]:
    """The entry points of ``group`` that may load.

    All of them, unless ``RLFUSE_DISABLE_PLUGIN_AUTOLOAD=1`` or ``RLFUSE_PLUGINS=a,b`` is set:
    then only rlfuse's own (built-in) ones plus those whose distribution or entry-point name
    is listed in ``RLFUSE_PLUGINS`` (as pytest's ``PYTEST_DISABLE_PLUGIN_AUTOLOAD`` and llm's
    ``LLM_LOAD_PLUGINS``). A plugin named by dotted module path always loads.
    """
    eps = list(entry_points(group=group))
    allow = os.environ.get("RLFUSE_PLUGINS")
    if os.environ.get("RLFUSE_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0") and allow is None:
        return eps
    names = {n.strip().lower().replace("_", "-") for n in (allow or "").split(",") if n.strip()}

    def ok(ep: Any) -> bool:
        dist = (ep.dist.name if ep.dist else "").lower().replace("_", "-")
        return dist == BUILTIN_DIST or dist in names or ep.name.lower().replace("_", "-") in names

    return [ep for ep in eps if ok(ep)]


class PluginError(RuntimeError):
    """A plugin could not be found, loaded, configured or failed while running a hook."""


def available_plugins() -> dict[str, str]:
    """Entry-point name -> import target of every installed rlfuse plugin."""
    return {ep.name: ep.value for ep in enabled_entry_points(GROUP)}


def resolve(name: str) -> Any:
    """Import the object a plugin name refers to (entry point first, then dotted path)."""
    eps = {ep.name: ep for ep in enabled_entry_points(GROUP)}
    if name in eps:
        try:
            return eps[name].load()
        except Exception as e:  # noqa: BLE001 - re-raised with the plugin's name
            raise PluginError(f"Error importing plugin '{name}' ({eps[name].value}): {e}") from e
    module_name, _, attr = name.partition(":")
    if not module_name.replace(".", "").replace("_", "").isalnum():
        raise PluginError(_unknown(name))
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):  # the named module itself is missing
            raise PluginError(_unknown(name)) from e
        raise PluginError(f"Error importing plugin '{name}': {e}") from e
    except Exception as e:  # noqa: BLE001 - re-raised with the plugin's name
        raise PluginError(f"Error importing plugin '{name}': {e}") from e
    for part in filter(None, attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise PluginError(f"Plugin '{name}': module '{module_name}' has no '{part}'") from e
    return obj


def plugin_defaults() -> dict[str, dict[str, Any]]:
    """Entry-point name -> ``{"plugin": name, **defaults of its Config}`` for every installed
    plugin that declares a ``Config`` dataclass.

    The config tree builds each option's section on these (``conf/<group>/<option>.yaml``
    lists ``/plugin_defaults/<option>`` in its defaults), so a plugin's defaults are written
    once, in its dataclass, yet ``rlfuse --cfg job`` shows them and ``group.key=value``
    overrides them. A plugin that fails to import is left out here; selecting it reports
    the import error.
    """
    out: dict[str, dict[str, Any]] = {}
    for ep in enabled_entry_points(GROUP):
        try:
            obj = ep.load()
        except Exception:  # noqa: BLE001 - reported when the plugin is selected
            continue
        if inspect.ismodule(obj) and isinstance(getattr(obj, "Plugin", None), type):
            obj = obj.Plugin
        schema = getattr(obj, "Config", None)
        fields: dict[str, Any] = {}
        if schema is not None and dataclasses.is_dataclass(schema):
            fields = OmegaConf.to_container(OmegaConf.structured(schema), resolve=False)  # type: ignore[assignment]
        out[ep.name] = {"plugin": ep.name, **fields}
    return out


def _unknown(name: str) -> str:
    names = ", ".join(sorted(available_plugins())) or "(none installed)"
    return (
        f"Unknown plugin '{name}'. Installed plugins (entry-point group '{GROUP}'): {names}. "
        "A plugin that is not installed can be named by its dotted module path."
    )


def instantiate(obj: Any, options: dict[str, Any], *, name: str, where: str) -> Any:
    """Turn what :func:`resolve` returned into the object to register with pluggy."""
    if inspect.ismodule(obj) and isinstance(getattr(obj, "Plugin", None), type):
        obj = obj.Plugin
    if not isinstance(obj, type):
        if options:
            raise PluginError(
                f"Plugin '{name}' at '{where}' takes no options, got: {', '.join(options)}"
            )
        return obj
    schema = getattr(obj, "Config", None)
    if schema is not None:
        cfg = validate(schema, options, where=where)
    else:
        if options:
            raise PluginError(
                f"Plugin '{name}' at '{where}' declares no Config, so it takes no options; "
                f"got: {', '.join(options)}"
            )
        cfg = None
    try:
        return obj(cfg, name=name) if _accepts_name(obj) else obj(cfg)
    except PluginError:
        raise
    except Exception as e:  # noqa: BLE001
        raise PluginError(f"Plugin '{name}' at '{where}' failed to start: {e}") from e


def _accepts_name(cls: type) -> bool:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    return "name" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def validate(schema: type, options: dict[str, Any] | DictConfig, *, where: str) -> Any:
    """Validate ``options`` against a dataclass ``schema`` and return a schema instance."""
    if not dataclasses.is_dataclass(schema):
        raise PluginError(f"{where}: Config must be a dataclass, got {schema!r}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), options or {})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        at = f"{where}.{key}" if key else where
        msg = str(e).splitlines()[0]
        raise PluginError(f"Config error at '{at}': {msg}") from None
    except (ValueError, TypeError) as e:  # the dataclass's own checks (__post_init__)
        raise PluginError(f"Config error at '{where}': {e}") from None


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus rlfuse's rules: strict hook names, errors that name the plugin."""

    def __init__(self) -> None:
        super().__init__(GROUP)
        self.add_hookspecs(hookspecs)

    def register_plugin(self, plugin: Any, name: str) -> str:
        """Register ``plugin`` under a unique ``name``; check its hook names at once."""
        unique = name
        i = 1
        while self.has_plugin(unique) or self.is_blocked(unique):
            i += 1
            unique = f"{name}#{i}"
        try:
            self.register(plugin, name=unique)
        except ValueError as e:  # pluggy: plugin object already registered
            raise PluginError(f"Plugin '{name}' is registered twice: {e}") from e
        except pluggy.PluginValidationError as e:
            raise PluginError(f"Plugin '{name}': {e}") from e
        try:
            self.check_pending()
        except pluggy.PluginValidationError as e:
            self.unregister(name=unique)
            raise PluginError(
                f"Plugin '{name}' implements a hook that does not exist: {e}. "
                f"Known hooks: {', '.join(sorted(self.hook.__dict__))}"
            ) from e
        self._name_errors(unique, plugin)
        return unique

    def _name_errors(self, plugin_name: str, plugin: Any) -> None:
        """Wrap each hook implementation so an exception names the plugin and the hook."""
        for caller in self.get_hookcallers(plugin) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.hookwrapper or impl.wrapper):
                    impl.function = _named(impl.function, plugin_name, caller.name)


def _named(fn: Any, plugin: str, hook: str) -> Any:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PluginError:
            raise
        except Exception as e:
            raise PluginError(f"plugin '{plugin}' failed in hook '{hook}': {type(e).__name__}: {e}") from e

    return call
