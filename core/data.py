"""The records that flow through the hooks.

Token-level tensors are aligned with ``input_ids``: ``x[:, t]`` belongs to token ``t``. For
log-probs that means ``logprobs[:, t] = log pi(input_ids[:, t] | input_ids[:, :t])``; the first
column has no prediction and is 0. ``response_mask`` marks the tokens that are trained on
(the response, not the prompt or padding), so every masked mean uses it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

Tensor = torch.Tensor


@dataclass
class Batch:
    """One batch of sequences (prompt + response) and everything computed about them.

    B = number of sequences, T = padded length. Prompts are left-aligned and each row is
    ``prompt tokens, response tokens, padding``; ``attention_mask`` is 1 on real tokens.
    """

    input_ids: Tensor  # (B, T) long
    attention_mask: Tensor  # (B, T) long, 1 = real token
    response_mask: Tensor  # (B, T) float, 1 = token that is trained on / scored
    prompts: list[str] = field(default_factory=list)  # B prompt texts
    responses: list[str] = field(default_factory=list)  # B response texts
    rows: list[dict[str, Any]] = field(default_factory=list)  # the dataset row of each prompt
    group_ids: Tensor | None = None  # (B,) long: sequences sampled from the same prompt
    old_logprobs: Tensor | None = None  # (B, T) fp32, policy that generated the batch
    ref_logprobs: Tensor | None = None  # (B, T) fp32, frozen reference policy
    values: Tensor | None = None  # (B, T) fp32, critic estimate at each token
    rewards: Tensor | None = None  # (B,) fp32, weighted sum of sequence-level rewards
    token_rewards: Tensor | None = None  # (B, T) fp32, weighted sum of token-level rewards
    advantages: Tensor | None = None  # (B, T) fp32
    returns: Tensor | None = None  # (B, T) fp32, value targets
    extras: dict[str, Any] = field(default_factory=dict)  # plugin-specific per-row data
    # Counts over the whole mini-batch a micro-batch belongs to (set by the trainer):
    # {"tokens": masked response tokens, "sequences": rows}. Loss plugins divide by these.
    totals: dict[str, float] = field(default_factory=dict)
    # The no-grad forward of the policy that generated this batch, set by an online rollout
    # (``rollout=generate`` computes it for the old log-probs, with hidden states) so a
    # plugin needing the same numbers (the critic's old values) reuses it instead of a second
    # forward. Only on the rollout batch: ``select`` does not carry it to sub-batches. Built
    # from generation's own states (``rollout.old_logprobs: sampler``), ``hidden`` holds only the
    # state before each response token (zeros at the prompt positions).
    rollout_forward: ForwardOutput | None = field(default=None, repr=False)
    # Per-micro-batch scratch space (the trainer's shared forward pass lives here).
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Real tokens in the batch (prompt + response)."""
        return int(self.attention_mask.sum())

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    def response_lengths(self) -> Tensor:  # (B,)
        return self.response_mask.sum(-1)

    def select(self, index: Tensor | list[int] | slice) -> Batch:
        """Rows ``index`` of every per-row field (tensors, lists and per-row extras)."""
        n = len(self)
        if isinstance(index, slice):
            idx = torch.arange(n)[index]
        else:
            idx = torch.as_tensor(index, dtype=torch.long)
        positions = idx.tolist()
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "totals":
                kw[f.name] = {}
            elif f.name == "rollout_forward":
                kw[f.name] = None
            elif f.name == "cache":  # remember where the rows came from (see `root_rows`)
                kw[f.name] = {"parent": (self, idx)}
            elif f.name == "extras":
                kw[f.name] = {k: _take(x, idx, positions, n) for k, x in v.items()}
            else:
                kw[f.name] = _take(v, idx, positions, n)
        return Batch(**kw)

    def root_rows(self) -> tuple[Batch, Tensor | None]:
        """The batch this one was (repeatedly) selected from, and the rows it holds of it
        (None when it is a root). Lets a value computed once on the rollout batch -- reference
        log-probs, say -- be sliced for every mini- and micro-batch instead of recomputed."""
        batch, idx = self, None
        while "parent" in batch.cache:
            parent, rows = batch.cache["parent"]
            idx = rows if idx is None else rows[idx]
            batch = parent
        return batch, idx

    def split(self, size: int) -> Iterator[Batch]:
        """Consecutive chunks of at most ``size`` rows."""
        for start in range(0, len(self), size):
            yield self.select(slice(start, start + size))

    def to(self, device: torch.device | str) -> Batch:
        kw = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device) if isinstance(v, Tensor) else v
        kw["extras"] = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.extras.items()}
        return Batch(**kw)


def _take(value: Any, idx: Tensor, positions: list[int], n: int) -> Any:
    """Select rows of a per-row value; values that are not per-row are passed through."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value[idx.to(value.device)]
    if isinstance(value, list) and len(value) == n:
        return [value[i] for i in positions]
    return value


@dataclass
class Advantages:
    """What an ``advantage`` hook returns."""

    advantages: Tensor  # (B, T) fp32, zero outside the response
    returns: Tensor | None = None  # (B, T) fp32, targets for a critic
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class LossOutput:
    """What a ``loss`` hook may return: terms to add and statistics to log."""

    terms: dict[str, Tensor]  # scalar tensors; the core adds them all
    metrics: dict[str, float | Tensor] = field(default_factory=dict)  # averaged over micro-batches
    source: str = ""  # the plugin that returned it (set by the core; names it in errors)


@dataclass
class HeadInputs:
    """The policy's forward stopped before the lm_head's log-softmax (:meth:`Context.forward`
    with ``head=True``): what a loss plugin that fuses the lm_head, the log-softmax and its own
    loss into one pass needs (``loss=ppo`` with :func:`rlfuse.kernels.linear_policy_loss`).

    Two layouts, one API. *Rows* (``hidden`` and ``weight`` set, the usual one): the final hidden
    state predicting each scored token, ``(N, H)``, and the lm_head; the full logits never exist.
    *Logits* (``logits`` set; a model whose logits are not ``hidden @ lm_head.T``): the model's
    ``(B, T, V)`` logits, ``logits[:, t]`` predicting ``labels[:, t]``. :meth:`take` maps any
    token-aligned ``(B, T)`` tensor of the batch into the layout of ``labels``; :meth:`put` maps
    a result back.
    """

    labels: Tensor  # (N,) rows layout or (B, T) logits layout; -100 = not scored
    shape: tuple[int, int]  # (B, T) of the batch
    index: tuple[Tensor, Tensor] | None = None  # rows layout: (row, column) of each scored token
    hidden: Tensor | None = None  # (N, H) rows layout, with grad
    weight: Tensor | None = None  # (V, H) lm_head weight
    bias: Tensor | None = None  # (V,) lm_head bias or None
    logits: Tensor | None = None  # (B, T, V) logits layout, with grad
    temperature: float = 1.0

    def take(self, x: Tensor) -> Tensor:
        """A token-aligned (B, T) tensor in the layout of ``labels``."""
        if self.index is not None:
            return x[self.index]
        return torch.cat([x[:, 1:], x.new_zeros(x.shape[0], 1)], dim=1)  # column t predicts t + 1

    def put(self, values: Tensor) -> Tensor:
        """``values`` in the layout of ``labels`` back to a token-aligned (B, T) fp32 tensor, 0
        where nothing is scored."""
        B, T = self.shape
        if self.index is not None:
            return values.new_zeros((B, T), dtype=torch.float32).index_put(self.index, values.float())
        scored = (self.labels != -100).float()
        return torch.cat([values.new_zeros((B, 1), dtype=torch.float32), (values.float() * scored)[:, :-1]], dim=1)

    def logprobs(self, entropy: bool) -> tuple[Tensor, Tensor | None]:
        """Token log-probs (and entropy) as (B, T) fp32, the way the plain forward computes them."""
        from rlfuse.kernels import linear_token_logprobs, token_logprobs

        if self.logits is not None:
            res = token_logprobs(self.logits, self.labels, temperature=self.temperature, return_entropy=entropy)
        else:
            res = linear_token_logprobs(
                self.hidden, self.weight, self.labels, bias=self.bias, temperature=self.temperature,
                return_entropy=entropy,
            )  # fmt: skip
        lp, ent = res if entropy else (res, None)
        return self.put(lp), (self.put(ent) if ent is not None else None)


class ForwardOutput:
    """The policy's forward pass on a batch (see :meth:`rlfuse.trainer.Context.forward`).

    * ``logprobs``: (B, T) fp32, aligned with input_ids (column 0 is 0);
    * ``entropy``: (B, T) fp32 or None;
    * ``hidden``: (B, T, H) final hidden states (after the last norm) or None;
    * ``head``: :class:`HeadInputs` when the forward stopped before the lm_head. Log-probs
      and entropy are then computed from it when first read (a plugin that reads them anyway
      gets the same numbers; the model itself does not run again).
    """

    def __init__(
        self,
        logprobs: Tensor | None = None,
        entropy: Tensor | None = None,
        hidden: Tensor | None = None,
        head: HeadInputs | None = None,
        head_entropy: bool = False,
    ) -> None:
        if logprobs is None and head is None:
            raise ValueError("ForwardOutput needs logprobs or head inputs")
        self._logprobs, self._entropy = logprobs, entropy
        self.hidden = hidden
        self.head = head
        self._head_entropy = head_entropy  # compute the entropy too when deriving from ``head``
        self.with_grad = torch.is_grad_enabled() if head is not None else logprobs.requires_grad  # built for training

    def _derive(self) -> None:
        assert self.head is not None
        with torch.set_grad_enabled(self.with_grad):
            self._logprobs, self._entropy = self.head.logprobs(self._head_entropy)

    @property
    def logprobs(self) -> Tensor:
        if self._logprobs is None:
            self._derive()
        return self._logprobs  # type: ignore[return-value]

    @property
    def entropy(self) -> Tensor | None:
        if self._logprobs is None and self._head_entropy:
            self._derive()
        return self._entropy

    @property
    def has_entropy(self) -> bool:
        """Whether ``entropy`` is (or will be, on first read) set, without computing it."""
        return self._entropy is not None or (self._logprobs is None and self._head_entropy)

    def __repr__(self) -> str:
        return f"ForwardOutput(head={self.head is not None}, hidden={self.hidden is not None})"
