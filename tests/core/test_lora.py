"""model.lora: peft adapters, the reference is the base with adapters off, save / merge / resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rlfuse import models
from rlfuse.data import Batch
from support import FAST, compose, run_job

pytest.importorskip("peft")

LORA = FAST + ["model.lora.r=4", "model.lora.alpha=8", "logger=[]", "trainer.threads=2"]


def _tiny(lora: bool):
    cfg = compose(["algo=ppo"] + (["model.lora.r=4"] if lora else []))
    tok = models.load_tokenizer(cfg.model)
    return cfg, tok, models.load_policy(cfg.model, tok, cfg.seed)


def _batch(tok):
    ids = torch.tensor([tok("ab=ba", add_special_tokens=False)["input_ids"], tok("cd=dc", add_special_tokens=False)["input_ids"]])
    mask = torch.ones_like(ids)
    resp = torch.zeros(ids.shape)
    resp[:, 3:] = 1
    return Batch(input_ids=ids, attention_mask=mask, response_mask=resp, prompts=["", ""], responses=["", ""], rows=[{}, {}])


def test_reference_is_the_base_with_adapters_off():
    _, tok, base = _tiny(lora=False)
    _, _, policy = _tiny(lora=True)
    assert models.is_peft(policy)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # move the adapters off their identity initialisation
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ref = models.AdapterDisabled(policy)
    assert list(ref.parameters()) == []  # no copy, nothing of its own
    b = _batch(tok)
    with torch.no_grad():
        want = models.forward(base, b).logprobs
        got_ref = models.forward(ref, b).logprobs
        got_policy = models.forward(policy, b).logprobs
    torch.testing.assert_close(got_ref, want, rtol=0, atol=1e-6)
    assert (got_policy - want).abs().max() > 1e-3  # the adapters are on again afterwards


def test_bad_lora_settings_are_clear_errors():
    cfg = compose(["algo=ppo", "model.lora.r=4", "model.lora.target_modules=[no_such_proj]"])
    tok = models.load_tokenizer(cfg.model)
    with pytest.raises(ValueError, match=r"model.lora.target_modules=\['no_such_proj'\]"):
        models.load_policy(cfg.model, tok, 0)


@pytest.mark.slow
def test_only_adapters_and_value_head_train_and_resume_is_exact(tmp_path):
    run_job(LORA + ["trainer.max_steps=3", "model.lora.merge_final=true"], tmp_path / "a")
    run_job(LORA + ["trainer.max_steps=2", "trainer.save_every=1"], tmp_path / "b")
    resumed = run_job(LORA + ["trainer.max_steps=3", "trainer.resume=true", "trainer.save_every=1"], tmp_path / "b")
    assert resumed["steps"] == 3
    final = tmp_path / "a" / "final"
    # final/ holds the adapter (+ the value head) and, with merge_final, the merged model
    assert (final / "adapter_model.safetensors").exists() and not (final / "model.safetensors").exists()
    assert "value_head" in "".join(torch.load(final / "rlfuse_modules.pt"))
    ckpt = tmp_path / "b" / "checkpoints" / "step_0000003"
    assert (ckpt / "adapter_model.safetensors").exists()
    a = load_file(str(final / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "adapter_model.safetensors"))
    assert any(k for k in a if "lora_B" in k) and all(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    for k in a:  # resume continues the same run
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    # merged: only the adapted linear layers differ from the base
    cfg, _, base = _tiny(lora=False)
    merged = load_file(str(final / "merged" / "model.safetensors"))
    base_sd = base.state_dict()
    changed = {k for k in merged if not torch.equal(merged[k], base_sd[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed)
    assert not any("embed" in k or "norm" in k for k in changed)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(final / "merged")
    assert again.generate(torch.tensor([[1, 20, 21]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
