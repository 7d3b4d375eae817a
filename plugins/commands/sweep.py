"""``rlfuse sweep check FILE``: check a W&B sweep file against rlfuse's config before launching it.

A W&B sweep drives ``rlfuse`` through ``wandb agent``, which runs the sweep's ``command`` with
the sampled parameters; rlfuse takes them as Hydra overrides, so the command must end with
``${args_no_hyphens}`` (``key=value``, not ``--key=value``)::

    command: [rlfuse, algo=grpo, "logger=[jsonl,console,wandb]", "${args_no_hyphens}"]

The check composes the *corners* of the search space -- every value of each ``values`` list,
``min`` and ``max`` of each range -- together with the command's fixed overrides (all
combinations, or, beyond ``--max-combinations``, a set in which every value appears at least
once), validates every plugin section against its plugin's ``Config``, and fails on any corner
that does not compose: a group swap whose option lacks a swept key (``advantage=[gae,grpo]``
with ``advantage.lam``), a parameter named ``+key`` or ``~key`` (W&B cannot pass those), a
command without ``${args_no_hyphens}``. Exit status 0 when every corner composes, 1 otherwise,
2 for a file that is not a sweep.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import sys
from pathlib import Path
from typing import Any

import yaml

MACRO = "${args_no_hyphens}"


class SweepFileError(ValueError):
    """The file is not a usable W&B sweep for rlfuse."""


def load(path: Path) -> dict[str, Any]:
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SweepFileError(f"{path}: cannot read: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("parameters"), dict) or not spec["parameters"]:
        raise SweepFileError(f"{path}: a W&B sweep needs a 'parameters' mapping")
    return spec


def fixed_overrides(spec: dict[str, Any], path: Path) -> list[str]:
    """The command's own overrides; fails unless the command passes ``${args_no_hyphens}``."""
    cmd = spec.get("command")
    if not cmd or MACRO not in cmd:
        raise SweepFileError(
            f"{path}: 'command' must pass the parameters as Hydra overrides: "
            f"command: [rlfuse, ..., \"{MACRO}\"] (W&B's default passes --key=value, which rlfuse rejects)")
    return [str(c) for c in cmd if "=" in str(c) and not str(c).startswith("${")]


def corners(name: str, p: Any, path: Path) -> list[Any]:
    """The values of one parameter that the check composes."""
    if not isinstance(p, dict):
        raise SweepFileError(f"{path}: parameters.{name} must be a mapping (values:, value:, or min:/max:)")
    if "parameters" in p:
        raise SweepFileError(f"{path}: parameters.{name}: nested parameters are not passed as overrides; use dotted names")
    if "values" in p:
        return list(p["values"])
    if "value" in p:
        return [p["value"]]
    if "min" in p and "max" in p:
        return [p["min"], p["max"]]
    raise SweepFileError(f"{path}: parameters.{name} has no values, value or min/max")


def combinations(params: dict[str, list[Any]], limit: int) -> list[dict[str, Any]]:
    """Every combination when there are at most ``limit``, else a covering set."""
    names = list(params)
    total = 1
    for v in params.values():
        total *= len(v)
    if total <= limit:
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*params.values())]
    width = max(len(v) for v in params.values())
    return [{n: params[n][i % len(params[n])] for n in names} for i in range(width)]


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return str(v)


def check_plugins(cfg: Any) -> None:
    """Validate every component section against its plugin's ``Config`` (no plugin is started)."""
    from omegaconf import OmegaConf

    from rlfuse.config import MULTI_GROUPS, SINGLE_GROUPS
    from rlfuse.manager import resolve, validate

    for group in SINGLE_GROUPS + MULTI_GROUPS:
        node = cfg.get(group) or {}
        sections = {group: node} if group in SINGLE_GROUPS else dict(node)
        for key, section in sections.items():
            if not section:
                continue
            where = group if group in SINGLE_GROUPS else f"{group}.{key}"
            opts = OmegaConf.to_container(section, resolve=True)
            if "plugin" not in opts:
                raise ValueError(f"Config error at '{where}': missing 'plugin'")
            obj = resolve(opts.pop("plugin"))
            opts.pop("weight", None)
            if inspect.ismodule(obj) and isinstance(getattr(obj, "Plugin", None), type):
                obj = obj.Plugin
            schema = getattr(obj, "Config", None)
            if schema is not None:
                validate(schema, opts, where=where)


def check(path: Path, limit: int = 256) -> tuple[int, list[tuple[str, str]]]:
    """(number of corners composed, [(overrides, error), ...] of those that failed)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from rlfuse.config import check as check_top
    from rlfuse.config import register_configs

    spec = load(path)
    fixed = fixed_overrides(spec, path)
    bad = [n for n in spec["parameters"] if str(n).startswith(("+", "~"))]
    if bad:
        raise SweepFileError(
            f"{path}: parameter(s) {', '.join(map(str, bad))}: W&B cannot pass '+key'/'~key' names; "
            "put the key in the option's YAML (or an experiment file) and sweep it by its plain name")
    params = {str(n): corners(str(n), p, path) for n, p in spec["parameters"].items()}
    combos = combinations(params, limit)
    failures: list[tuple[str, str]] = []
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module("rlfuse.conf", version_base="1.3"):
        for combo in combos:
            over = fixed + [f"{k}={_value(v)}" for k, v in combo.items()]
            try:
                cfg = compose(config_name="config", overrides=over)
                check_top(cfg)
                check_plugins(cfg)
            except Exception as e:  # noqa: BLE001 - every failure is reported
                msg = " ".join(str(e).split("\n")[:2]).strip()
                failures.append((" ".join(f"{k}={_value(v)}" for k, v in combo.items()), f"{type(e).__name__}: {msg}"))
    return len(combos), failures


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="rlfuse sweep", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="action", required=True)
    c = sub.add_parser("check", help="compose the corners of a W&B sweep file's search space")
    c.add_argument("file", type=Path)
    c.add_argument("--max-combinations", type=int, default=256)
    args = ap.parse_args(argv)
    try:
        n, failures = check(args.file, args.max_combinations)
    except SweepFileError as e:
        print(f"rlfuse sweep: {e}", file=sys.stderr)
        return 2
    for combo, err in failures:
        print(f"FAILED {combo}: {err}")
    print(f"{args.file}: {n - len(failures)}/{n} corners of the search space compose")
    return 1 if failures else 0
