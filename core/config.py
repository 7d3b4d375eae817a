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
class LoraConfig:
    """LoRA adapters through peft (``pip install 'rlfuse[lora]'``); ``r: 0`` = off. docs/lora.md"""

    r: int = 0  # adapter rank; 0 = full fine-tuning
    alpha: float = 16.0  # scale = alpha / r
    dropout: float = 0.0
    target_modules: list[str] | None = None  # null = every linear layer but the lm_head ("all-linear")
    merge_final: bool = False  # also write final/merged: the base with the adapter merged in


@dataclass
class ModelConfig:
    kind: str = "tiny"  # tiny: name_or_path may be null (build the tiny model) | hf: name_or_path required
    name_or_path: str | None = None  # local folder or hub name; null = build the tiny model
    tokenizer: str | None = None  # default: same as name_or_path
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    # Storage dtype of the trained weights; null = what trainer.precision needs (float32
    # masters, bfloat16 for bf16-true). docs/precision.md
    dtype: str | None = None  # null | float32 | bfloat16 | float16
    # frozen reference copy: auto = bfloat16 under trainer.precision=bf16-mixed (autocast computes
    # in bf16 anyway: half the memory, no per-step cast), else the policy's dtype | null | bfloat16 | ...
    ref_dtype: str | None = "auto"
    ref_name_or_path: str | None = None  # default: a frozen copy of the initial policy
    share_prefix: bool = True  # rows with the same prompt run it once per forward, and (vocabulary >= 8192)
    # a prefix common to all prompts once per batch (rlfuse.packing)
    # rows packed into common sequences without padding when that saves >= 15% of the positions
    # (rlfuse.packing; faster on uneven lengths, but off by default: docs/performance.md)
    pack: bool = False
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


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
    fused_optimizer: bool | None = None  # fused AdamW; null = on for a pretrained model (trainer.fused_adamw)
    eval_every: int = 0  # steps between evaluations (0 = only before and after)
    save_every: int = 0  # steps between checkpoints (0 = only the final one)
    keep_last: int = 2  # complete checkpoints kept in <run_dir>/checkpoints
    # auto: continue from the newest complete checkpoint in the run dir, or start fresh;
    # true: continue, and fail if there is none; false: start fresh (fails on an earlier run).
    resume: Any = "auto"
    resume_allow_changes: bool = False  # resume although the config differs from the checkpoint's
    nonfinite: str = "stop"  # NaN/Inf reward, loss term or grad norm: stop (error) | skip (the update)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch.set_num_threads
    # keep | release | auto: keep freed host memory mapped (glibc) so that the vocabulary-sized
    # tensors of each step do not page-fault again; auto = keep on CPU (core/hostmem.py)
    host_memory: str = "auto"
    progress: bool = True  # console progress bar
    # Compute precision, separate from the weights' dtype (docs/precision.md):
    # auto | fp32 | bf16-mixed | fp16-mixed | bf16-true; auto = bf16-mixed on a bf16 GPU and, for
    # model=hf (a pretrained model), on a CPU with AMX or AVX512-BF16; else fp32
    precision: str = "auto"
    save_dtype: str | None = None  # dtype of final/'s weights: null = the trained weights' dtype
    # Under torchrun: ddp = the ranks train one model (gradients summed, global batch);
    # fsdp = the same, the policy sharded over the ranks (FSDP2, docs/scaling.md);
    # none = one model per rank, combined only by the sync plugin (algo=decentralized).
    strategy: str = "ddp"


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
    # Per-rank overrides under torchrun (heterogeneous agents): agents[r] is a nested mapping
    # merged into rank r's config, e.g. [{}, {reward: {rule: {weight: 0.5}}}].
    agents: list[Any] = field(default_factory=list)
    # Rounds of a pipeline: the stages marked `repeat: true` run this many times in order
    # (iterated / online RLHF: label the current policy -> refresh the RM -> PPO).
    rounds: int = 1


@dataclass
class KernelsConfig:
    backend: str = "auto"  # auto | triton | torch
    # auto | true | false: a loss plugin that can (loss=ppo) computes its term from the final
    # hidden states + lm_head in one fused kernel when it is the only reader of the log-probs
    fused_loss: str = "auto"


@dataclass
class DistConfig:
    """torch.distributed settings, used under torchrun (docs/scaling.md)."""

    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    timeout_s: float = 300.0  # deadline of every collective: a lost peer ends the run after it
    heartbeat_s: float = 1.0  # each rank's liveness beacon in the rendezvous store


@dataclass
class RlfuseConfig:
    seed: int = 0
    run_dir: str | None = None  # default: Hydra's output dir (hydra.run.dir)
    objective: str | None = None  # a summary key the job returns to Hydra (Optuna & co. optimise it)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    dist: DistConfig = field(default_factory=DistConfig)
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

# Keys of a component section that the core consumes itself and never passes to the plugin:
# key -> (the groups whose sections may carry it, its default). The one place they are declared;
# :func:`rlfuse.manager.load_plugins` returns their values per section name.
#   weight: the factor the core multiplies the scores a reward plugin returns under the
#           section's name by, before summing them into ``batch.rewards`` (docs/hooks.md).
CORE_SECTION_KEYS: dict[str, tuple[tuple[str, ...], Any]] = {
    "weight": (("reward",), 1.0),
}


def check(cfg: Any) -> None:
    """Reject top-level keys the schema does not know (``+trainr.x=1`` is a typo, not a new
    setting); Hydra's struct mode already rejects unknown nested keys."""
    import dataclasses

    from rlfuse.errors import ConfigError

    known = {f.name for f in dataclasses.fields(RlfuseConfig)} | {"hydra"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(
            ", ".join(unknown), f"unknown config key(s) at the top level. Known: {', '.join(sorted(known - {'hydra'}))}"
        )


def register_configs() -> None:
    """Store the root schema and, under ``plugin_defaults/<name>``, every installed plugin's
    defaults (from its ``Config`` dataclass; see :func:`rlfuse.manager.plugin_defaults`); put
    plugin packages' config files on Hydra's search path (:mod:`rlfuse.searchpath`)."""
    from rlfuse import searchpath
    from rlfuse.manager import plugin_defaults

    cs = ConfigStore.instance()
    cs.store(name="rlfuse_schema", node=RlfuseConfig)
    for name, node in plugin_defaults().items():
        cs.store(group="plugin_defaults", name=name, node=node)
    searchpath.enable()


# --------------------------------------------------------------------- range checks

DEVICE_KINDS = ("auto", "cpu", "cuda", "mps")


def check_ranges(cfg: Any) -> None:
    """Check the ranges of the core's settings before anything is built: one
    :class:`~rlfuse.errors.ConfigError` naming the key and the allowed values.

    Types are the schema's business (Hydra rejects ``trainer.max_steps=abc``); component
    sections are checked by each plugin's ``Config`` (see :mod:`rlfuse.manager`).
    """
    import math

    from omegaconf import OmegaConf

    from rlfuse.errors import ConfigError, one_of, require

    t, a, m, d = cfg.trainer, cfg.algo, cfg.model, cfg.data
    require(t.max_steps >= 1, "trainer.max_steps", ">= 1", t.max_steps)
    require(t.epochs >= 1, "trainer.epochs", ">= 1", t.epochs)
    for key in ("mini_batch_size", "micro_batch_size", "threads"):
        v = t[key]
        require(v is None or v >= 1, f"trainer.{key}", ">= 1 or null", v)
    if t.mini_batch_size and t.micro_batch_size:
        require(t.micro_batch_size <= t.mini_batch_size, "trainer.micro_batch_size",
                f"<= trainer.mini_batch_size ({t.mini_batch_size})", t.micro_batch_size)
    require(t.weight_decay >= 0, "trainer.weight_decay", ">= 0", t.weight_decay)
    betas = list(t.betas)
    require(len(betas) == 2 and all(0 <= b < 1 for b in betas), "trainer.betas", "two numbers in [0, 1)", betas)
    require(t.eps > 0, "trainer.eps", "> 0", t.eps)
    require(t.warmup_steps >= 0, "trainer.warmup_steps", ">= 0", t.warmup_steps)
    one_of("trainer.schedule", t.schedule, ("constant", "cosine", "linear"))
    require(0 <= t.min_lr_ratio <= 1, "trainer.min_lr_ratio", "in [0, 1]", t.min_lr_ratio)
    g = t.max_grad_norm
    require(g is None or (g > 0 and math.isfinite(g)), "trainer.max_grad_norm", "> 0 or null", g)
    require(t.eval_every >= 0, "trainer.eval_every", ">= 0 (0 = only before and after)", t.eval_every)
    require(t.save_every >= 0, "trainer.save_every", ">= 0 (0 = only the final checkpoint)", t.save_every)
    require(t.keep_last >= 1, "trainer.keep_last", ">= 1", t.keep_last)
    one_of("trainer.resume", t.resume, ("auto", True, False))
    one_of("trainer.nonfinite", t.nonfinite, ("stop", "skip"))
    one_of("trainer.host_memory", t.host_memory, ("auto", "keep", "release"))
    kind, _, index = str(t.device).partition(":")
    require(kind in DEVICE_KINDS and (not index or (kind == "cuda" and index.isdigit())), "trainer.device",
            "auto, cpu, cuda, cuda:N or mps", t.device)
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("trainer.device", "asks for CUDA, which is not available on this machine", t.device)
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError("trainer.device", f"names a GPU this machine lacks ({torch.cuda.device_count()} visible)", t.device)
    require(a.lr > 0 and math.isfinite(a.lr), "algo.lr", "> 0", a.lr)
    one_of("model.kind", m.kind, ("tiny", "hf"))
    if OmegaConf.is_missing(m, "name_or_path") or (m.kind == "hf" and not m.name_or_path):
        raise ConfigError("model.name_or_path", "is required by this model config (a local folder or hub name)")
    one_of("model.dtype", m.dtype, (None, "float32", "bfloat16", "float16"))
    one_of("model.ref_dtype", m.ref_dtype, (None, "auto", "float32", "bfloat16", "float16"))
    one_of("trainer.save_dtype", t.save_dtype, (None, "float32", "bfloat16", "float16"))
    one_of("trainer.precision", t.precision, ("auto", "fp32", "bf16-mixed", "fp16-mixed", "bf16-true"))
    tiny = m.tiny
    for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
        require(tiny[key] >= 1, f"model.tiny.{key}", ">= 1", tiny[key])
    require(tiny.hidden_size % tiny.num_heads == 0, "model.tiny.hidden_size",
            f"a multiple of model.tiny.num_heads ({tiny.num_heads})", tiny.hidden_size)
    require(d.max_prompt_length >= 1, "data.max_prompt_length", ">= 1", d.max_prompt_length)
    require(d.max_length >= 1, "data.max_length", ">= 1", d.max_length)
    one_of("data.truncation", d.truncation, ("left", "error"))
    one_of("kernels.backend", cfg.kernels.backend, ("auto", "triton", "torch"))
    one_of("kernels.fused_loss", str(cfg.kernels.get("fused_loss", "auto")).lower(), ("auto", "true", "false"))
