"""rlfuse vs TRL: tokens/s and peak memory of DPO, GRPO and PPO steps on the same work.

    python tests/benchmarks/bench_vs_trl.py [--model PATH|tiny] [--precisions fp32,bf16-mixed]
        [--steps N] [--warmup N] [--repeats 3] [--algos dpo,grpo,ppo] [--threads 2]
        [--trl-python /work/trl-venv/bin/python] [--trl-ppo-python /work/trl112-venv/bin/python]
        [--omp-wait default|passive|active] [--sides rlfuse,trl] [--json FILE]

A benchmark, not a test. TRL is never a dependency of rlfuse: it lives in scratch venvs
outside the repository, and its side runs in a subprocess with that venv's python::

    python3 -m venv /work/trl-venv                      # DPO, GRPO: a current TRL
    /work/trl-venv/bin/pip install torch==2.13.0 trl==1.16.0 requests
    python3 -m venv /work/trl112-venv                   # PPO: TRL 1.12, the last with PPO
    /work/trl112-venv/bin/pip install torch==2.13.0 trl==1.12.0 requests   (trl.experimental.ppo)

Without a venv the script says how to create it and prints rlfuse's figures alone.

Two workloads
-------------
* ``--model PATH`` (default: SmolLM2-135M-Instruct at $RLFUSE_SMOLLM2, /work/models/smollm2-135m
  or ~/.cache/rlfuse/smollm2-135m when present; make it with tests/benchmarks/get_smollm2.py):
  the **real-model** benchmark. Chat prompts rendered with the model's chat template (its
  default system prompt + a question: most of each DPO row is prompt, as in real preference
  data), small batches so that a step takes seconds on a 2-core CPU (``REAL`` below).
* ``--model tiny``: rlfuse's 100k-parameter tiny Llama and character tokenizer: the
  **overhead** benchmark (Python, plugin dispatch, per-op costs), described below.

Precisions (``--precisions``): ``fp32`` on both sides; ``bf16-mixed`` = fp32 weights and
optimiser, forward/backward under bf16 autocast: TRL ``bf16=True``; rlfuse
``trainer.precision=bf16-mixed`` when the config has that key, else the harness wraps each
training step in ``torch.autocast("cpu", torch.bfloat16)``.

Same work on both sides
-----------------------
* model: the tiny Llama and character tokenizer rlfuse builds (``build_tiny_tokenizer``,
  ``build_tiny_model(ModelConfig(), tok, seed=0)``), saved once with ``save_pretrained`` to
  a temporary folder that both sides load; fp32.
* data: rlfuse's built-in task files (prompts_train.jsonl, preferences.jsonl); the TRL side
  gets the prompt text prefixed with ``<bos>`` so both sides see the same prompt tokens
  (rlfuse prepends BOS itself), and answers end with EOS on both sides.
* hyper-parameters: those of rlfuse's presets (``algo=dpo|grpo|ppo algo.warmup=null``),
  mapped onto TRL's names (see ``trl_*`` below): rows per step, completions per prompt,
  epochs / mini-batches per rollout, max_new_tokens, max_length, lr, clip ranges, KL
  coefficients and estimators.
* threads: ``torch.set_num_threads(--threads)`` in both processes; ``OMP_WAIT_POLICY`` as
  ``--omp-wait`` says, the same in both (default: unset, OpenMP's own; the children import
  torch before rlfuse, so rlfuse's own choice does not apply).

What is measured
----------------
* One *step* = one rollout batch and all its optimiser updates (rlfuse: one trainer step;
  TRL GRPO: ``steps_per_generation * num_iterations`` optimiser steps; TRL PPO and DPO: one
  global step).
* tokens per step = real (non-pad) prompt + completion tokens of the step's sequences,
  counted ONCE per step however many epochs train on them (DPO: chosen and rejected rows
  both count; GRPO/PPO: completion up to and including the first EOS).
* tokens/s = tokens of the timed steps / wall time from the end of the last warm-up step to
  the end of the last timed step (everything a step costs: generation, scoring, reference,
  forward/backward, optimiser, the trainer's own logging).
* peak RSS = ``ru_maxrss`` of the child process at the end; growth = that minus
  ``ru_maxrss`` right after the model(s) are loaded (imports excluded).

Each side runs in its own fresh process; algorithms and sides alternate (rlfuse, TRL,
rlfuse, TRL...) over ``--repeats`` rounds, and the table shows the median with the min-max
range. The ratio is rlfuse tokens/s / TRL tokens/s of the medians of the same run, followed
by the ratio of each round (rlfuse run i / TRL run i, measured back to back). The machine may
be shared: the CPU-time columns (tokens per CPU-second of the process, all threads) are much
less sensitive to other processes than wall time; compare both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
TASK_DATA = REPO / "plugins" / "tasks" / "data"
TASK_MODULE = REPO / "plugins" / "tasks" / "sort_letters.py"
DEFAULT_TRL_PY = "/work/trl-venv/bin/python"
DEFAULT_TRL_PPO_PY = "/work/trl112-venv/bin/python"
TRL_HOWTO = (
    "python3 -m venv /work/trl-venv && /work/trl-venv/bin/pip install torch==2.13.0 trl==1.16.0 requests; "
    "python3 -m venv /work/trl112-venv && /work/trl112-venv/bin/pip install torch==2.13.0 trl==1.12.0 requests"
)
SMOLLM2_DIRS = [os.environ.get("RLFUSE_SMOLLM2", ""), "/work/models/smollm2-135m",
                str(Path.home() / ".cache" / "rlfuse" / "smollm2-135m")]

# The real-model workload: the same numbers on both sides (mapped to TRL's names in trl_child).
REAL = {
    "dpo": {"pairs": 4, "lr": 1e-6, "beta": 0.1, "max_length": 128},
    # on-policy GRPO (TRL's default: one update per generation, no old-log-prob pass), no KL
    "grpo": {"prompts": 2, "n": 4, "new_tokens": 16, "temperature": 1.0, "lr": 1e-6, "beta": 0.0},
    # PPO: 8 prompts, one epoch of two 4-row mini-batches, KL 0.05 (k1) in the reward
    "ppo": {"prompts": 8, "mini_batches": 2, "epochs": 1, "new_tokens": 16, "lr": 1e-6, "kl": 0.05},
}
LETTERS_RE = r"Sort the letters ([a-z]+) "

# rlfuse presets, with what a fair comparison needs switched off (warm-up stage, evaluation).
RLFUSE_OVERRIDES = {
    "dpo": ["algo=dpo", "loss.dpo.eval_pairs=0"],
    "grpo": ["algo=grpo"],
    "ppo": ["algo=ppo"],
}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads)."""
    return time.perf_counter(), time.process_time()


def summarise(side: str, algo: str, clocks: list[tuple[float, float]], tokens: list[float], warmup: int,
              base: float) -> dict:
    """tokens/s over the steps after ``warmup`` (timed from the end of the last warm-up step),
    by wall time and by the process's CPU time (less sensitive to other processes' load)."""
    ends = [w for w, _ in clocks]
    cpus = [c for _, c in clocks]
    if len(ends) <= warmup:
        raise RuntimeError(f"{side}/{algo}: only {len(ends)} steps ran, need more than {warmup}")
    secs = ends[-1] - ends[warmup - 1] if warmup else ends[-1] - ends[0]
    cpu = cpus[-1] - cpus[warmup - 1] if warmup else cpus[-1] - cpus[0]
    timed = tokens[warmup:] if warmup else tokens[1:]
    per_step = [b - a for a, b in zip(ends[max(warmup - 1, 0) : -1], ends[max(warmup, 1) :], strict=True)]
    return {
        "side": side,
        "algo": algo,
        "steps": len(timed),
        "tokens_per_step": sum(timed) / len(timed),
        "step_s": secs / len(timed),
        "step_s_max": max(per_step),
        "tokens_per_s": sum(timed) / secs,
        "tokens_per_cpu_s": sum(timed) / cpu,
        "cpu_per_wall": cpu / secs,
        "peak_rss_mib": peak_mib(),
        "rss_growth_mib": peak_mib() - base,
    }


# ----------------------------------------------------------------------------- rlfuse side


def real_overrides(algo: str, data_dir: str) -> list[str]:
    """rlfuse overrides of the real-model workload (``REAL``)."""
    w = REAL[algo]
    common = ["model=hf", "data=jsonl", "data.max_prompt_length=96", "trainer.schedule=constant", "trainer.warmup_steps=0",
              "trainer.max_grad_norm=1.0"]
    if algo == "dpo":
        return ["algo=dpo", "loss.dpo.eval_pairs=0", f"data.preferences={data_dir}/preferences.jsonl",
                f"rollout.batch_size={w['pairs']}", f"algo.lr={w['lr']}", f"loss.dpo.beta={w['beta']}",
                f"data.max_length={w['max_length']}", *common]
    reward = [f"data.prompts={data_dir}/prompts.jsonl", "data.reward_fn=rlfuse.plugins.tasks.sort_letters:reward"]
    if algo == "grpo":
        return ["algo=grpo", *reward, f"rollout.batch_size={w['prompts']}", f"rollout.n={w['n']}",
                f"rollout.max_new_tokens={w['new_tokens']}", f"rollout.temperature={w['temperature']}",
                f"algo.lr={w['lr']}", f"loss.ppo.kl_coef={w['beta']}", "loss.ppo.clip_high=0.2",
                "trainer.epochs=1", "trainer.mini_batch_size=null", *common]
    return ["algo=ppo", *reward, f"rollout.batch_size={w['prompts']}", f"rollout.max_new_tokens={w['new_tokens']}",
            f"algo.lr={w['lr']}", f"reward.kl_penalty.beta={w['kl']}", f"trainer.epochs={w['epochs']}",
            f"trainer.mini_batch_size={w['prompts'] // w['mini_batches']}", *common]


def rlfuse_child(algo: str, model_dir: str, steps: int, warmup: int, threads: int, precision: str = "fp32",
                 data_dir: str | None = None, device: str = "cpu") -> dict:
    import contextlib

    import rlfuse  # noqa: F401
    import rlfuse.models as models
    import rlfuse.trainer as trainer
    from support import compose  # tests/support.py

    torch.set_num_threads(threads)
    base = {"mib": 0.0}
    ends: list[tuple[float, float]] = []
    tokens: list[float] = []

    load_policy = models.load_policy

    def load_and_mark(*a, **k):
        m = load_policy(*a, **k)
        base["mib"] = peak_mib()
        return m

    step_fn = trainer._train_step

    autocast = {"on": False}

    def timed_step(ctx, opt, params, step):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        amp = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if autocast["on"] else (
            contextlib.nullcontext())
        with amp:
            metrics = step_fn(ctx, opt, params, step)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        ends.append(clock())
        tokens.append(metrics["_tokens"] / ctx.cfg.trainer.epochs)  # counted once per step
        return metrics

    models.load_policy = load_and_mark
    trainer._train_step = timed_step
    workload = real_overrides(algo, data_dir) if data_dir else RLFUSE_OVERRIDES[algo]
    over = workload + [
        "algo.warmup=null", "eval=[]", "logger=[jsonl]", f"model.name_or_path={model_dir}",
        f"trainer.max_steps={steps + warmup}", "trainer.progress=false", "trainer.eval_every=0",
        f"trainer.threads={threads}", "model.dtype=float32", f"trainer.device={device}",
    ] + [x for x in os.environ.get("BENCH_RLFUSE_EXTRA", "").split() if x]
    cfg = compose(over)
    if "precision" in cfg.trainer:  # explicit: auto would pick bf16-mixed on a CPU with AMX
        cfg = compose(over + [f"trainer.precision={precision}"])
    elif precision == "bf16-mixed":
        autocast["on"] = True
    with tempfile.TemporaryDirectory() as run_dir:
        trainer.train(cfg, run_dir)
    return summarise("rlfuse", algo, ends, tokens, warmup, base["mib"]) | {"precision": precision}


# ----------------------------------------------------------------------------- TRL side


def _read(name: str) -> list[dict]:
    with open(TASK_DATA / name) as f:
        return [json.loads(line) for line in f if line.strip()]


def _task_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sort_letters", TASK_MODULE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _common_args(out_dir: str, max_steps: int | None, precision: str = "fp32") -> dict:
    kw = dict(
        output_dir=out_dir, report_to="none", save_strategy="no", use_cpu=True,
        bf16=precision == "bf16-mixed", fp16=False,
        disable_tqdm=True, dataloader_num_workers=0, seed=0, max_grad_norm=1.0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
    )
    if max_steps is not None:
        kw["max_steps"] = max_steps
    return kw


class RuleReward(torch.nn.Module):
    """Stands for TRL PPO's reward model: the task's rule (like rlfuse's reward=rule), scored by
    the patch of :func:`_patch_trl_ppo`."""


def _patch_trl_ppo(tok, rule: RuleReward, score, pending: dict) -> None:
    """Make TRL's PPO score answers with ``score(prompt, answer)`` when its reward model is
    ``rule``, and count the tokens it generates (prompt + response up to the first EOS) into
    ``pending["tokens"]``."""
    import trl.experimental.ppo.ppo_trainer as ppo_mod

    get_reward, batch_generation = ppo_mod.get_reward, ppo_mod.batch_generation

    def patched_get_reward(model, query_responses, pad_token_id, context_length):
        if model is not rule:
            return get_reward(model, query_responses, pad_token_id, context_length)
        prompts = tok.batch_decode(query_responses[:, :context_length], skip_special_tokens=True)
        answers = tok.batch_decode(query_responses[:, context_length:], skip_special_tokens=True)
        scores = [score(p, a) for p, a in zip(prompts, answers, strict=True)]
        return None, torch.tensor(scores, dtype=torch.float32), None

    def counting_generation(model, queries, *a, **k):
        qr, logits = batch_generation(model, queries, *a, **k)
        resp = qr[:, queries.shape[1] :]
        is_eos = resp == tok.eos_token_id
        after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # past the first EOS
        pending["tokens"] += float((queries != tok.pad_token_id).sum() + (~after).sum())
        return qr, logits

    ppo_mod.get_reward = patched_get_reward
    ppo_mod.batch_generation = counting_generation


def trl_child(algo: str, model_dir: str, steps: int, warmup: int, threads: int, precision: str = "fp32",
              data_dir: str | None = None) -> dict:
    if data_dir:
        return trl_real_child(algo, model_dir, steps, warmup, threads, precision, data_dir)

    torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    tok = AutoTokenizer.from_pretrained(model_dir)
    bos = tok.bos_token
    ends: list[tuple[float, float]] = []
    tokens: list[float] = []
    pending = {"tokens": 0.0}

    class StepClock(TrainerCallback):
        """Closes a step every ``every`` optimiser steps."""

        def __init__(self, every: int) -> None:
            self.every = every

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % self.every == 0:
                ends.append(clock())
                tokens.append(pending["tokens"])
                pending["tokens"] = 0.0

    out_dir = tempfile.mkdtemp(prefix=f"trl-{algo}-")
    n = steps + warmup

    if algo == "dpo":
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        base = peak_mib()
        rows = [{"prompt": bos + r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                for r in _read("preferences.jsonl")]
        args = DPOConfig(
            **_common_args(out_dir, n), per_device_train_batch_size=32, learning_rate=3e-4,
            lr_scheduler_type="cosine", warmup_steps=5, beta=0.1, loss_type=["sigmoid"], max_length=32,
            logging_steps=1,
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok, callbacks=[StepClock(1)])
        collate = trainer.data_collator

        def counting_collate(examples):
            batch = collate(examples)
            pending["tokens"] += float(batch["attention_mask"].sum())
            return batch

        trainer.data_collator = counting_collate
        trainer.train()
    elif algo == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        task = _task_module()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        base = peak_mib()
        rows = [{"prompt": bos + r["prompt"], "target": r["target"]} for r in _read("prompts_train.jsonl")]

        def sort_reward(prompts, completions, target, **kw):
            return [task.score(c, t) for c, t in zip(completions, target, strict=True)]

        # rlfuse grpo: 16 prompts x 8 samples = 128 rows, 2 epochs of 64-row mini-batches
        # -> 4 optimiser steps per rollout. TRL: generation batch 128 = 64 x steps_per_generation 2,
        # num_iterations 2 -> the same 4 updates per generation.
        updates = 4
        args = GRPOConfig(
            **_common_args(out_dir, n * updates), per_device_train_batch_size=64, steps_per_generation=2,
            num_generations=8, num_iterations=2, max_completion_length=10, temperature=0.7, top_p=1.0,
            beta=0.01, epsilon=0.2, epsilon_high=0.28, loss_type="grpo", scale_rewards="group",
            learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0, logging_steps=updates,
            log_completions=False,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=sort_reward, args=args,
                              train_dataset=Dataset.from_list(rows), processing_class=tok,
                              callbacks=[StepClock(updates)])
        gen = trainer._generate_and_score_completions

        def counting_gen(inputs):
            out = gen(inputs)
            pending["tokens"] += float(out["prompt_mask"].sum() + out["completion_mask"].sum())
            return out

        trainer._generate_and_score_completions = counting_gen
        trainer.train()
    elif algo == "ppo":
        from transformers import AutoModelForSequenceClassification
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        task = _task_module()
        tok.padding_side = "left"
        policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        value = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
        base = peak_mib()

        rule = RuleReward()
        _patch_trl_ppo(tok, rule, task.reward, pending)
        enc = [tok(bos + r["prompt"])["input_ids"] for r in _read("prompts_train.jsonl")]
        ds = Dataset.from_dict({"input_ids": enc})
        # TRL: rollout batch = per_device_train_batch_size x gradient_accumulation_steps = 64,
        # split into num_mini_batches=2 mini-batches of 32 rows, one update each (its micro-batch
        # loop steps by 64 rows, so a 32-row mini-batch is one micro-batch).
        # rlfuse ppo: 64 prompts, 4 epochs of 32-row mini-batches, KL penalty beta 0.05 (k1) in
        # the reward, GAE(1, 0.95), clip 0.2, value clip 0.2, value coef 0.5, lr 3e-4.
        args = PPOConfig(
            **_common_args(out_dir, None), per_device_train_batch_size=64, gradient_accumulation_steps=1,
            num_mini_batches=2, num_ppo_epochs=4, total_episodes=64 * n, response_length=10,
            temperature=1.0, stop_token="eos", kl_coef=0.05, kl_estimator="k1", cliprange=0.2,
            cliprange_value=0.2, vf_coef=0.5, gamma=1.0, lam=0.95, whiten_rewards=False,
            learning_rate=3e-4, lr_scheduler_type="constant", num_sample_generations=0,
            local_rollout_forward_batch_size=64, logging_steps=1,
        )
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rule,
                             value_model=value, train_dataset=ds, eval_dataset=ds.select(range(64)),
                             callbacks=[StepClock(1)])
        trainer.train()
    else:
        raise ValueError(f"unknown algo '{algo}'")
    return summarise("trl", algo, ends, tokens, warmup, base)


def _letters_target(prompt: str) -> str:
    import re

    m = re.search(LETTERS_RE, prompt)
    return "".join(sorted(m.group(1))) if m else ""


def trl_real_child(algo: str, model_dir: str, steps: int, warmup: int, threads: int, precision: str,
                   data_dir: str) -> dict:
    """TRL's side of the real-model workload (``REAL``), same data and hyper-parameters."""

    torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    task = _task_module()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ends: list[tuple[float, float]] = []
    tokens: list[float] = []
    pending = {"tokens": 0.0}

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(clock())
            tokens.append(pending["tokens"])
            pending["tokens"] = 0.0

    def rows(name: str) -> list[dict]:
        with open(Path(data_dir) / name) as f:
            return [json.loads(line) for line in f if line.strip()]

    out_dir = tempfile.mkdtemp(prefix=f"trl-{algo}-")
    n = steps + warmup
    common = _common_args(out_dir, n, precision) | {"lr_scheduler_type": "constant", "warmup_steps": 0,
                                                      "logging_steps": 1}
    w = REAL[algo]
    if algo == "dpo":
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        base = peak_mib()
        args = DPOConfig(**common, per_device_train_batch_size=w["pairs"], learning_rate=w["lr"], beta=w["beta"],
                         loss_type=["sigmoid"], max_length=w["max_length"])
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows("preferences.jsonl")),
                             processing_class=tok, callbacks=[StepClock()])
        collate = trainer.data_collator

        def counting_collate(examples):
            batch = collate(examples)
            pending["tokens"] += float(batch["attention_mask"].sum())
            return batch

        trainer.data_collator = counting_collate
        trainer.train()
    elif algo == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        base = peak_mib()

        def sort_reward(prompts, completions, target, **kw):
            return [task.score(c, t) for c, t in zip(completions, target, strict=True)]

        rows_n = w["prompts"] * w["n"]
        args = GRPOConfig(
            **common, per_device_train_batch_size=rows_n, num_generations=w["n"], num_iterations=1,
            max_completion_length=w["new_tokens"], temperature=w["temperature"], top_p=1.0, beta=w["beta"],
            epsilon=0.2, epsilon_high=0.2, loss_type="grpo", scale_rewards="group", learning_rate=w["lr"],
            log_completions=False,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=sort_reward, args=args,
                              train_dataset=Dataset.from_list(rows("prompts.jsonl")), processing_class=tok,
                              callbacks=[StepClock()])
        gen = trainer._generate_and_score_completions

        def counting_gen(inputs):
            out = gen(inputs)
            pending["tokens"] += float(out["prompt_mask"].sum() + out["completion_mask"].sum())
            return out

        trainer._generate_and_score_completions = counting_gen
        trainer.train()
    elif algo == "ppo":
        from transformers import AutoModelForSequenceClassification
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        tok.padding_side = "left"
        policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        value = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
        value.config.pad_token_id = tok.pad_token_id
        base = peak_mib()

        rule = RuleReward()
        _patch_trl_ppo(tok, rule, lambda p, a: task.score(a, _letters_target(p)), pending)
        enc = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows("prompts.jsonl")]
        ds = Dataset.from_dict({"input_ids": enc})
        common.pop("max_steps")
        args = PPOConfig(
            **common, per_device_train_batch_size=w["prompts"], gradient_accumulation_steps=1,
            num_mini_batches=w["mini_batches"], num_ppo_epochs=w["epochs"], total_episodes=w["prompts"] * n,
            response_length=w["new_tokens"], temperature=1.0, stop_token="eos", kl_coef=w["kl"],
            kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, vf_coef=0.5, gamma=1.0, lam=0.95,
            whiten_rewards=False, learning_rate=w["lr"], num_sample_generations=0,
            local_rollout_forward_batch_size=w["prompts"],
        )
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rule,
                             value_model=value, train_dataset=ds, eval_dataset=ds.select(range(8)),
                             callbacks=[StepClock()])
        trainer.train()
    else:
        raise ValueError(f"unknown algo '{algo}'")
    return summarise("trl", algo, ends, tokens, warmup, base) | {"precision": precision}


def write_real_data(folder: Path, model_dir: str, n_rows: int = 400) -> None:
    """Chat-template prompts (the model's default system prompt + a question) for both sides,
    written as plain text so both tokenise exactly the same string."""
    import random

    from transformers import AutoTokenizer

    task = _task_module()
    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)

    def chat(letters: str) -> str:
        q = f"Sort the letters {letters} in alphabetical order. Answer with the sorted letters only."
        return tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)

    prefs, prompts = [], []
    for r in _read("preferences.jsonl")[:n_rows]:
        prefs.append({"prompt": chat(r["prompt"].rstrip("=")), "chosen": r["chosen"], "rejected": r["rejected"]})
    for r in _read("prompts_train.jsonl")[:n_rows]:
        letters = r["prompt"].rstrip("=")
        prompts.append({"prompt": chat(letters), "target": task.target(r["prompt"])})
    rng.shuffle(prompts)
    for name, rs in (("preferences.jsonl", prefs), ("prompts.jsonl", prompts)):
        with open(folder / name, "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in rs)


# ----------------------------------------------------------------------------- driver


def save_tiny_model(folder: Path) -> None:
    from rlfuse.config import ModelConfig
    from rlfuse.models import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_model(ModelConfig(), tok, seed=0)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def versions(python: str, trl: bool) -> str:
    code = (
        "import torch, transformers, json; d={'torch': torch.__version__, 'transformers': transformers.__version__}\n"
        + ("import trl, accelerate; d['trl']=trl.__version__; d['accelerate']=accelerate.__version__\n" if trl else "")
        + "print(json.dumps(d))"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return out.stdout.strip() or out.stderr.strip().splitlines()[-1]


def run_child(python: str, side: str, algo: str, a: argparse.Namespace, model_dir: str, precision: str,
              data_dir: str | None) -> dict | str:
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("OMP_WAIT_POLICY", None)
    if a.omp_wait != "default":
        env["OMP_WAIT_POLICY"] = a.omp_wait.upper()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])
    cmd = [python, str(HERE), "--child", side, "--algo", algo, "--model-dir", model_dir,
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads),
           "--precision", precision] + (["--data-dir", data_dir] if data_dir else []) + (
               ["--device", a.device] if side == "rlfuse" else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in out.stdout.splitlines() if x.startswith('{"side"')]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        return f"failed: {tail[:300]}"
    return json.loads(lines[-1])


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.0f}" if len(xs) == 1 else (
        f"{statistics.median(xs):.0f} ({min(xs):.0f}-{max(xs):.0f})")


def default_model() -> str:
    for d in SMOLLM2_DIRS:
        if d and (Path(d) / "config.json").exists():
            return d
    return "tiny"


def table(results: dict, failures: dict, algos: list[str], precisions: list[str], have: dict) -> str:
    lines = [
        "| algo | precision | tokens/step rlfuse / TRL | rlfuse tokens/s | TRL tokens/s | ratio (per round) | "
        "rlfuse tokens/CPU-s | TRL tokens/CPU-s | CPU ratio (per round) | peak RSS MiB rlfuse / TRL | "
        "RSS growth MiB rlfuse / TRL |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for algo in algos:
        for prec in precisions:
            r, t = results.get(("rlfuse", algo, prec), []), results.get(("trl", algo, prec), [])

            def col(rs: list[dict], key: str) -> str:
                return f"{statistics.median(x[key] for x in rs):.0f}" if rs else "-"

            def ratio(key: str, r: list[dict] = r, t: list[dict] = t) -> str:
                if not (r and t):
                    return "-"
                m = statistics.median(x[key] for x in r) / statistics.median(x[key] for x in t)
                rounds = ", ".join(f"{x[key] / y[key]:.2f}" for x, y in zip(r, t, strict=False))
                return f"**{m:.2f}x** ({rounds})"

            missing = failures.get(("trl", algo, prec), "-" if have.get(algo) else "no venv")
            lines.append(
                f"| {algo} | {prec} | {col(r, 'tokens_per_step')} / {col(t, 'tokens_per_step')} | "
                f"{med([x['tokens_per_s'] for x in r]) if r else failures.get(('rlfuse', algo, prec), '-')} | "
                f"{med([x['tokens_per_s'] for x in t]) if t else missing} | {ratio('tokens_per_s')} | "
                f"{med([x['tokens_per_cpu_s'] for x in r]) if r else '-'} | "
                f"{med([x['tokens_per_cpu_s'] for x in t]) if t else '-'} | {ratio('tokens_per_cpu_s')} | "
                f"{col(r, 'peak_rss_mib')} / {col(t, 'peak_rss_mib')} | "
                f"{col(r, 'rss_growth_mib')} / {col(t, 'rss_growth_mib')} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a save_pretrained folder, or 'tiny' (default: SmolLM2 if present)")
    ap.add_argument("--precisions", default=None, help="default fp32,bf16-mixed (real) / fp32 (tiny)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default 4 real / 20 tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before them (default 1 real / 3 tiny)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds (rlfuse, TRL) per algo")
    ap.add_argument("--algos", default="dpo,grpo,ppo")
    ap.add_argument("--sides", default="rlfuse,trl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trl-python", default=DEFAULT_TRL_PY, help="TRL venv for DPO and GRPO")
    ap.add_argument("--trl-ppo-python", default=DEFAULT_TRL_PPO_PY, help="TRL venv for PPO (TRL <= 1.12)")
    ap.add_argument("--device", default="cpu", help="rlfuse's trainer.device (TRL runs on CPU: use --sides rlfuse)")
    ap.add_argument("--omp-wait", default="default", choices=["default", "passive", "active"],
                    help="OMP_WAIT_POLICY of both sides' processes (default: unset, OpenMP's own)")
    ap.add_argument("--json", default=None, help="also write every run's figures to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--algo", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        if a.child == "rlfuse":
            r = rlfuse_child(a.algo, a.model_dir, a.steps, a.warmup, a.threads, a.precision, a.data_dir, a.device)
        else:
            r = trl_child(a.algo, a.model_dir, a.steps, a.warmup, a.threads, a.precision, a.data_dir)
        print(json.dumps(r), flush=True)
        return

    model = a.model or default_model()
    real = model != "tiny"
    a.steps = a.steps or (4 if real else 20)
    a.warmup = a.warmup if a.warmup is not None else (1 if real else 3)
    algos = a.algos.split(",")
    precisions = (a.precisions or ("fp32,bf16-mixed" if real else "fp32")).split(",")
    trl_py = {algo: (a.trl_ppo_python if algo == "ppo" else a.trl_python) for algo in algos}
    have = {algo: "trl" in a.sides and Path(py).exists() for algo, py in trl_py.items()}
    print(f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC on {platform.node()} "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores), threads={a.threads}, "
          f"OMP_WAIT_POLICY={a.omp_wait if a.omp_wait != 'default' else 'unset (OpenMP default)'} both sides")
    print(f"# model: {model}" + (" (real-model workload)" if real else " (tiny-model overhead workload)"))
    print(f"# load before: {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f}")
    print(f"# rlfuse python: {versions(sys.executable, False)}")
    for py in sorted({trl_py[x] for x in algos if have[x]}):
        print(f"# TRL python ({py}): {versions(py, True)}")
    if not all(have.values()) and "trl" in a.sides:
        print(f"# a TRL venv is missing for {[x for x in algos if not have[x]]}; create with:\n#   {TRL_HOWTO}")
    print(f"# {a.steps} timed steps after {a.warmup} warm-up steps, {a.repeats} alternating round(s)", flush=True)
    results: dict[tuple[str, str, str], list[dict]] = {}
    failures: dict[tuple[str, str, str], str] = {}
    with tempfile.TemporaryDirectory(prefix="rlfuse-bench-") as tmp:
        if real:
            model_dir, data_dir = model, tmp
            write_real_data(Path(tmp), model)
        else:
            model_dir, data_dir = tmp, None
            save_tiny_model(Path(tmp))
        for rnd in range(a.repeats):
            for algo in algos:
                for prec in precisions:
                    sides = [("rlfuse", sys.executable)] if "rlfuse" in a.sides else []
                    sides += [("trl", trl_py[algo])] if have[algo] else []
                    for side, py in sides:
                        r = run_child(py, side, algo, a, model_dir, prec, data_dir)
                        if isinstance(r, str):
                            failures[(side, algo, prec)] = r
                            print(f"# {side}/{algo}/{prec}: {r}", file=sys.stderr, flush=True)
                        else:
                            results.setdefault((side, algo, prec), []).append(r)
                            print(f"# round {rnd + 1} {side}/{algo}/{prec}: {r['tokens_per_s']:.0f} tok/s, "
                                  f"{r['tokens_per_cpu_s']:.0f} tok/CPU-s, {r['step_s']:.2f} s/step, "
                                  f"peak {r['peak_rss_mib']:.0f} MiB", flush=True)
    print(f"# load after: {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f}")
    print()
    print(table(results, failures, algos, precisions, have))
    if a.json:
        Path(a.json).write_text(json.dumps([x for v in results.values() for x in v], indent=1))


if __name__ == "__main__":
    main()
