"""Multi-stage presets (pipelines), e.g. SFT -> reward model -> PPO.

A preset whose ``algo.stages`` is non-empty is a pipeline. Each stage is an ordinary
single-stage job composed from the same config tree::

    algo:
      name: rlhf
      stages:
        sft:   {algo: sft, overrides: [trainer.max_steps=200]}
        rm:    {algo: reward_model}
        ppo:   {algo: ppo, init_from: sft, overrides: ["reward=model", "reward.model.path={run_dir}/rm/final"]}
      summary: {eval/reward_sft: ppo/eval/reward_before}

Stage ``s`` runs in ``<run_dir>/<s>`` with the overrides ``algo=<algo>``, the stage's own
overrides (``{run_dir}`` is replaced by the pipeline's run dir), then the user's command-line
overrides (except ``algo=``), so ``rlfuse trainer.max_steps=5`` shortens every stage. A stage
with ``algo_overrides: false`` (the warm-up) does not take the user's ``algo.*`` overrides:
``rlfuse algo=grpo algo.lr=5e-4`` sets GRPO's learning rate, not the SFT warm-up's.
``init_from: other`` starts the stage from ``<run_dir>/<other>/final``. A stage whose
``summary.json`` exists is skipped, so re-running an interrupted pipeline continues it: the
interrupted stage resumes from its newest checkpoint (``trainer.resume=auto``), later
stages start fresh. Every stage's config is composed and validated (ranges, plugin options)
before the first one trains.

Rounds: stages marked ``repeat: true`` form a block that runs ``algo.rounds`` times (e.g.
label the current policy -> refresh the reward model -> PPO, the iterated "online" RLHF of
Bai et al. 2022). Round 1 of stage ``s`` runs in ``<run_dir>/<s>``, round ``r`` > 1 in
``<run_dir>/<s>_r<r>``. Within a stage, ``{round}`` is the round number (1 for a stage
that is not repeated) and ``{stage_dir:NAME}`` the run dir of the latest run of stage
``NAME`` before this one (``{stage_dir:ppo,sft}``: of ppo, or of sft when ppo has not run); ``init_from`` may list several stages, the first that has already
run wins (``init_from: [ppo, sft]``: the previous round's policy, or SFT in round 1). In
``summary``, ``NAME/key`` reads the first run of a repeated stage and ``NAME@last/key`` its
last run.

A single-stage preset with ``algo.warmup`` (the RL presets: a randomly initialised tiny
model cannot be trained by RL alone) becomes the pipeline ``warmup -> preset`` when the
policy is built from scratch (``model.name_or_path`` null).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlfuse import distributed
from rlfuse.checkpoint import latest_checkpoint
from rlfuse.config import check, check_ranges
from rlfuse.errors import ConfigError
from rlfuse.manager import check_sections
from rlfuse.trainer import train, write_json_atomic

STAGE_KEYS = {"algo", "overrides", "init_from", "algo_overrides", "repeat"}


def run(cfg: DictConfig, overrides: list[str] | None = None, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run ``cfg``: a single job, or every stage of a pipeline preset."""
    check(cfg)
    check_ranges(cfg)
    dist = distributed.init_from(cfg)
    # under torchrun every rank must use rank 0's run dir (Hydra's timestamps may differ)
    run_dir = Path(dist.all_gather_object(str(run_dir or cfg.run_dir or "outputs/run"), what="run dir")[0])
    if cfg.algo.get("stages"):
        return run_pipeline(cfg, overrides or [], run_dir)
    if cfg.algo.get("warmup") and cfg.model.name_or_path is None:
        return run_pipeline(with_warmup(cfg), overrides or [], run_dir)
    return train(cfg, run_dir)


def with_warmup(cfg: DictConfig) -> DictConfig:
    """A two-stage pipeline: the preset's warm-up, then the preset itself from its result.

    The preset's own stage must not warm up again, hence ``algo.warmup=null`` there.
    """
    name = cfg.algo.name
    stages = {
        "warmup": {**dict(cfg.algo.warmup), "algo_overrides": False},
        name: {"algo": name, "init_from": "warmup", "overrides": ["algo.warmup=null"]},
    }
    summary = {"eval/*": f"{name}/eval/*"}
    return OmegaConf.create({"algo": {"name": name, "stages": stages, "summary": summary}})


def run_pipeline(cfg: DictConfig, overrides: list[str], run_dir: Path) -> dict[str, Any]:
    main = distributed.current().is_main  # only rank 0 writes the pipeline's files
    # the user's overrides reach every stage, except the preset choice itself and run dirs
    # (overrides of the pipeline's own shape -- algo.stages/summary/warmup -- stay here)
    user = [
        o
        for o in overrides
        if _key(o) not in ("algo", "run_dir")
        and not _key(o).startswith(("hydra.", "algo.stages", "algo.summary", "algo.warmup", "algo.rounds"))
    ]
    summary: dict[str, Any] = {"algo": cfg.algo.name, "stages": {}}
    metrics_lines: list[str] = []
    last = None
    plans = []  # compose every stage first: a bad override fails before any training
    resume_true = any(_key(o) == "trainer.resume" and o.split("=", 1)[1].strip().lower() == "true" for o in user)
    used: set[str] = set()
    for name, stage in cfg.algo.stages.items():
        unknown = set(stage) - STAGE_KEYS
        if unknown:
            raise ValueError(f"algo.stages.{name}: unknown keys {sorted(unknown)}; allowed: {sorted(STAGE_KEYS)}")
        if not stage.get("algo"):
            raise ValueError(f"algo.stages.{name}: missing 'algo' (the preset this stage runs)")
    runs = expand_rounds(cfg)
    for i, (name, base_name, rnd, stage) in enumerate(runs):
        stage_dir = run_dir / name
        base = [f"algo={stage.algo}"]
        base += [_fill(o, run_dir, rnd, runs[:i], f"algo.stages.{base_name}") for o in stage.get("overrides") or []]
        if stage.get("init_from"):
            src = _latest(stage.init_from, runs[:i], f"algo.stages.{base_name}.init_from")
            base.append(f"model.name_or_path={run_dir / src / 'final'}")
        base.append(f"run_dir={stage_dir}")
        mine = user if stage.get("algo_overrides", True) else [o for o in user if not _key(o).startswith("algo.")]
        # a user override reaches every stage whose config has that key (eval.task.* does not
        # reach the reward-model stage, which has no eval=task)
        plain = _compose(base)
        mine = [o for o in mine if _applies(plain, o)]
        used.update(mine)
        stage_over = base + mine
        if resume_true and latest_checkpoint(stage_dir) is None:
            stage_over.append("trainer.resume=auto")  # `true` is for the interrupted stage; later ones start
        stage_cfg = _compose(stage_over)
        check_ranges(stage_cfg)
        check_sections(stage_cfg)
        plans.append((name, stage, stage_dir, stage_over, stage_cfg))
    unused = [o for o in user if o not in used]
    if unused:
        raise ConfigError(
            ", ".join(_key(o) for o in unused), f"override(s) {unused} match no key in any stage of algo={cfg.algo.name}"
        )
    if resume_true and not any(
        (d / "summary.json").exists() or latest_checkpoint(d) for _, _, d, _, _ in plans
    ):
        raise ConfigError("trainer.resume", f"is true, but no stage of {run_dir} has a checkpoint or has finished")
    run_dir.mkdir(parents=True, exist_ok=True)  # every stage checked: now write
    if main:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    for name, stage, stage_dir, stage_over, stage_cfg in plans:
        done = stage_dir / "summary.json"
        if done.exists():
            if main:
                print(f"[rlfuse] stage '{name}': already done ({done}), skipped")
            result = json.loads(done.read_text())
        else:
            if main:
                print(f"[rlfuse] stage '{name}': algo={stage.algo}")
            result = run(stage_cfg, stage_over, stage_dir)
        summary["stages"][name] = result
        if (stage_dir / "metrics.jsonl").exists():
            for line in (stage_dir / "metrics.jsonl").read_text().splitlines():
                row = json.loads(line)
                row["stage"] = name
                metrics_lines.append(json.dumps(row))
        last = name
    if not main:
        return summary
    (run_dir / "metrics.jsonl").write_text("\n".join(metrics_lines) + ("\n" if metrics_lines else ""))
    for key, src in (cfg.algo.get("summary") or {}).items():
        if key.endswith("*"):  # "eval/*": "dpo/eval/*" copies every matching key
            stage, _, prefix = src.partition("/")
            stage = _run_name(stage, runs)
            for k, v in (summary["stages"].get(stage) or {}).items():
                if k.startswith(prefix.rstrip("*")):
                    summary[key.rstrip("*") + k[len(prefix.rstrip("*")):]] = v
        else:
            stage, _, rest = src.partition("/")
            summary[key] = _lookup(summary["stages"], f"{_run_name(stage, runs)}/{rest}")
    if last is not None:
        link = run_dir / "final"
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(Path(last) / "final", link)
        summary["final_policy"] = str(run_dir / last / "final")
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


Run = tuple  # (run name, stage name, round, stage config)


def expand_rounds(cfg: DictConfig) -> list[Run]:
    """The stages in the order they run: each block of consecutive ``repeat: true`` stages
    is repeated ``algo.rounds`` times; round ``r`` > 1 of stage ``s`` is named ``s_r<r>``."""
    rounds = 1 if cfg.algo.get("rounds") is None else int(cfg.algo.rounds)
    if rounds < 1:
        raise ValueError(f"algo.rounds must be >= 1, got {rounds}")
    items = list(cfg.algo.stages.items())
    out: list[Run] = []
    i = 0
    while i < len(items):
        if not items[i][1].get("repeat"):
            out.append((items[i][0], items[i][0], 1, items[i][1]))
            i += 1
            continue
        j = i
        while j < len(items) and items[j][1].get("repeat"):
            j += 1
        for r in range(1, rounds + 1):
            for name, stage in items[i:j]:
                out.append((name if r == 1 else f"{name}_r{r}", name, r, stage))
        i = j
    return out


def _latest(names: Any, before: list[Run], where: str) -> str:
    """The run name of the latest earlier run of the first stage in ``names`` that has one."""
    wanted = [names] if isinstance(names, str) else list(names)
    for want in wanted:
        for run_name, base, _, _ in reversed(before):
            if base == want:
                return run_name
    raise ValueError(f"{where}: none of {wanted} runs before this stage")


def _fill(override: str, run_dir: Path, rnd: int, before: list[Run], where: str) -> str:
    """Replace ``{run_dir}``, ``{round}`` and ``{stage_dir:NAME}`` in a stage override."""
    out = override.replace("{run_dir}", str(run_dir)).replace("{round}", str(rnd))
    while "{stage_dir:" in out:
        start = out.index("{stage_dir:")
        end = out.index("}", start)
        names = out[start + len("{stage_dir:") : end].split(",")  # {stage_dir:ppo,sft}: first that ran
        out = out[:start] + str(run_dir / _latest(names, before, where)) + out[end + 1 :]
    return out


def _run_name(ref: str, runs: list[Run]) -> str:
    """``NAME`` -> the first run of stage NAME; ``NAME@last`` -> its last run."""
    name, _, which = ref.partition("@")
    matches = [r[0] for r in runs if r[1] == name]
    if not matches:
        return name
    return matches[-1] if which == "last" else matches[0]


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from rlfuse.config import register_configs

    register_configs()  # idempotent: plugin packages' config files are on the search path
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=overrides)
    with initialize_config_module("rlfuse.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _applies(cfg: DictConfig, override: str) -> bool:
    """Whether a command-line override addresses something that exists in ``cfg``."""
    if override.startswith("+"):
        return True
    key = _key(override)
    return OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT


_ABSENT = object()


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _lookup(stages: dict[str, Any], src: str) -> Any:
    """``stage/key`` -> the value of ``key`` in that stage's summary (None if absent)."""
    stage, _, key = src.partition("/")
    return (stages.get(stage) or {}).get(key)
