"""The ``rlfuse`` command: Hydra composes the config, :func:`rlfuse.pipeline.run` runs it.

``rlfuse`` alone runs the embedded default job; ``rlfuse --cfg job`` prints the composed
config; ``rlfuse -m a=1,2`` runs a sweep. ``rlfuse NAME ARGS`` runs a sub-command registered
under the entry-point group ``rlfuse.commands`` (built in: ``label``, which collects human
preferences) -- plugins add commands the same way they add hooks.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rlfuse.config import register_configs

register_configs()


@hydra.main(config_path="pkg://rlfuse.conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> Any:
    from rlfuse import distributed, runinfo
    from rlfuse.pipeline import run
    from rlfuse.report import objective, print_summary

    hc = HydraConfig.get()
    with runinfo.of_job(hc), distributed.exit_on_failure():  # sweep info; a failed rank tells its peers
        summary = run(cfg, list(hc.overrides.task), cfg.run_dir or hc.runtime.output_dir)
    if distributed.current().is_main:
        print_summary(summary, cfg.run_dir or hc.runtime.output_dir)
    distributed.shutdown()
    return objective(summary, cfg.get("objective"))


def commands() -> dict[str, Any]:
    """Sub-commands: entry-point name -> entry point (group ``rlfuse.commands``)."""
    return {ep.name: ep for ep in entry_points(group="rlfuse.commands")}


def main() -> None:
    from rlfuse.help import handle_help

    handle_help(sys.argv)  # `rlfuse --help` (rlfuse's own) exits; `--hydra-help` becomes Hydra's
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-") and "=" not in sys.argv[1]:
        cmds = commands()
        if sys.argv[1] not in cmds:
            sys.exit(f"rlfuse: unknown command '{sys.argv[1]}' (commands: {', '.join(sorted(cmds))}; "
                     "or give config overrides like key=value)")
        sys.exit(cmds[sys.argv[1]].load()(sys.argv[2:]))
    try:
        _hydra_main()
    except KeyboardInterrupt:
        print("\n[rlfuse] interrupted; the last checkpoint and metrics on disk are intact.", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
