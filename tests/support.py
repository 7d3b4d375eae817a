"""Helpers for tests: compose rlfuse configs the way the CLI does and run tiny jobs.

Importable from any test as ``from support import FAST, compose, run_job`` (pytest puts
tests/ on sys.path, see pyproject).
"""

from __future__ import annotations

# A few-second PPO job on the built-in task (no warm-up, tiny batches).
FAST = [
    "algo=ppo",
    "algo.warmup=null",
    "trainer.max_steps=2",
    "trainer.progress=false",
    "rollout.batch_size=8",
    "trainer.mini_batch_size=4",
    "trainer.epochs=1",
    "eval.task.num_prompts=8",
]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from rlfuse.config import register_configs

    register_configs()  # plugin packages' config files on the search path, as the CLI has them

    with initialize_config_module("rlfuse.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def run_job(overrides: list[str], run_dir):
    """Compose and run like `rlfuse OVERRIDES run_dir=RUN_DIR`; return the summary."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from rlfuse.config import register_configs
    from rlfuse.pipeline import run

    register_configs()
    overrides = list(overrides) + [f"run_dir={run_dir}"]
    with initialize_config_module("rlfuse.conf", version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
        return run(cfg, overrides, run_dir)
