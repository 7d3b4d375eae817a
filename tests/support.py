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


# ---------------------------------------------------------------- tiny batches for plugin tests


def make_batch(rewards, lengths, group_ids=None, T=None, prompt=2, token_rewards=None, dtype=None):
    """A rewarded batch for advantage estimators: rows ``[prompt tokens][response of
    lengths[i]][padding]``, sequence ``rewards`` (or None), optional ``group_ids`` and
    ``token_rewards`` (B, T), rewards cast to ``dtype`` (default float32)."""
    import torch

    from rlfuse.data import Batch

    dtype = dtype or torch.float32
    B = len(lengths)
    T = T or prompt + max(lengths) + 1
    mask = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        mask[i, prompt : prompt + n] = 1
    return Batch(
        input_ids=torch.zeros(B, T, dtype=torch.long),
        attention_mask=torch.ones(B, T, dtype=torch.long),
        response_mask=mask,
        rewards=None if rewards is None else torch.tensor(rewards).to(dtype),
        token_rewards=None if token_rewards is None else token_rewards.to(dtype),
        group_ids=None if group_ids is None else torch.tensor(group_ids),
    )


def seq_values(adv, batch) -> list[float]:
    """The per-row constant of a sequence-level advantage (and check it is constant and
    zero outside the response)."""
    import torch

    m = batch.response_mask
    assert adv.dtype == torch.float32 and adv.shape == m.shape
    assert torch.all(adv[m == 0] == 0)
    out = []
    for i in range(len(m)):
        vals = adv[i][m[i] > 0]
        assert torch.all(vals == vals[0])
        out.append(float(vals[0]))
    return out


def rtg_reference(rows: list[list[float]], gamma: float) -> list[list[float]]:
    """Return-to-go of plain Python lists."""
    out = []
    for r in rows:
        g, acc = [], 0.0
        for x in reversed(r):
            acc = x + gamma * acc
            g.append(acc)
        out.append(g[::-1])
    return out


def text_batch(prompts, responses, rows):
    """A batch of decoded responses (for reward plugins): T = 8, prompt = 2 tokens, the
    response mask covers min(len(response), 6) tokens."""
    import torch

    from rlfuse.data import Batch

    B = len(responses)
    mask = torch.zeros(B, 8)
    for i, r in enumerate(responses):
        mask[i, 2 : 2 + min(len(r), 6)] = 1
    return Batch(input_ids=torch.zeros(B, 8, dtype=torch.long), attention_mask=torch.ones(B, 8, dtype=torch.long),
                 response_mask=mask, prompts=prompts, responses=responses, rows=rows)  # fmt: skip


def tiny_scorer(seed=0):
    """(tiny policy in eval mode, a random linear head, tokenizer): a reward model's parts."""
    import torch
    from torch import nn

    from rlfuse.config import ModelConfig
    from rlfuse.models import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_model(ModelConfig(), tok, seed)
    head = nn.Linear(model.config.hidden_size, 1, bias=False)
    torch.manual_seed(seed)
    nn.init.normal_(head.weight)
    return model.eval(), head, tok


def encode_pairs(tok, pairs):
    """``[(prompt, answer)]`` -> right-padded (input_ids, attention_mask, response_mask) of
    ``BOS + prompt + answer + EOS``."""
    from rlfuse.plugins._data.records import pack

    ps = [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] for p, _ in pairs]
    ans = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, a in pairs]
    return pack(ps, ans, tok.pad_token_id)


def load_plugins(cfg, pm):
    """Register the plugins a composed config selects; returns the reward weights (the core's
    own loader: ``rlfuse.manager.load_plugins``, formerly ``rlfuse.trainer.load_plugins``)."""
    from rlfuse.manager import load_plugins as load

    return {name: float(w) for name, w in load(cfg, pm)["weight"].items()}


def data_ctx(run_dir, **data):
    """A stand-in for the trainer's context as the data plugins see it: ``cfg.data`` (short
    lengths unless given), the tiny character tokenizer, ``run_dir`` and a CPU device."""
    from types import SimpleNamespace

    import torch

    from rlfuse.models import build_tiny_tokenizer

    d = dict(max_prompt_length=16, max_length=32, truncation="left")
    d.update(data)
    return SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(**d), seed=0), tokenizer=build_tiny_tokenizer(),
                           run_dir=run_dir, device=torch.device("cpu"), set_train_records=lambda records: None)  # fmt: skip


def write_jsonl(path, rows):
    """Write ``rows`` (dicts as JSON, strings as they are) one per line; returns ``str(path)``."""
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)
