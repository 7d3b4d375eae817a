"""``reward=model``: a learned reward model folder scores responses, normalised and clipped as
configured."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlfuse.models import forward
from rlfuse.plugins.loss.bradley_terry import pool_last, save_reward_model
from support import encode_pairs as encode
from support import tiny_scorer as tiny


def test_model_reward_plugin_normalises_and_clips(tmp_path):
    from rlfuse.data import Batch
    from rlfuse.plugins.reward.model import Config, Plugin

    model, head, tok = tiny()
    save_reward_model(model, head, tok, tmp_path / "rm", {"mean": 0.5, "std": 2.0})
    ctx = SimpleNamespace(
        cfg=SimpleNamespace(data=SimpleNamespace(max_prompt_length=16, truncation="left")),
        device=torch.device("cpu"), record=lambda m: None,
    )
    pairs = [("cba=", "abc"), ("ba=", "ab"), ("edcba=", "abcde"), ("aa=", "aa")]
    ids, attn, resp = encode(tok, pairs)
    # the rollout's rows: generated responses may lack EOS; the plugin re-encodes prompt+response+EOS
    batch = Batch(input_ids=ids, attention_mask=attn, response_mask=resp,
                  prompts=[p for p, _ in pairs], responses=[a for _, a in pairs],
                  rows=[{"prompt": p} for p, _ in pairs])
    with torch.no_grad():
        raw = head(pool_last(forward(model, batch, hidden=True).hidden, attn)).squeeze(-1)

    def run(**kw):
        p = Plugin(Config(path=str(tmp_path / "rm"), **kw), name="model")
        p.setup(ctx)
        return p.reward(ctx, batch)["model"]

    torch.testing.assert_close(run(normalize="none"), raw, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run(normalize="saved"), (raw - 0.5) / 2.0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run(normalize="batch"), (raw - raw.mean()) / raw.std(), rtol=1e-4, atol=1e-4)
    clipped = run(normalize="none", clip=0.01)
    assert clipped.abs().max() <= 0.01 + 1e-7
    with pytest.raises(ValueError, match="does not exist"):
        Plugin(Config(path=str(tmp_path / "nope")), name="model")
    with pytest.raises(ValueError, match="normalize"):
        Plugin(Config(path=str(tmp_path / "rm"), normalize="zscore"), name="model")


def test_running_normalisation_and_its_state(tmp_path):
    from rlfuse.data import Batch
    from rlfuse.plugins.reward.model import Config, Plugin

    model, head, tok = tiny(1)
    save_reward_model(model, head, tok, tmp_path / "rm", {})
    ctx = SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(max_prompt_length=16, truncation="left")),
                          device=torch.device("cpu"), record=lambda m: None)
    pairs = [("cba=", "abc"), ("ba=", "ab"), ("edcba=", "abcde")]
    ids, attn, resp = encode(tok, pairs)
    batch = Batch(input_ids=ids, attention_mask=attn, response_mask=resp, prompts=[p for p, _ in pairs],
                  responses=[a for _, a in pairs], rows=[{"prompt": p} for p, _ in pairs])
    p = Plugin(Config(path=str(tmp_path / "rm"), normalize="running"), name="model")
    p.setup(ctx)
    raw = p.raw_scores(ctx, batch)
    first = p.reward(ctx, batch)["model"]
    # after the first batch the running statistics are exactly this batch's
    torch.testing.assert_close(first, (raw - raw.mean()) / raw.std(), rtol=1e-4, atol=1e-4)
    assert p.count == 3
    q = Plugin(Config(path=str(tmp_path / "rm"), normalize="running"), name="model")
    q.load_state(state=p.save_state())
    assert (q.mean, q.count) == (p.mean, p.count)


def test_model_reward_ensemble_mean_and_lower_confidence_bound(tmp_path):
    """reward.model.ensemble: each member normalised with its own saved stats, then mean or
    mean - k * std over the members (Coste et al. 2023)."""
    from rlfuse.data import Batch
    from rlfuse.plugins.reward.model import Config, Plugin

    stats = [(0.5, 2.0), (-1.0, 0.5), (0.0, 1.0)]
    for i, (mu, sd) in enumerate(stats):
        model, head, tok = tiny(seed=i)
        save_reward_model(model, head, tok, tmp_path / f"rm{i}", {"mean": mu, "std": sd})
    recorded = {}
    ctx = SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(max_prompt_length=16, truncation="left")),
                          device=torch.device("cpu"), record=recorded.update)
    pairs = [("cba=", "abc"), ("ba=", "ab"), ("edcba=", "abcde")]
    ids, attn, resp = encode(tok, pairs)
    batch = Batch(input_ids=ids, attention_mask=attn, response_mask=resp, prompts=[p for p, _ in pairs],
                  responses=[a for _, a in pairs], rows=[{"prompt": p} for p, _ in pairs])

    def run(**kw):
        p = Plugin(Config(path=str(tmp_path / "rm0"), **kw), name="model")
        p.setup(ctx)
        return p.reward(ctx, batch)["model"]

    each = torch.stack([Plugin(Config(path=str(tmp_path / f"rm{i}")), name="model").reward(ctx, batch)["model"]
                        for i in range(3)])
    ens = [str(tmp_path / "rm1"), str(tmp_path / "rm2")]
    torch.testing.assert_close(run(ensemble=ens), each.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run(ensemble=ens, combine="lcb", ensemble_k=2.0), each.mean(0) - 2.0 * each.std(0),
                               rtol=1e-4, atol=1e-5)
    assert recorded["reward/model/ensemble_std"] == pytest.approx(float(each.std(0).mean()), rel=1e-4)
    with pytest.raises(ValueError, match="combine"):
        Plugin(Config(path=str(tmp_path / "rm0"), combine="median"), name="model")
