"""Bad input never passes silently (issue 13): each case below fails with a message naming the
place (config key, file:line, plugin and hook), or -- non-finite numbers with
``trainer.nonfinite=skip`` -- skips with a count, and leaves no ``summary.json`` or ``final/``
that looks like a finished run. Most cases run in-process (fast); a few go through the real
``rlfuse`` command to check its one-line message and exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlfuse.errors import ConfigError, NonFiniteError, RlfuseError, exit_code
from support import FAST, run_job

TESTS = Path(__file__).resolve().parents[1]
FAULTS = ["+plugins.faults.plugin=faults"]
BASE = [o for o in FAST if not o.startswith("eval.")] + ["eval=[]"]  # FAST without evaluation


def no_finished_run(run: Path) -> None:
    assert not (run / "summary.json").exists(), "a failed run left a summary.json"
    assert not (run / "final").exists(), "a failed run left a final/ policy"


def fails(overrides: list[str], run: Path, match: str, kind: type[BaseException] = RlfuseError,
          base: list[str] = BASE) -> BaseException:
    with pytest.raises(kind, match=match) as info:
        run_job(base + overrides, run)
    no_finished_run(run)
    return info.value


# ----------------------------------------------------------------------------- config

CONFIG = [  # (overrides, the key the message must name)
    (["algo.lr=-1"], "algo.lr"),
    (["algo.lr=0"], "algo.lr"),
    (["trainer.max_grad_norm=-1"], "trainer.max_grad_norm"),
    (["trainer.epochs=0"], "trainer.epochs"),
    (["trainer.max_steps=-1"], "trainer.max_steps"),
    (["trainer.max_steps=0"], "trainer.max_steps"),
    (["trainer.mini_batch_size=-4"], "trainer.mini_batch_size"),
    (["trainer.micro_batch_size=0"], "trainer.micro_batch_size"),
    (["trainer.micro_batch_size=8"], "trainer.micro_batch_size"),  # > mini_batch_size=4
    (["trainer.betas=[0.9]"], "trainer.betas"),
    (["trainer.betas=[0.9,1.5]"], "trainer.betas"),
    (["trainer.eps=0"], "trainer.eps"),
    (["trainer.weight_decay=-0.1"], "trainer.weight_decay"),
    (["trainer.warmup_steps=-1"], "trainer.warmup_steps"),
    (["trainer.schedule=exp"], "trainer.schedule"),
    (["trainer.min_lr_ratio=2"], "trainer.min_lr_ratio"),
    (["trainer.eval_every=-1"], "trainer.eval_every"),
    (["trainer.save_every=-2"], "trainer.save_every"),
    (["trainer.keep_last=0"], "trainer.keep_last"),
    (["trainer.device=tpu"], "trainer.device"),
    (["trainer.resume=maybe"], "trainer.resume"),
    (["trainer.nonfinite=ignore"], "trainer.nonfinite"),
    (["trainer.threads=0"], "trainer.threads"),
    (["model.dtype=float8"], "model.dtype"),
    (["model.tiny.num_heads=3"], "model.tiny.hidden_size"),
    (["data.truncation=right"], "data.truncation"),
    (["data.max_length=0"], "data.max_length"),
    (["kernels.backend=cuda"], "kernels.backend"),
    (["kernels.fused_loss=sometimes"], "kernels.fused_loss"),
    (["model=hf"], "model.name_or_path"),
    # plugin options, checked by each plugin's Config
    (["loss.ppo.clip_low=-1"], "loss.ppo.clip_low"),
    (["loss.ppo.aggregation=mean"], "loss.ppo': aggregation"),  # checked by the kernel options dataclass
    (["loss.ppo.dual_clip=0.5"], "loss.ppo': dual_clip"),
    (["loss.ppo.kl_coef=-0.1"], "loss.ppo.kl_coef"),
    (["+loss.ppo.clip_lw=0.1"], "loss.ppo.clip_lw"),  # a typo is an error, not a silent default
    (["rollout.batch_size=0"], "rollout.batch_size"),
    (["rollout.temperature=0"], "rollout.temperature"),
    (["rollout.top_p=1.5"], "rollout.top_p"),
    (["advantage.gamma=2"], "advantage.gamma"),
    (["advantage.lam=-0.1"], "advantage.lam"),
    (["reward.kl_penalty.beta=-1"], "reward.kl_penalty.beta"),
    (["reward.rule.weight=abc"], "reward.rule.weight"),
    (["eval.task.num_prompts=0"], "eval.task.num_prompts"),
    (["algo=dpo", "loss.dpo.beta=0"], "loss.dpo.beta"),
    (["algo=dpo", "loss.dpo.loss_type=foo"], "loss.dpo.loss_type"),
    (["algo=dpo", "loss.dpo.label_smoothing=0.7"], "loss.dpo.label_smoothing"),
    (["+trainr.max_steps=1"], "trainr"),
]


@pytest.mark.parametrize(("overrides", "key"), CONFIG, ids=[" ".join(o) for o, _ in CONFIG])
def test_bad_config_value_names_the_key(tmp_path, overrides, key):
    e = fails(overrides, tmp_path / "run", match=f"Config error at '{key}", base=FAST)
    assert isinstance(e, ConfigError) and exit_code(e) == 2
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cuda_device_without_cuda_is_an_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    fails(["trainer.device=cuda"], tmp_path / "run", match="trainer.device.*not available")


def test_unknown_config_key_is_a_composition_error(tmp_path):
    from hydra.errors import HydraException

    with pytest.raises(HydraException, match="max_stepz") as info:
        run_job(BASE + ["trainer.max_stepz=3"], tmp_path / "run")
    assert exit_code(info.value) == 2
    no_finished_run(tmp_path / "run")


# ----------------------------------------------------------------------------- models


def test_model_folder_problems_are_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "model.bin"
    a_file.write_text("x")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    cases = [
        (empty, "model.name_or_path.*empty folder"),
        (a_file, "model.name_or_path.*is a file"),
        (tmp_path / "missing" / "model", "model.name_or_path.*no such folder"),
        (broken, r"could not load the (tokenizer|model) .*broken"),
    ]
    for i, (path, match) in enumerate(cases):
        fails(["model=hf", f"model.name_or_path={path}"], tmp_path / f"run{i}", match=match)


# ----------------------------------------------------------------------------- plugins


def test_unknown_plugin_lists_the_installed_ones(tmp_path):
    e = fails(["reward.rule.plugin=nope"], tmp_path / "run", match="Unknown plugin 'nope'.*Installed plugins")
    assert exit_code(e) == 2


@pytest.mark.parametrize(("overrides", "key"), [
    (["rollout.engine=vllm"], "rollout.engine"),
    (["rollout.old_logprobs=bogus"], "rollout.old_logprobs"),
    (["reward.kl_penalty.beta=-1"], "reward.kl_penalty.beta"),
])
def test_bad_plugin_option_is_refused_before_anything_is_written(tmp_path, overrides, key):
    e = fails(overrides, tmp_path / "run", match=f"Config error at '{key}")
    assert exit_code(e) == 2
    assert not (tmp_path / "run").exists()  # like a bad core key: not even config.yaml


def test_bad_plugin_option_in_a_pipeline_writes_nothing(tmp_path):
    """The default job (the RLHF pipeline) checks every stage before its folder is made."""
    e = fails(["algo=rlhf", "rollout.engine=vllm"], tmp_path / "run", match="Config error at 'rollout.engine'",
              base=[])
    assert exit_code(e) == 2
    assert not (tmp_path / "run").exists()


def test_a_plugin_module_without_hookimpl_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "nohook_plugin.py").write_text("def reward(ctx, batch):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fails(["+plugins.x.plugin=nohook_plugin"], tmp_path / "run", match="implements no hook.*@rlfuse.hookimpl")


def test_a_plugin_failing_in_setup_is_named_with_its_hook(tmp_path, monkeypatch):
    (tmp_path / "setup_boom.py").write_text(
        "from rlfuse import hookimpl\n\n@hookimpl\ndef setup(ctx):\n    raise RuntimeError('no GPU quota')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fails(["+plugins.x.plugin=setup_boom"], tmp_path / "run", match="plugin 'plugins.x' failed in hook 'setup'.*no GPU quota")


# ----------------------------------------------------------------------------- data


def _write(path: Path, lines: list[str]) -> str:
    path.write_text("".join(x + "\n" for x in lines))
    return str(path)


def test_data_errors_name_file_line_and_field(tmp_path):
    bad_json = _write(tmp_path / "bad.jsonl", ['{"prompt": "ab="}', '{"prompt": '])
    no_field = _write(tmp_path / "nofield.jsonl", ['{"question": "ab="}'])
    not_obj = _write(tmp_path / "list.jsonl", ['["ab="]'])
    empty = _write(tmp_path / "empty.jsonl", [])
    pairs = _write(tmp_path / "pairs.jsonl", ['{"prompt": "ba=", "chosen": "ab"}'])
    sft = _write(tmp_path / "sft.jsonl", ['{"prompt": "ba=", "completion": 3}'])
    cases = [
        (["data.prompts=/nonexistent/prompts.jsonl"], "/nonexistent/prompts.jsonl: no such file"),
        ([f"data.prompts={bad_json}"], "bad.jsonl:2: not valid JSON"),
        ([f"data.prompts={no_field}"], "nofield.jsonl:1: missing field"),
        ([f"data.prompts={not_obj}"], "list.jsonl:1: expected a JSON object"),
        ([f"data.prompts={empty}"], "empty.jsonl: no rows"),
        (["algo=dpo", "trainer.mini_batch_size=null", f"data.preferences={pairs}"], r"pairs.jsonl:1: .*rejected"),
        (["algo=sft", f"data.sft={sft}"], r"sft.jsonl:1: .*completion"),
    ]
    for i, (over, match) in enumerate(cases):
        e = fails(over, tmp_path / f"run{i}", match=match)
        assert exit_code(e) == 1


def test_pairs_split_across_mini_batches_fail_before_training(tmp_path):
    fails(["algo=dpo", "rollout.batch_size=4", "trainer.mini_batch_size=2"], tmp_path / "run",
          match="trainer.mini_batch_size")


# ----------------------------------------------------------------------------- resume


def test_resume_true_without_a_checkpoint_is_an_error(tmp_path):
    fails(["trainer.resume=true"], tmp_path / "run", match="trainer.resume.*no complete checkpoint")


def test_resume_with_a_changed_config_lists_the_keys(tmp_path):
    run = tmp_path / "run"
    run_job(BASE + ["trainer.max_steps=1", "trainer.save_every=1"], run)
    (run / "summary.json").unlink()  # as if killed before the end
    import shutil

    shutil.rmtree(run / "final")
    with pytest.raises(ConfigError, match=r"algo.lr: 0.0003 -> 0.001.*resume_allow_changes") as info:
        run_job(BASE + ["trainer.max_steps=2", "trainer.save_every=1", "algo.lr=1e-3"], run)
    assert exit_code(info.value) == 2
    no_finished_run(run)
    with pytest.raises(ConfigError, match=r"algo.name: 'ppo' -> 'sft'"):  # an SFT run resumed as another algorithm
        run_job(["algo=sft", "trainer.max_steps=2", "trainer.progress=false"], run)
    # allowed: continues, and says so in the metrics and the summary
    s = run_job(BASE + ["trainer.max_steps=2", "trainer.save_every=1", "algo.lr=1e-3",
                        "trainer.resume_allow_changes=true"], run)
    assert s["resume_changes"][0]["changes"]["algo.lr"] == [3e-4, 1e-3]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("run/resume_changes") for r in rows if "run/resume_changes" in r] == [1.0]


def test_fresh_start_over_an_earlier_run_is_an_error(tmp_path):
    run = tmp_path / "run"
    run_job(BASE + ["trainer.max_steps=1"], run)
    fails_over = pytest.raises(ConfigError, match="trainer.resume.*already holds a run")
    with fails_over:
        run_job(BASE + ["trainer.max_steps=1", "trainer.resume=false"], run)
    with pytest.raises(ConfigError, match="finished run"):  # auto, but nothing to continue from
        run_job(BASE + ["trainer.max_steps=1"], run)


# ----------------------------------------------------------------------------- non-finite


@pytest.fixture
def nan_reward(tmp_path, monkeypatch):
    (tmp_path / "nan_reward.py").write_text(
        "def reward(prompt, response, **row):\n    return float('nan')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return ["reward=[rule]", "reward.rule.function=nan_reward:reward"]


def _strict_rows(path: Path) -> list[dict]:
    def no_nan(x):
        raise AssertionError(f"non-strict JSON literal {x}")

    return [json.loads(x, parse_constant=no_nan) for x in path.read_text().splitlines()]


def test_nan_reward_stops_naming_step_and_reward(tmp_path, nan_reward):
    run = tmp_path / "run"
    e = fails(nan_reward, run, match=r"step 1: the reward of 'rule' is not finite", kind=NonFiniteError)
    assert exit_code(e) == 1


def test_nan_reward_skips_with_a_count_and_writes_strict_json(tmp_path, nan_reward):
    run = tmp_path / "run"
    s = run_job(BASE + nan_reward + ["trainer.nonfinite=skip"], run)
    rows = _strict_rows(run / "metrics.jsonl")
    assert [r["optim/skipped_steps"] for r in rows] == [1, 2]
    assert all(r["reward/mean"] is None and r["optim/updates"] == 0 for r in rows)
    assert s["skipped_steps"] == 2
    json.loads((run / "summary.json").read_text(), parse_constant=lambda x: pytest.fail(x))
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(run / "final")
    assert all(torch.isfinite(p).all() for p in final.parameters())


def test_inf_loss_term_stops_naming_term_and_plugin(tmp_path, monkeypatch):
    (tmp_path / "inf_loss.py").write_text(
        "import torch\nfrom rlfuse import hookimpl\n\n@hookimpl\ndef loss(ctx, batch):\n"
        "    return {'boom': ctx.forward(batch).logprobs.sum() * float('inf')}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    fails(["+loss.boom.plugin=inf_loss"], run,
          match=r"step 1: loss term 'boom' \(from loss.boom\) is not finite", kind=NonFiniteError)
    s = run_job(BASE + ["+loss.boom.plugin=inf_loss", "trainer.nonfinite=skip"], tmp_path / "skip")
    assert s["skipped_steps"] == 2 and s["last"]["optim/updates"] == 0


# ----------------------------------------------------------------------------- safe stops


@pytest.mark.parametrize(("sig", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_finishes_the_step_checkpoints_and_exits_non_zero(tmp_path, monkeypatch, sig, code):
    from rlfuse.errors import Interrupted

    monkeypatch.setenv("RLFUSE_FAULT_TERM_AT", "1")
    monkeypatch.setenv("RLFUSE_FAULT_SIGNAL", sig)
    run = tmp_path / "run"
    over = FAULTS + ["trainer.max_steps=3"]
    with pytest.raises(Interrupted, match=rf"(?s){sig} after step 1.*step_0000001.*resume") as info:
        run_job(BASE + over, run)
    assert info.value.exit_code == code
    no_finished_run(run)
    assert (run / "checkpoints" / "step_0000001" / "trainer_state.pt").exists()
    monkeypatch.delenv("RLFUSE_FAULT_TERM_AT")
    s = run_job(BASE + over, run)  # resume=auto continues
    assert s["steps"] == 3
    assert [r["step"] for r in _strict_rows(run / "metrics.jsonl")] == [1, 2, 3]


# ----------------------------------------------------------------------------- rlfuse label


def test_label_keeps_a_valid_last_row_without_newline(tmp_path):
    from rlfuse.plugins.commands.label import load_done

    out = tmp_path / "labels.jsonl"
    out.write_text('{"prompt_index": 0, "label": "A"}\n{"prompt_index": 1, "label": "B"}')
    assert load_done(out) == {0, 1}
    assert out.read_text().endswith('"B"}\n')
    out.write_text('{"prompt_index": 0, "label": "A"}\n{"prompt_ind')  # torn by a kill
    assert load_done(out) == {0}


def test_label_bad_prompt_file_names_file_and_line(tmp_path):
    from rlfuse.plugins.commands.label import main

    bad = _write(tmp_path / "p.jsonl", ['{"prompt": "a="}', "{oops"])
    with pytest.raises(SystemExit, match=r"p.jsonl:2: not valid JSON"):
        main(["--prompts", bad, "--out", str(tmp_path / "o.jsonl")])


# ----------------------------------------------------------------------------- the real command

CLI = [  # (arguments, exit code, what the one message must say)
    (["algo.lr=-1"], 2, "Config error at 'algo.lr': must be > 0, got -1"),
    (["trainer.max_stepz=3"], 2, "max_stepz"),
    (["data.prompts=/nonexistent/p.jsonl"], 1, "/nonexistent/p.jsonl: no such file"),
    (["reward.rule.plugin=nope"], 2, "Unknown plugin 'nope'"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "code", "text"), CLI, ids=[a[0] for a, _, _ in CLI])
def test_cli_prints_one_message_and_exits_non_zero(tmp_path, args, code, text):
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "rlfuse", "algo=ppo", "algo.warmup=null", "trainer.progress=false",
           f"run_dir={tmp_path / 'run'}", *args]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == code, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert text in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 4, out.stderr
    no_finished_run(tmp_path / "run")
    if args == ["algo.lr=-1"]:  # --debug: the full traceback, same exit code
        dbg = subprocess.run([*cmd, "--debug"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert dbg.returncode == 2 and "Traceback" in dbg.stderr and text in dbg.stderr
