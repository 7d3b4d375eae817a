"""Sampling responses from a causal LM into a :class:`~rlfuse.Batch` (shared by the
``generate`` rollout, the task evaluator and ``rlfuse label``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rlfuse.data import Batch, ForwardOutput, HeadInputs


@dataclass
class SamplingConfig:
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    greedy: bool = False
    share_prompt: bool = True  # prefill a prompt repeated in consecutive rows once (a group)
    engine: str = "auto"  # auto | rlfuse (decode()) | hf (transformers' generate)


ENGINES = ("auto", "rlfuse", "hf")
#: ``engine: auto`` runs rlfuse's decode loop from this vocabulary size up (see :func:`use_decode`)
DECODE_MIN_VOCAB = 8192


def forward_params(model: Any) -> Any:
    """The keyword names the model's ``forward`` accepts."""
    import inspect

    return inspect.signature(model.forward).parameters


def cache_arg(model: Any) -> str:
    """The name transformers gives the KV-cache argument (``cache`` from 5.x, before that
    ``past_key_values``)."""
    return "cache" if "cache" in forward_params(model) else "past_key_values"


def causal_lm(model: Any) -> Any:
    """The transformers model to call for cached decoding: a peft model's base model (its LoRA
    layers sit inside it, so the adapters apply), else ``model`` itself. peft's own ``forward``
    takes neither ``position_ids`` nor the cache by name."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def linear_head(model: Any) -> torch.nn.Linear | None:
    """The model's lm_head when it is a plain linear layer (what the sampler reads), else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if isinstance(head, torch.nn.Linear) else None


def shared_prompt_cache(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> Any | None:
    """A KV cache of the prompts' first ``P - 1`` tokens, computed once per distinct prompt and
    repeated for the rows that share it (a GRPO group: ``n`` copies); ``None`` when no two
    consecutive rows share their prompt or the model has no ``DynamicCache``.

    ``generate`` then runs only the last prompt token and the new ones: the prefill of a
    group's prompt is done once instead of ``n`` times (same math, up to float rounding).
    """
    B, P = ids.shape
    if B < 2 or P < 2:
        return None
    same = (ids[1:] == ids[:-1]).all(-1) & (mask[1:] == mask[:-1]).all(-1)  # row i+1 repeats row i
    if not bool(same.any()):
        return None
    try:
        from transformers import DynamicCache
    except ImportError:  # pragma: no cover
        return None
    first = torch.cat([same.new_ones(1), ~same])  # (B,) row starts a new prompt
    uniq = first.nonzero().squeeze(-1)  # (U,)
    owner = first.long().cumsum(0) - 1  # (B,) index into uniq of each row
    m = mask[uniq, :-1]
    pos = (m.long().cumsum(-1) - 1).clamp_min(0)
    model = causal_lm(model)
    cache = DynamicCache(config=model.config)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in forward_params(model) else {}  # only the cache is wanted
    model(input_ids=ids[uniq, :-1], attention_mask=m, position_ids=pos, use_cache=True, **{cache_arg(model): cache},
          **keep)
    cache.batch_select_indices(owner.to(ids.device))
    return cache


#: decode-step lm_head: rows are padded to this many when that was measured faster (see below)
SKINNY_ROWS = 16
_skinny_choice: dict[tuple, bool] = {}  # (V, H, rows, threads) -> pad?


def _time(fn: Any, reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@contextlib.contextmanager
def skinny_lm_head(model: Any, rows: int) -> Iterator[None]:
    """During generation, run the lm_head of a decode step (``rows`` < 16 hidden states) on
    the rows padded to 16 when that is faster on this machine.

    An fp32 (rows x H) @ (H x V) product with a large vocabulary is served by a different
    BLAS kernel below 16 rows: measured on a 2-core x86_64 VM with MKL, 8 rows x SmolLM2's
    49,152 x 576 head took 21 ms, 16 rows 13 ms (docs/performance.md). Which is faster is
    measured once per shape and thread count on the model's own weight (about 0.2 s) and
    remembered; the padded rows are zeros and cut off, so the logits are the same numbers up
    to float rounding. Only for fp32 weights on the CPU, outside autocast, vocabulary >= 8192.
    """
    head = linear_head(model)
    w = head.weight if head is not None else None
    if (
        w is None or w.device.type != "cpu" or w.dtype != torch.float32
        or not 2 <= rows < SKINNY_ROWS or w.shape[0] < 8192 or torch.is_autocast_enabled("cpu")
    ):
        yield
        return
    key = (tuple(w.shape), rows, torch.get_num_threads())
    if key not in _skinny_choice:
        x = torch.randn(rows, w.shape[1])
        xp = x.new_zeros(SKINNY_ROWS, w.shape[1])
        _skinny_choice[key] = _time(lambda: F.linear(xp, w, head.bias)) < 0.9 * _time(lambda: F.linear(x, w, head.bias))
    if not _skinny_choice[key]:
        yield
        return

    def forward(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        m = flat.shape[0]
        if not 2 <= m < SKINNY_ROWS:
            return F.linear(x, head.weight, head.bias)
        padded = flat.new_zeros(SKINNY_ROWS, flat.shape[1])
        padded[:m] = flat
        return F.linear(padded, head.weight, head.bias)[:m].reshape(*x.shape[:-1], -1)

    head.forward = forward  # an instance attribute: shadows the class's forward until deleted
    try:
        yield
    finally:
        del head.forward


@contextlib.contextmanager
def capture_head_inputs(model: Any) -> Iterator[list[torch.Tensor] | None]:
    """Record the hidden state each generation step feeds the lm_head (the last position of
    each call: the state the next token is sampled from), detached; ``None`` when the model's
    output embedding is not a plain linear layer."""
    head = linear_head(model)
    if head is None:
        yield None
        return
    caps: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda mod, args: caps.append(args[0][:, -1].detach()))
    try:
        yield caps
    finally:
        handle.remove()


def sampler_forward(model: Any, caps: list[torch.Tensor], input_ids: torch.Tensor, attention: torch.Tensor,
                    response_mask: torch.Tensor, P: int) -> ForwardOutput | None:
    """The sampling policy's forward on the generated batch, from the states generation
    computed (:func:`capture_head_inputs`) instead of a second pass over the sequences.

    Log-probs (temperature 1, like the training forward) come from the lm_head on those states
    through the same kernel as the training forward; ``hidden`` is (B, T, H) with the state
    before every response token (column ``t - 1`` for token ``t``: what a value head reads)
    and zeros elsewhere -- prompt positions are not recomputed. Same numbers as a no-grad
    forward up to float rounding (cached decoding sums in another order)."""
    from rlfuse.packing import scored_positions

    B, T = input_ids.shape
    L = T - P
    if L <= 0 or len(caps) < L:
        return None
    states = torch.stack(caps[:L], dim=1)  # (B, L, H): state before response token j
    hidden = states.new_zeros(B, T, states.shape[-1])
    hidden[:, P - 1 : P - 1 + L] = states
    bi, ti = scored_positions(response_mask, attention).nonzero(as_tuple=True)
    head = linear_head(model)
    inputs = HeadInputs(
        labels=input_ids[bi, ti], shape=(B, T), index=(bi, ti), hidden=hidden[bi, ti - 1], weight=head.weight,
        bias=head.bias,
    )  # fmt: skip
    return ForwardOutput(head=inputs, hidden=hidden)


def use_decode(model: Any, engine: str) -> bool:
    """Whether :func:`sample` runs :func:`decode` (else transformers' ``generate``).

    ``auto``: for a model with a plain linear lm_head over a vocabulary of at least
    ``DECODE_MIN_VOCAB`` tokens, where ``generate``'s per-step work costs measurable time
    (docs/performance.md); a small-vocabulary model (the tiny one) keeps ``generate`` and the
    seeded figures the docs quote. ``rlfuse`` needs the model to take a KV cache."""
    if engine == "hf" or not hasattr(model, "config"):
        return False
    if engine == "rlfuse":
        return True
    head = linear_head(model)
    return head is not None and head.weight.shape[0] >= DECODE_MIN_VOCAB


def draw(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """One token per row of ``logits`` (B, V): the argmax when ``greedy``, else a draw from
    softmax(logits / temperature) restricted to the ``top_k`` largest and to the smallest set
    whose probability reaches ``top_p`` (transformers' warpers, applied in that order).

    The draw inverts the cumulative distribution at one uniform number per row (a float64
    running sum), an exact categorical sample: ``torch.multinomial`` draws V exponential
    numbers per row instead (7-8 ms per decode step of 8 rows x 49,152 on a 2-core CPU)."""
    x = logits.float()
    if cfg.greedy:
        return x.argmax(-1)
    if cfg.temperature != 1.0:
        x = x / cfg.temperature
    V = x.shape[-1]
    if 0 < cfg.top_k < V:
        x = x.masked_fill(x < x.topk(cfg.top_k, dim=-1).values[..., -1:], float("-inf"))
    if cfg.top_p < 1.0:
        srt, idx = x.sort(dim=-1)  # ascending, like transformers' TopPLogitsWarper
        drop = srt.softmax(-1).cumsum(-1) <= 1 - cfg.top_p
        drop[..., -1] = False  # the most likely token always stays
        x = x.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    c = (x - x.amax(-1, keepdim=True)).exp_().cumsum(-1, dtype=torch.float64)  # unnormalised CDF
    u = torch.rand(c.shape[:-1] + (1,), dtype=torch.float64, device=c.device) * c[..., -1:]
    tok = torch.searchsorted(c, u, right=True)  # first index whose running sum exceeds u
    # u * total can round up to the total: then take the last token of non-zero weight
    return torch.minimum(tok, torch.searchsorted(c, c[..., -1:].contiguous())).squeeze(-1)


@torch.no_grad()
def decode(model: Any, ids: torch.Tensor, mask: torch.Tensor, cfg: SamplingConfig, eos_id: int | None,
           pad_id: int, cache: Any | None = None) -> torch.Tensor:
    """rlfuse's decode loop: ``(B, P)`` left-padded prompts -> ``(B, P + L)`` with the sampled
    tokens, pad after a row's first EOS; stops when every row has ended or after
    ``max_new_tokens``.

    The same sequence of model calls as transformers' ``generate`` with a dynamic KV cache (a
    prefill of the prompt -- or of its last token over ``cache``, a :func:`shared_prompt_cache`
    -- then one token per row per call), without its per-step machinery (logits processors,
    stopping criteria, input preparation) and with :func:`draw` for the sampling: only the
    temperature, top-k and top-p of ``cfg`` shape the distribution, never the model's own
    ``generation_config`` (what is trained is the policy that sampled)."""
    from transformers import DynamicCache

    B = ids.shape[0]
    model = causal_lm(model)
    params = forward_params(model)
    cache = cache if cache is not None else DynamicCache(config=model.config)
    done = cache.get_seq_length()  # prompt columns already in the cache
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    extra: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    cache_key = cache_arg(model)
    inp, at = ids[:, done:], pos[:, done:]
    attn = mask
    alive = torch.ones(B, dtype=torch.bool, device=ids.device)
    out: list[torch.Tensor] = []
    for _ in range(cfg.max_new_tokens):
        kw = dict(extra, position_ids=at) if "position_ids" in params else extra
        logits = model(input_ids=inp, attention_mask=attn, use_cache=True, **{cache_key: cache}, **kw).logits
        tok = draw(logits[:, -1], cfg)
        tok = torch.where(alive, tok, torch.full_like(tok, pad_id))
        out.append(tok)
        if eos_id is not None:
            alive &= tok != eos_id
        if not bool(alive.any()):
            break
        inp, at = tok[:, None], at[:, -1:] + 1
        attn = torch.cat([attn, attn.new_ones(B, 1)], dim=1)
    return torch.cat([ids, torch.stack(out, dim=1)], dim=1)


def left_pad(prompt_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask, (B, P) each."""
    P = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), P), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def sample(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    cfg: SamplingConfig,
    device: torch.device,
    capture: bool = False,
) -> Batch:
    """Generate one response per prompt id list (repeat prompts for several samples).

    Rows of the result are ``[left padding][prompt][response incl. EOS][padding]``;
    ``response_mask`` is 1 on the response tokens up to and including the first EOS. With
    ``capture``, ``rollout_forward`` holds the sampling policy's log-probs and hidden states
    from the generation itself (:func:`sampler_forward`; left unset when the model does not
    allow it).
    """
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    ids, mask = left_pad(prompt_ids, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    was_training = model.training
    model.eval()
    kwargs: dict[str, Any] = dict(
        max_new_tokens=cfg.max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    if cfg.greedy:
        kwargs.update(do_sample=False)
    else:
        kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or None)
    try:
        if cfg.share_prompt:
            cache = shared_prompt_cache(model, ids, mask)
            if cache is not None:
                kwargs[cache_arg(model)] = cache
        with skinny_lm_head(model, ids.shape[0]), (
            capture_head_inputs(model) if capture else contextlib.nullcontext()
        ) as caps:
            if use_decode(model, cfg.engine):
                out = decode(model, ids, mask, cfg, eos_id, pad_id, kwargs.get(cache_arg(model)))
            else:
                out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    finally:
        model.train(was_training)
    P = ids.shape[1]
    resp = out[:, P:]  # (B, L)
    if eos_id is not None:
        is_eos = resp == eos_id
        # 1 up to and including the first EOS
        after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        resp_mask = (~after).long()
    else:
        resp_mask = torch.ones_like(resp)
    resp = resp.masked_fill(resp_mask == 0, pad_id)
    L = int(resp_mask.sum(-1).max()) if resp.shape[1] else 0
    resp, resp_mask = resp[:, :L], resp_mask[:, :L]
    input_ids = torch.cat([ids, resp], dim=1)
    attention = torch.cat([mask, resp_mask], dim=1)
    response_mask = torch.cat([torch.zeros_like(mask), resp_mask], dim=1).float()
    texts = tokenizer.batch_decode(
        [r[m.bool()].tolist() for r, m in zip(resp, resp_mask, strict=True)], skip_special_tokens=True
    )
    prompts = tokenizer.batch_decode([p for p in prompt_ids], skip_special_tokens=True)
    batch = Batch(
        input_ids=input_ids,
        attention_mask=attention,
        response_mask=response_mask,
        prompts=prompts,
        responses=texts,
    )
    if caps is not None:
        batch.rollout_forward = sampler_forward(model, caps, input_ids, attention, response_mask, P)
    return batch
