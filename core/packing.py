"""Less model work in a forward pass: score only what is scored, run a shared prompt once.

:func:`rlfuse.models.forward` computes token log-probs of a batch of ``prompt + answer`` rows.
Three things in such a batch cost compute and change nothing in the result:

* **unscored positions.** Only the tokens under ``response_mask`` are trained on. The lm_head
  (hidden x vocab, a fifth of a 135M model's forward at a 49k vocabulary) and the log-softmax
  run only on the rows of the hidden states that predict a scored token
  (:func:`scored_positions`); log-probs elsewhere are 0.
* **padding columns.** Columns where every row is padding are dropped before the model runs
  (:func:`trim_columns`): a micro-batch cut from a longer batch is as long as its longest row.
* **a prompt shared by several rows.** DPO's chosen and rejected answers share their prompt;
  a GRPO group holds ``n`` answers to one prompt. :func:`plan_shared_prefixes` lays out each
  set of rows with the same prompt as ONE sequence ``prompt, answer_1, ..., answer_k`` with
  per-answer position ids (each answer continues at the prompt's end) and a 4D attention mask
  in which an answer sees the prompt and itself only. Every token then sees exactly the
  tokens, at the same positions, that it sees in its own row: the same math, with the prompt's
  layers computed once instead of ``k`` times (Wang et al. 2024 call it prefix sharing).
* **a prefix common to different prompts** (``common=True``): a system prompt and a task's
  fixed wording head every prompt of a batch (SmolLM2's chat template: 27 of a 47-token
  prompt). The whole batch then becomes ONE sequence ``common prefix, rest of prompt 1,
  its answers, rest of prompt 2, its answers, ...``: every token also sees the common
  prefix, at the same positions as in its row. Taken only when it computes fewer positions
  than the per-prompt layout and the sequence stays at most :data:`MAX_COMMON_LENGTH` long
  (one sequence's attention grows with the square of its length).

All three are equal to the plain forward up to float rounding (tests/core/test_packing.py
checks log-probs, entropy, hidden states and gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor

# Share prefixes only when the packed layout computes at most this fraction of the padded
# layout's token positions (the 4D mask and the scatter back are not free).
MIN_SAVING = 0.15
# The common-prefix layout: a prefix of at least this many tokens, a sequence of at most this many.
MIN_COMMON_PREFIX = 8
MAX_COMMON_LENGTH = 2048
_ROOT = -2  # the group index of the common prefix's positions


def scored_positions(response_mask: Tensor, attention_mask: Tensor) -> Tensor:  # (B, T) bool
    """Tokens whose log-prob is needed: response tokens that follow a real token."""
    prev_real = torch.zeros_like(attention_mask, dtype=torch.bool)
    prev_real[:, 1:] = attention_mask[:, :-1] > 0
    return (response_mask > 0) & prev_real


def trim_columns(attention_mask: Tensor) -> slice:
    """The columns between the first and the last that hold a real token in any row."""
    real = (attention_mask > 0).any(0).nonzero()
    if real.numel() == 0:
        return slice(0, attention_mask.shape[1])
    return slice(int(real[0]), int(real[-1]) + 1)


@dataclass
class SharedLayout:
    """Rows with the same prompt packed as one sequence (see the module docstring).

    G = packed sequences, L = their padded length, B x T = the original batch.
    """

    input_ids: Tensor  # (G, L)
    position_ids: Tensor  # (G, L)
    allowed: Tensor  # (G, 1, L, L) bool: query i may attend key j
    where: Tensor  # (B, T) long: index into the flattened (G * L) layout of each real token, -1 on padding
    packed_positions: int  # G * L
    original_positions: int  # B * T

    def attention_mask(self, implementation: str, dtype: torch.dtype) -> Tensor:
        """The 4D mask as the attention implementation wants it (bool for SDPA, additive for eager)."""
        if implementation == "eager":
            mask = torch.zeros(self.allowed.shape, dtype=dtype, device=self.allowed.device)
            return mask.masked_fill(~self.allowed, torch.finfo(dtype).min)
        return self.allowed


def plan_shared_prefixes(
    input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor, position_ids: Tensor,
    min_saving: float = MIN_SAVING, pack: bool = False, share: bool = True, common: bool = False,
) -> SharedLayout | None:
    """Group rows whose tokens before their first response token are equal; ``None`` when no
    prompt is shared (and ``pack`` is off) or the layout saves less than ``min_saving`` of the
    positions of the padded batch (its all-padding columns dropped).

    A row's *prefix* is its real tokens before the first response token, its *answer* the real
    tokens from there on. Real tokens must be contiguous in each row (left or right padding).

    With ``pack``, groups -- a shared prompt with its answers, or a row that shares nothing --
    are also placed one after another in the same packed sequence (first-fit by decreasing
    length, no sequence longer than the longest group): padding-free packing with
    per-sequence position ids and a block-diagonal mask, so rows of very uneven length stop
    paying for each other's padding. ``share=False`` packs without sharing prompts (each row
    its own group). ``common`` (with ``share``, without ``pack``) also runs a prefix common to
    all the prompts once, the whole batch in one sequence (module docstring).
    """
    B, T = input_ids.shape
    attn = (attention_mask > 0).cpu()
    resp = (response_mask > 0).cpu()
    ids_cpu = input_ids.cpu()
    groups: dict[tuple, list[tuple[int, list[int]]]] = {}
    prefixes: dict[tuple, list[int]] = {}
    starts: list[int] = []  # each row's first real column (its real columns are contiguous)
    for b in range(B):
        real = attn[b].nonzero().squeeze(-1).tolist()
        if not real:
            return None
        if real[-1] - real[0] + 1 != len(real):
            return None  # holes in a row: not a layout this packs
        starts.append(real[0])
        first = resp[b].nonzero()
        start = int(first[0]) if first.numel() and share else real[-1] + 1
        prefix = [t for t in real if t < start]  # without sharing: the whole row, no answer
        answer = [t for t in real if t >= start]
        key = tuple(ids_cpu[b, prefix].tolist()) if share else (b, -1)  # -1: never a token id
        groups.setdefault(key, []).append((b, answer))
        prefixes.setdefault(key, prefix and [b, *prefix])  # the row and columns of one copy
    keys = list(groups)
    plen = {k: max(0, len(prefixes[k]) - 1) for k in keys}  # prefix tokens of each group
    lengths = [plen[k] + sum(len(a) for _, a in groups[k]) for k in keys]
    root = merged = 0  # the prefix common to every group, the one sequence holding them all
    if common and share and not pack and len(keys) > 1:
        c = 0
        shortest = min(len(k) for k in keys)
        while c < shortest and all(k[c] == keys[0][c] for k in keys):
            c += 1
        merged = sum(lengths) - (len(keys) - 1) * c
        if c >= MIN_COMMON_PREFIX and merged <= MAX_COMMON_LENGTH and merged < len(keys) * max(lengths):
            root = c
    shared = [k for k, rows in groups.items() if len(rows) > 1 and len(prefixes[k]) > 0]
    if not shared and not pack and not root:
        return None
    # bins[g] = the groups (indices into keys) laid out one after another in packed sequence g
    if pack:
        cap = max(lengths)
        bins: list[list[int]] = []
        fill: list[int] = []
        for i in sorted(range(len(keys)), key=lambda i: -lengths[i]):
            g = next((g for g, f in enumerate(fill) if f + lengths[i] <= cap), None)
            if g is None:
                bins.append([i])
                fill.append(lengths[i])
            else:
                bins[g].append(i)
                fill[g] += lengths[i]
    elif root:  # one sequence: the common prefix once, then every group without it
        bins, fill = [list(range(len(keys)))], [merged]
    else:
        bins, fill = [[i] for i in range(len(keys))], lengths
    G, L = len(bins), max(fill)
    cols = trim_columns(attention_mask)
    if G * L > (1 - min_saving) * B * (cols.stop - cols.start):
        return None

    dev = input_ids.device
    ids = torch.zeros((G, L), dtype=input_ids.dtype)
    pos = torch.zeros((G, L), dtype=position_ids.dtype)
    grp = torch.full((G, L), -1, dtype=torch.long)  # which group a position belongs to, -1 = padding
    seg = torch.full((G, L), -1, dtype=torch.long)  # 0 = the group's prefix, i = its answer i
    where = torch.full((B, T), -1, dtype=torch.long)
    pos_cpu = position_ids.cpu()

    def put(g: int, at: int, b: int, cols, segment: int, group: int) -> None:
        """Row ``b``'s tokens at ``cols`` into packed sequence ``g`` from position ``at``."""
        k = len(cols)
        ids[g, at : at + k] = ids_cpu[b, cols]
        pos[g, at : at + k] = pos_cpu[b, cols]
        seg[g, at : at + k] = segment
        grp[g, at : at + k] = group

    for g, members in enumerate(bins):
        at = 0
        if root:  # the common prefix, from the first group's copy (every row has it at positions 0..root-1)
            put(g, 0, prefixes[keys[0]][0], prefixes[keys[0]][1 : 1 + root], 0, _ROOT)
            for b in range(B):
                where[b, starts[b] : starts[b] + root] = g * L + torch.arange(root)
            at = root
        for gi in members:
            key, rows = keys[gi], groups[keys[gi]]
            n = plen[key] - root  # the prompt's tokens after the common prefix
            if n:
                put(g, at, prefixes[key][0], prefixes[key][1 + root :], 0, gi)
                for b, _ in rows:  # every row's prompt tokens map to the one shared copy
                    where[b, starts[b] + root : starts[b] + root + n] = g * L + at + torch.arange(n)
            at += n
            for i, (b, answer) in enumerate(rows, 1):
                k = len(answer)
                if k:
                    put(g, at, b, answer, i, gi)
                    where[b, answer] = g * L + at + torch.arange(k)
                at += k
    q = torch.arange(L)
    causal = q[None, :] <= q[:, None]  # (L, L): key j <= query i
    sq, sk = seg[:, :, None], seg[:, None, :]  # (G, L, 1), (G, 1, L)
    same = grp[:, :, None] == grp[:, None, :]  # block-diagonal: a group sees only itself
    allowed = same & (((sk == 0) & (sq >= 0)) | (sk == sq))  # padding queries see padding
    if root:  # and every real token sees the common prefix
        allowed |= (grp[:, None, :] == _ROOT) & (sq >= 0)
    allowed &= causal
    return SharedLayout(
        input_ids=ids.to(dev),
        position_ids=pos.to(dev),
        allowed=allowed[:, None].to(dev),
        where=where.to(dev),
        packed_positions=G * L,
        original_positions=B * T,
    )
