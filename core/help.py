"""``rlfuse --help``: rlfuse's own help page (Hydra's is ``rlfuse --hydra-help``).

Everything listed is read from what is installed, never hard-coded: the sub-commands from the
entry-point group ``rlfuse.commands`` (their module docstring's first line, read without
importing them), the config groups and their options from rlfuse's config tree plus every
plugin package's (``rlfuse.configs``), the default of each group from ``config.yaml``.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from importlib import resources
from typing import Any

from rlfuse import searchpath
from rlfuse.manager import enabled_entry_points

COMMON = [
    ("algo=grpo", "pick a preset (sft, reward_model, dpo, ppo, grpo, rloo, rlhf, ...)"),
    ("model.name_or_path=Qwen/Qwen2.5-0.5B", "a Hugging Face causal LM (default: a tiny model built locally)"),
    ("algo.lr=1e-5 trainer.max_steps=200", "learning rate, training steps"),
    ("'reward=[rule,length]' advantage=rloo", "swap components: one override per group"),
    ("'logger=[jsonl,console,wandb]'", "add Weights & Biases tracking (docs/tracking.md)"),
    ("run_dir=runs/x trainer.resume=true", "where the run writes; continue from its last checkpoint"),
    ("-m seed=0,1,2 algo.lr=1e-5,3e-5", "a sweep (Hydra multirun): one job per combination"),
    ("--cfg job", "print the composed config and exit"),
]


def _doc_line(target: str) -> str:
    """First line of the docstring of an entry point's module, read without importing it."""
    module = target.split(":")[0]
    try:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return ""
        with open(spec.origin, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
    except Exception:  # noqa: BLE001 - help never fails on a broken plugin
        return ""
    line = doc.strip().splitlines()[0] if doc.strip() else ""
    return line.split(": ", 1)[-1] if line.startswith("``rlfuse") else line


def defaults() -> dict[str, Any]:
    """Group -> default option(s), from the root config's defaults list."""
    from omegaconf import OmegaConf

    text = (resources.files(searchpath.BUILTIN) / "config.yaml").read_text()
    out: dict[str, Any] = {}
    for item in OmegaConf.create(text).get("defaults", []):
        if not isinstance(item, str) and hasattr(item, "items"):
            for k, v in item.items():
                out[str(k)] = v if not hasattr(v, "__iter__") or isinstance(v, str) else list(v)
    return out


def render() -> str:
    lines = [
        "usage: rlfuse [OVERRIDE ...]            run a job (default: the RLHF pipeline on a tiny model)",
        "       rlfuse -m [OVERRIDE ...]         run a sweep, one job per combination",
        "       rlfuse COMMAND [ARGS ...]        run a sub-command (rlfuse COMMAND --help)",
        "",
        "commands:",
    ]
    cmds = {ep.name: ep.value for ep in enabled_entry_points("rlfuse.commands")}
    width = max([len(c) for c in cmds] + [8])
    for name in sorted(cmds):
        lines.append(f"  {name:<{width}}  {_doc_line(cmds[name])}")
    lines += ["", "config groups (GROUP=OPTION; a list group takes GROUP=[a,b]; * = default):"]
    dflt = defaults()
    srcs = [s for s in searchpath.ordered(searchpath.sources()) if s.error is None]
    groups: dict[str, list[tuple[str, str]]] = {}
    for s in srcs:
        for g, opts in s.options.items():
            for o in opts:
                if all(o != seen for seen, _ in groups.get(g, [])):
                    groups.setdefault(g, []).append((o, "" if s.name == "builtin" else s.dist or s.name))
    gw = max([len(g) for g in groups] + [6])
    for g in sorted(groups, key=lambda g: (g not in dflt, g)):
        chosen = dflt.get(g)
        chosen = set(chosen) if isinstance(chosen, list) else {chosen}
        shown = [f"{o}{'*' if o in chosen else ''}{f' ({d})' if d else ''}" for o, d in sorted(groups[g])]
        lines.append(f"  {g:<{gw}}  {' '.join(shown)}")
    broken = [s for s in searchpath.sources(builtin=False) if s.error]
    for s in broken:
        lines.append(f"  (config package '{s.name}' of {s.dist or '?'} could not be read: {s.error})")
    lines += ["", "common overrides:"]
    cw = max(len(c) for c, _ in COMMON)
    lines += [f"  rlfuse {c:<{cw}}  {d}" for c, d in COMMON]
    lines += [
        "",
        "more: rlfuse plugins (installed plugins, their hooks and config files);",
        "      rlfuse --hydra-help (Hydra's own flags: --cfg, --info, --multirun, ...);",
        "      RLFUSE_DISABLE_PLUGIN_AUTOLOAD=1 / RLFUSE_PLUGINS=a,b load only built-in / listed plugins.",
        "docs: docs/tracking.md, docs/writing-a-plugin.md, docs/tutorial-plugin.md",
    ]
    return "\n".join(lines)


def handle_help(argv: list[str]) -> None:
    """Print rlfuse's help and exit on ``rlfuse --help`` / ``-h`` (and ``rlfuse help``);
    turn ``--hydra-help`` into Hydra's ``--help`` in ``argv``. A sub-command's own
    ``--help`` (``rlfuse plot --help``) is left to it."""
    args = argv[1:]
    if args and not args[0].startswith("-") and "=" not in args[0] and args[0] != "help":
        return  # a sub-command
    if "--hydra-help" in args:
        argv[argv.index("--hydra-help")] = "--help"
        return
    if args[:1] == ["help"] or any(a in ("-h", "--help") for a in args):
        print(render())
        sys.exit(0)
