"""The less-work forward (rlfuse.packing via rlfuse.models.forward) equals the plain one.

Reference: the model's own full logits on the padded batch, log_softmax, gathered -- the
naive computation. Checked: log-probs and entropy on the scored tokens, final hidden states
on the real tokens, and the gradients of all parameters, for DPO-like pairs (right padding,
chosen/rejected share a prompt), GRPO-like groups (left padding, n answers per prompt, EOS
then padding) and rows sharing nothing, with SDPA and eager attention.
"""

from __future__ import annotations

import pytest
import torch

from rlfuse import models, packing
from rlfuse.config import ModelConfig
from rlfuse.data import Batch
from rlfuse.plugins._data.records import pack
from rlfuse.plugins._sampling import left_pad


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    tok = models.build_tiny_tokenizer()
    m = models.build_tiny_model(ModelConfig(), tok, seed=0)
    return m


def plain(model, batch: Batch):
    """Naive: full logits of the padded batch, log_softmax, gather (scored tokens only)."""
    ids, mask = batch.input_ids, batch.attention_mask
    out = model(input_ids=ids, attention_mask=mask, position_ids=models.position_ids(mask), output_hidden_states=True)
    logp = torch.log_softmax(out.logits.float(), -1)  # (B, T, V)
    lp = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    ent = -(logp.exp() * logp).sum(-1)[:, :-1]
    pad = lp.new_zeros(lp.shape[0], 1)
    score = packing.scored_positions(batch.response_mask, mask).float()
    return torch.cat([pad, lp], 1) * score, torch.cat([pad, ent], 1) * score, out.hidden_states[-1]


def run(model, batch, fn):
    model.zero_grad()
    lp, ent, h = fn(model, batch)
    real = batch.attention_mask[..., None].float()
    loss = lp.sum() + 0.1 * ent.sum() + 1e-2 * (h * real).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), ent.detach(), (h * real).detach(), grads


def fast(model, batch):
    out = models.forward(model, batch, entropy=True, hidden=True)
    return out.logprobs, out.entropy, out.hidden


def rand_ids(g, n):
    return torch.randint(4, 99, (n,), generator=g).tolist()


def dpo_batch(seed=0, P=3):
    g = torch.Generator().manual_seed(seed)
    prompts = [rand_ids(g, 12 + 3 * i) for i in range(P)]
    chosen = [rand_ids(g, 2 + i) + [2] for i in range(P)]
    rejected = [rand_ids(g, 6 - i) + [2] for i in range(P)]
    ids, attn, resp = pack(prompts * 2, chosen + rejected, pad_id=0)
    return Batch(ids, attn, resp)


def grpo_batch(seed=0, prompts=2, n=3, L=6):
    """Left-padded prompts, n sampled answers each, EOS then padding (like ``sample``)."""
    g = torch.Generator().manual_seed(seed)
    ps = [rand_ids(g, 9 + 4 * i) for i in range(prompts)]
    ids, mask = left_pad([p for p in ps for _ in range(n)], pad_id=0)
    B = ids.shape[0]
    resp = torch.randint(4, 99, (B, L), generator=g)
    lens = torch.randint(1, L + 1, (B,), generator=g)
    rmask = (torch.arange(L)[None] < lens[:, None]).long()
    resp = resp.masked_fill(rmask == 0, 0)
    return Batch(torch.cat([ids, resp], 1), torch.cat([mask, rmask], 1),
                 torch.cat([torch.zeros_like(mask), rmask], 1).float())


def assert_same(a, b, rtol=1e-4, atol=1e-5):
    for x, y, what in zip(a[:3], b[:3], ("logprobs", "entropy", "hidden"), strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m, w=what: f"{w}: {m}")
    assert a[3].keys() == b[3].keys()
    for k in a[3]:
        torch.testing.assert_close(a[3][k], b[3][k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"grad {k}: {m}")


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("make", [dpo_batch, grpo_batch], ids=["dpo-pairs", "grpo-groups"])
def test_forward_equals_plain(model, make, share, monkeypatch):
    monkeypatch.setattr(models, "SHARE_PREFIX", share)
    batch = make()
    assert_same(run(model, batch, fast), run(model, batch, plain))


def test_eager_attention_equals_plain(model, monkeypatch):
    monkeypatch.setattr(model.config, "_attn_implementation", "eager")
    batch = grpo_batch(seed=1)
    assert packing.plan_shared_prefixes(
        batch.input_ids, batch.attention_mask, batch.response_mask, models.position_ids(batch.attention_mask)
    ) is not None
    assert_same(run(model, batch, fast), run(model, batch, plain))


def test_layout_shares_and_saves():
    batch = dpo_batch(P=4)
    pos = models.position_ids(batch.attention_mask)
    lay = packing.plan_shared_prefixes(batch.input_ids, batch.attention_mask, batch.response_mask, pos)
    assert lay is not None and lay.input_ids.shape[0] == 4  # one packed sequence per pair
    assert lay.packed_positions < 0.85 * lay.original_positions
    # every real token maps to a packed position holding the same token id and position id
    real = batch.attention_mask.bool()
    flat_ids = lay.input_ids.reshape(-1)[lay.where[real]]
    assert torch.equal(flat_ids, batch.input_ids[real])
    assert torch.equal(lay.position_ids.reshape(-1)[lay.where[real]], pos[real])
    assert (lay.where[~real] == -1).all()


def test_no_layout_when_nothing_is_shared():
    g = torch.Generator().manual_seed(3)
    ids, attn, resp = pack([rand_ids(g, 10), rand_ids(g, 11)], [rand_ids(g, 3), rand_ids(g, 4)], pad_id=0)
    pos = models.position_ids(attn)
    assert packing.plan_shared_prefixes(ids, attn, resp, pos) is None


def test_trimmed_micro_batch_equals_plain(model, monkeypatch):
    monkeypatch.setattr(models, "SHARE_PREFIX", False)
    batch = dpo_batch(P=3)
    part = batch.select([0, 3])  # the shortest pair: trailing all-padding columns
    cols = packing.trim_columns(part.attention_mask)
    assert cols.stop < part.input_ids.shape[1]
    assert_same(run(model, part, fast), run(model, part, plain))


def test_unscored_positions_are_zero(model):
    batch = dpo_batch()
    with torch.no_grad():
        out = models.forward(model, batch, entropy=True)
    off = ~packing.scored_positions(batch.response_mask, batch.attention_mask)
    assert (out.logprobs[off] == 0).all() and (out.entropy[off] == 0).all()
    assert (out.logprobs[~off] < 0).all()


def test_no_scored_token_still_differentiable(model):
    """A batch with an empty response_mask (a reward model reading hidden states, say)."""
    ids = torch.randint(4, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    batch = Batch(ids, torch.ones_like(ids), torch.zeros(2, 7))
    out = models.forward(model, batch, entropy=True, hidden=True)
    assert (out.logprobs == 0).all() and out.logprobs.requires_grad
    (out.logprobs.sum() + out.hidden.sum()).backward()


def test_forward_under_bf16_autocast(model):
    """bf16-mixed (autocast): the scored forward runs, trains, and tracks fp32 loosely."""
    batch = dpo_batch()
    with torch.no_grad():
        ref = models.forward(model, batch).logprobs
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = models.forward(model, batch, entropy=True, hidden=True)
        out.logprobs.sum().backward()
    assert out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, ref, rtol=0.05, atol=0.1)
    assert all(p.grad is None or p.grad.dtype == p.dtype for p in model.parameters())
    assert model.get_output_embeddings().weight.grad is not None


# ------------------------------------------------------------ padding-free packing (model.pack)


def sft_batch(seed=0, rows=7):
    """Rows that share nothing, of very uneven length (right padding, like ``sft_data``)."""
    g = torch.Generator().manual_seed(seed)
    lens = [3, 25, 6, 2, 17, 9, 4, 30, 5][:rows]
    prompts = [rand_ids(g, 2 + (n % 5)) for n in lens]
    answers = [rand_ids(g, n) for n in lens]
    ids, attn, resp = pack(prompts, answers, pad_id=0)
    return Batch(ids, attn, resp)


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("make", [sft_batch, dpo_batch, grpo_batch], ids=["sft-rows", "dpo-pairs", "grpo-groups"])
def test_packed_forward_equals_plain(model, make, share, monkeypatch):
    """Rows packed one after another into common sequences (per-row position ids, a
    block-diagonal mask): log-probs, entropy, hidden states and every gradient as the plain
    padded forward."""
    monkeypatch.setattr(models, "SHARE_PREFIX", share)
    monkeypatch.setattr(models, "PACK", True)
    batch = make()
    pos = models.position_ids(batch.attention_mask)
    lay = packing.plan_shared_prefixes(batch.input_ids, batch.attention_mask, batch.response_mask, pos,
                                       pack=True, share=share)  # fmt: skip
    if make is sft_batch or share:  # rows of even length that share nothing: not worth packing
        assert lay is not None and lay.packed_positions < 0.85 * lay.original_positions
    assert_same(run(model, batch, fast), run(model, batch, plain))


def test_packed_eager_attention_equals_plain(model, monkeypatch):
    monkeypatch.setattr(model.config, "_attn_implementation", "eager")
    monkeypatch.setattr(models, "PACK", True)
    assert_same(run(model, sft_batch(seed=2), fast), run(model, sft_batch(seed=2), plain))


def test_packed_layout_is_block_diagonal():
    """Every real token maps to a packed position with its id and position id; no packed
    sequence is longer than the longest row; a token sees only earlier tokens of its own row."""
    batch = sft_batch(seed=1)
    pos = models.position_ids(batch.attention_mask)
    lay = packing.plan_shared_prefixes(batch.input_ids, batch.attention_mask, batch.response_mask, pos, pack=True)
    real = batch.attention_mask.bool()
    assert lay.input_ids.shape[0] < batch.input_ids.shape[0]  # rows really share sequences
    assert lay.input_ids.shape[1] == int(batch.attention_mask.sum(1).max())
    assert torch.equal(lay.input_ids.reshape(-1)[lay.where[real]], batch.input_ids[real])
    assert torch.equal(lay.position_ids.reshape(-1)[lay.where[real]], pos[real])
    G, L = lay.input_ids.shape
    allowed = lay.allowed[:, 0]
    for b in range(len(batch)):
        for t in real[b].nonzero().squeeze(-1).tolist():
            g, i = divmod(int(lay.where[b, t]), L)
            seen = set(allowed[g, i].nonzero().squeeze(-1).tolist())
            want = {int(lay.where[b, s]) % L for s in range(t + 1) if real[b, s]}
            assert seen == want, (b, t)


def test_packed_reward_scores_equal_plain(model, monkeypatch):
    """A reward model (``loss=bradley_terry``) reads the last hidden state of each row: its
    scores and their gradients are the same packed."""
    from rlfuse.plugins.loss.bradley_terry import pool_last

    batch = sft_batch(seed=3)
    batch.response_mask = torch.zeros_like(batch.response_mask)  # the reward model scores no token
    head = torch.nn.Linear(model.config.hidden_size, 1, bias=False)
    torch.nn.init.normal_(head.weight, generator=torch.Generator().manual_seed(0))

    def scores(pack):
        monkeypatch.setattr(models, "PACK", pack)
        model.zero_grad()
        head.zero_grad()
        out = models.forward(model, batch, hidden=True)
        s = head(pool_last(out.hidden, batch.attention_mask)).squeeze(-1)
        (s * torch.arange(1.0, len(batch) + 1)).sum().backward()
        return s.detach(), [p.grad.clone() for p in (*model.parameters(), head.weight) if p.grad is not None]

    (s1, g1), (s0, g0) = scores(True), scores(False)
    torch.testing.assert_close(s1, s0, rtol=1e-4, atol=1e-5)
    assert len(g1) == len(g0)
    for a, b in zip(g1, g0, strict=True):  # summed over rows in another order: rounding
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- a prefix common to different prompts


def common_batch(kind="grpo", seed=0, c=10, n=3):
    """Prompts that share their first ``c`` tokens (a system prompt), then differ; one prompt
    is the common prefix itself (nothing of its own)."""
    g = torch.Generator().manual_seed(seed)
    head = rand_ids(g, c)
    prompts = [head + rand_ids(g, 5 + 3 * i) for i in range(2)] + [list(head)]
    if kind == "dpo":  # right padding, chosen and rejected per prompt
        chosen = [rand_ids(g, 2 + i) + [2] for i in range(3)]
        rejected = [rand_ids(g, 5 - i) + [2] for i in range(3)]
        ids, attn, resp = pack(prompts * 2, chosen + rejected, pad_id=0)
        return Batch(ids, attn, resp)
    ids, mask = left_pad([p for p in prompts for _ in range(n)], pad_id=0)
    B, L = ids.shape[0], 5
    resp = torch.randint(4, 99, (B, L), generator=g)
    rmask = (torch.arange(L)[None] < torch.randint(1, L + 1, (B,), generator=g)[:, None]).long()
    resp = resp.masked_fill(rmask == 0, 0)
    return Batch(torch.cat([ids, resp], 1), torch.cat([mask, rmask], 1),
                 torch.cat([torch.zeros_like(mask), rmask], 1).float())


def plan(batch, **kw):
    pos = models.position_ids(batch.attention_mask)
    return packing.plan_shared_prefixes(batch.input_ids, batch.attention_mask, batch.response_mask, pos, **kw)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["grpo", "dpo"])
def test_common_prefix_forward_equals_plain(model, kind, attn, monkeypatch):
    monkeypatch.setattr(models, "LARGE_VOCAB", 0)  # the tiny model's vocabulary counts as large
    monkeypatch.setattr(model.config, "_attn_implementation", attn)
    batch = common_batch(kind)
    lay = plan(batch, common=True)
    assert lay is not None and lay.input_ids.shape[0] == 1  # the whole batch in one sequence
    assert_same(run(model, batch, fast), run(model, batch, plain))


def test_common_prefix_layout_maps_every_token_and_saves():
    batch = common_batch("grpo")
    per_prompt, common = plan(batch), plan(batch, common=True)
    assert common.packed_positions < per_prompt.packed_positions
    pos = models.position_ids(batch.attention_mask)
    real = batch.attention_mask.bool()
    assert torch.equal(common.input_ids.reshape(-1)[common.where[real]], batch.input_ids[real])
    assert torch.equal(common.position_ids.reshape(-1)[common.where[real]], pos[real])
    first = common.where[:, :].gather(1, real.long().argmax(1, keepdim=True))  # each row's first real token
    assert (first == 0).all()  # every row's prompt starts at the one common copy
    allowed = common.allowed[0, 0]
    assert allowed[:, :10].sum(0).eq(allowed.shape[0] - torch.arange(10)).all()  # everyone sees the prefix


def test_short_common_prefix_keeps_the_per_prompt_layout():
    batch = common_batch("grpo", c=packing.MIN_COMMON_PREFIX - 1)
    lay = plan(batch, common=True)
    assert lay is not None and lay.input_ids.shape[0] == 3  # one sequence per prompt
    assert plan(common_batch("grpo"), common=True, pack=True).input_ids.shape[0] >= 1  # pack: its own layout
