"""``rollout=preference_data``: a step's pairs as one batch, chosen rows first; the stream's
position survives a resume."""

from __future__ import annotations

import pytest
import torch

from rlfuse.manager import PluginError, instantiate, resolve
from support import data_ctx, write_jsonl


def test_rollout_plugin_steps(tmp_path):
    from rlfuse.plugins.rollout.preference_data import Config, Plugin

    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{c}a=", "chosen": "a" + c, "rejected": c} for c in "bcdefg"])
    ctx = data_ctx(tmp_path)
    ctx.cfg.data.preferences = f
    ctx.cfg.seed = 0
    ctx.device = torch.device("cpu")
    p = Plugin(Config(batch_size=4))
    p.setup(ctx)
    b = p.rollout(ctx, 0)
    assert len(b) == 8 and b.extras["chosen"][:4].all() and not b.extras["chosen"][4:].any()
    for i in range(4):  # chosen row i and rejected row 4+i share the prompt
        assert b.prompts[i] == b.prompts[4 + i]


def test_position_survives_a_resume_and_order_is_seeded(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{c}a=", "chosen": "a" + c, "rejected": c} for c in "bcdefgh"])

    def plugin():
        ctx = data_ctx(tmp_path)
        ctx.cfg.data.preferences, ctx.cfg.seed, ctx.device = f, 3, torch.device("cpu")
        p = instantiate(resolve("preference_data"), {"batch_size": 3}, name="preference_data", where="rollout")
        p.setup(ctx)
        return p, ctx

    a, ctx = plugin()
    first = [a.rollout(ctx, s).prompts[:3] for s in range(2)]
    state = a.save_state()
    third = a.rollout(ctx, 2).prompts[:3]
    b, ctx_b = plugin()
    assert [b.rollout(ctx_b, s).prompts[:3] for s in range(2)] == first  # same seed, same order
    c, ctx_c = plugin()
    c.load_state(state=state)
    assert c.rollout(ctx_c, 2).prompts[:3] == third  # resumed where it was


def test_missing_preferences_and_bad_batch_size_are_errors(tmp_path):
    ctx = data_ctx(tmp_path, preferences=None)
    p = instantiate(resolve("preference_data"), {}, name="preference_data", where="rollout")
    with pytest.raises(ValueError, match="data.preferences"):
        p.setup(ctx)
    with pytest.raises(PluginError, match="rollout.batch_size"):
        instantiate(resolve("preference_data"), {"batch_size": 0}, name="preference_data", where="rollout")
