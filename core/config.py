"""Structured-config schemas for the parts of the config the core reads.

The YAML tree in ``rlfuse.conf`` is validated against :class:`RlfuseConfig`, so a misspelt
key or a wrong type in ``trainer``, ``model``, ``data``, ``algo`` or ``kernels`` is an error
naming the key. Component groups (``rollout``, ``reward``, ``advantage``, ``loss``, ``sync``,
``logger``, ``eval``) are validated when their plugin is loaded, against the plugin's own
``Config`` dataclass (see :mod:`rlfuse.manager`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TinyModelConfig:
    """A small Llama-style model built locally from a transformers config (no download)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 64


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # local folder or hub name; null = build the tiny model
    tokenizer: str | None = None  # default: same as name_or_path
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: str = "float32"  # float32 | bfloat16 | float16
    ref_name_or_path: str | None = None  # default: a frozen copy of the initial policy
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    """Where the records come from. Paths may be ``pkg://package/relative/path``."""

    name: str = "custom"
    prompts: str | None = None  # JSONL rows with a `prompt` (or `messages`) field: online RL
    eval_prompts: str | None = None  # held-out prompts for evaluation
    sft: str | None = None  # JSONL demonstrations: `prompt` + `completion`, or `messages`
    preferences: str | None = None  # JSONL pairs: `prompt`, `chosen`, `rejected`
    eval_preferences: str | None = None
    reward_fn: str | None = None  # `module:function` giving the task's true reward
    max_prompt_length: int = 64  # tokens
    max_length: int = 128  # prompt + response tokens, offline data
    truncation: str = "left"  # what to do with a longer prompt: left | error


@dataclass
class TrainerConfig:
    max_steps: int = 100  # training steps (one rollout each)
    epochs: int = 1  # optimisation passes over each rollout (PPO epochs)
    mini_batch_size: int | None = None  # sequences per optimiser step; null = whole rollout
    micro_batch_size: int | None = None  # sequences per forward/backward; null = mini-batch
    shuffle: bool = True  # shuffle the rollout before cutting mini-batches
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0  # optimiser steps of linear warm-up
    schedule: str = "constant"  # constant | cosine | linear
    min_lr_ratio: float = 0.0  # floor of the cosine/linear decay, as a fraction of lr
    max_grad_norm: float | None = 1.0
    eval_every: int = 0  # steps between evaluations (0 = only before and after)
    save_every: int = 0  # steps between checkpoints (0 = only the final one)
    resume: bool = False  # continue from the last checkpoint in the run dir
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch.set_num_threads
    progress: bool = True  # console progress bar


@dataclass
class AlgoConfig:
    name: str = MISSING
    lr: float = 1e-5
    # A multi-stage preset (a pipeline): stage name -> {overrides: [...], init_from: stage}.
    stages: dict[str, Any] = field(default_factory=dict)
    # Pipeline summary figures: name -> "stage/key" in that stage's summary.json.
    summary: dict[str, str] = field(default_factory=dict)
    # A warm-up stage ({algo: sft, overrides: [...]}) run first when the policy is the tiny
    # model built from scratch (model.name_or_path is null); ignored for a given model.
    warmup: dict[str, Any] | None = None
    # Rounds of a pipeline: the stages marked `repeat: true` run this many times in order
    # (iterated / online RLHF: label the current policy -> refresh the RM -> PPO).
    rounds: int = 1


@dataclass
class KernelsConfig:
    backend: str = "auto"  # auto | triton | torch


@dataclass
class RlfuseConfig:
    seed: int = 0
    run_dir: str | None = None  # default: Hydra's output dir (hydra.run.dir)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    # Component groups: validated by each plugin's own Config.
    rollout: dict[str, Any] = field(default_factory=dict)  # {plugin: name, ...options}
    reward: dict[str, Any] = field(default_factory=dict)  # {name: {plugin, weight, ...}}
    advantage: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)  # {name: {plugin, ...}}
    sync: dict[str, Any] = field(default_factory=dict)
    logger: dict[str, Any] = field(default_factory=dict)  # {name: {plugin, ...}}
    eval: dict[str, Any] = field(default_factory=dict)  # {name: {plugin, ...}}
    plugins: dict[str, Any] = field(default_factory=dict)  # extra plugins: {name: {plugin, ...}}
    labeller: dict[str, Any] = field(default_factory=dict)  # who compares two answers (compare hook)


SINGLE_GROUPS = ("rollout", "advantage", "sync", "labeller")  # one section with a `plugin` key
MULTI_GROUPS = ("reward", "loss", "logger", "eval", "plugins")  # {name: section}


def check(cfg: Any) -> None:
    """Reject top-level keys the schema does not know (``+trainr.x=1`` is a typo, not a new
    setting); Hydra's struct mode already rejects unknown nested keys."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(RlfuseConfig)} | {"hydra"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(
            f"Unknown config key(s) at the top level: {', '.join(unknown)}. Known: {', '.join(sorted(known - {'hydra'}))}"
        )


def register_configs() -> None:
    ConfigStore.instance().store(name="rlfuse_schema", node=RlfuseConfig)
