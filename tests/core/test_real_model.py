"""End to end on a real pretrained model: SmolLM2-135M-Instruct (Llama, vocab 49,152, a real
chat template), chat data, 2 steps each of DPO and GRPO; final/ reloads with plain
transformers and generates. The model comes from the ``smollm2`` fixture (tests/conftest.py),
which skips with the reason when it can be neither found nor built."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from support import run_job

pytestmark = pytest.mark.slow

SMALL = ["trainer.max_steps=2", "trainer.progress=false", "trainer.threads=2", "logger=[]"]
SYSTEM = {"role": "system", "content": "Answer with one word."}
QUESTIONS = [("What colour is the sky?", "Blue", "Green"), ("What is 2+2?", "Four", "Five"),
             ("Capital of France?", "Paris", "Rome"), ("Opposite of hot?", "Cold", "Warm")]  # fmt: skip


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _check_final(final, smollm2, tok_prompt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    ids = tok.apply_chat_template(tok_prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    before = load_file(f"{smollm2}/model.safetensors")
    after = load_file(f"{final}/model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    assert after[key].dtype == torch.float32  # fp32 masters written
    assert (after[key] != before[key]).float().mean() > 0.5  # the training is in the weights


def test_dpo_readme_example_on_smollm2(smollm2, tmp_path):
    prefs = _write(
        tmp_path / "prefs.jsonl",
        [{"prompt": [SYSTEM, {"role": "user", "content": q}], "chosen": c, "rejected": r} for q, c, r in QUESTIONS],
    )
    # the README's command, as written, plus sizes for a test
    s = run_job(
        ["algo=dpo", "model=hf", f"model.name_or_path={smollm2}", "data=jsonl", f"data.preferences={prefs}",
         "rollout.batch_size=2", *SMALL],
        tmp_path / "dpo",
    )  # fmt: skip
    assert s["steps"] == 2 and torch.isfinite(torch.tensor(s["last"]["loss/total"]))
    _check_final(tmp_path / "dpo" / "final", smollm2, [SYSTEM, {"role": "user", "content": "Hi?"}])


def test_grpo_on_smollm2(smollm2, tmp_path):
    prompts = _write(
        tmp_path / "prompts.jsonl",
        [{"messages": [SYSTEM, {"role": "user", "content": q}], "target": c} for q, c, _ in QUESTIONS],
    )
    s = run_job(
        ["algo=grpo", "model=hf", f"model.name_or_path={smollm2}", "data=jsonl", f"data.prompts={prompts}",
         "reward=[length]", "reward.length.column=target", "rollout.batch_size=2", "rollout.n=2",
         "rollout.max_new_tokens=6", "trainer.epochs=1", "trainer.mini_batch_size=4", *SMALL],
        tmp_path / "grpo",
    )  # fmt: skip
    assert s["steps"] == 2 and torch.isfinite(torch.tensor(s["last"]["loss/total"]))
    _check_final(tmp_path / "grpo" / "final", smollm2, [SYSTEM, {"role": "user", "content": "Hi?"}])
