"""``loss=bradley_terry`` (the plugin ``reward_model``): train a scalar reward model on pairs.

The reward model is the policy's transformer trunk plus a linear head ``w`` (no bias) read
at the last real token of ``prompt + answer + EOS`` (the EOS itself)::

    r(x, y) = w . h_last(x, y)

It is trained with the Bradley-Terry pairwise loss, with an optional margin ``m`` (a constant
``margin`` plus, when ``use_data_margin``, the row's own ``margin`` field)::

    loss = mean over pairs of  -log sigma(r(x, y_c) - r(x, y_r) - m)

The batch comes from ``rollout=preference_data`` (chosen rows first, then rejected; the
pair of each row in ``extras["pair"]``); trunk and head are trained together.

``evaluate`` reports held-out pairwise accuracy on ``data.eval_preferences``
(``eval/pref/accuracy``: fraction of pairs with ``r_c > r_r``, a tie counting 1/2) and the
mean margin ``eval/pref/margin``. At ``teardown`` the trunk and head are written as a
transformers ``AutoModelForSequenceClassification`` folder (``num_labels=1``,
``pad_token_id`` set) at ``<run_dir>/<output>`` with the tokenizer and
``rlfuse_reward.json`` (the mean/std of the scores of the training answers, used by
``reward=model normalize=saved``, and the input format).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rlfuse import hookimpl
from rlfuse.data import Batch, LossOutput
from rlfuse.errors import require
from rlfuse.plugins._data.pairs import split_pairs

Tensor = torch.Tensor
STATS_FILE = "rlfuse_reward.json"
FORMAT = "prompt + answer + EOS, score read at the last attended token"


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | float = 0.0) -> Tensor:
    """Per-pair Bradley-Terry loss ``-log sigma(r_c - r_r - m)``, shape (P,), float32."""
    return -F.logsigmoid(chosen.float() - rejected.float() - margin)


def last_token_index(attention_mask: Tensor) -> Tensor:  # (B,)
    """Position of the last attended token of each row (works for left and right padding)."""
    T = attention_mask.shape[1]
    pos = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask > 0, pos, torch.full_like(pos, -1)).max(-1).values.clamp_min(0)


def pool_last(hidden: Tensor, attention_mask: Tensor) -> Tensor:  # (B, H)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]


def pair_scores(scores: Tensor, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """(chosen, rejected, margin) per pair, ordered by pair id, from a pair batch's row scores."""
    _, c, r = split_pairs(batch, scores.device, "the reward model")
    margin = batch.extras.get("margin")
    m = margin.to(scores.device)[c] if margin is not None else torch.zeros(len(c), device=scores.device)
    return scores[c], scores[r], m


@dataclass
class Config:
    margin: float = 0.0  # constant margin m in -log sigma(r_c - r_r - m)
    use_data_margin: bool = True  # add each row's `margin` field to m
    head_lr: float | None = None  # learning rate of the head (default: algo.lr)
    output: str = "reward_model"  # folder under the run dir written at teardown
    eval_pairs: int = 200  # first N held-out pairs (0 = no evaluation)
    eval_batch_size: int = 100  # pairs per forward in evaluate
    stats_pairs: int = 1000  # training pairs scored at teardown for the saved mean/std

    def __post_init__(self) -> None:
        require(self.head_lr is None or self.head_lr > 0, "head_lr", "> 0 or null", self.head_lr)
        require(self.eval_pairs >= 0, "eval_pairs", ">= 0", self.eval_pairs)
        require(self.eval_batch_size >= 1, "eval_batch_size", ">= 1", self.eval_batch_size)
        require(self.stats_pairs >= 0, "stats_pairs", ">= 0", self.stats_pairs)


class Plugin:
    Config = Config

    def __init__(self, cfg: Config, name: str = "bradley_terry") -> None:
        self.cfg = cfg
        self.name = name
        self.head: nn.Linear | None = None
        self.eval_items: list[Any] = []

    @hookimpl
    def setup(self, ctx: Any) -> None:
        from rlfuse.plugins._data.pairs import load_pairs

        hidden = ctx.policy.config.hidden_size
        head = nn.Linear(hidden, 1, bias=False)
        nn.init.normal_(head.weight, std=1.0 / math.sqrt(hidden + 1))
        dtype = next(ctx.policy.parameters()).dtype
        self.head = ctx.add_module("reward_head", head.to(dtype), lr=self.cfg.head_lr)
        ctx.require_forward(hidden=True)  # the score is read from the trunk's last hidden state
        path = ctx.cfg.data.eval_preferences
        if path and self.cfg.eval_pairs:
            self.eval_items = load_pairs(ctx, path)[: self.cfg.eval_pairs]

    def scores(self, ctx: Any, batch: Batch) -> Tensor:
        """(B,) reward of every row, from the policy trunk's shared forward (with grad)."""
        out = ctx.forward(batch, hidden=True)
        return self.head(pool_last(out.hidden, batch.attention_mask)).squeeze(-1).float()

    def _scores_no_grad(self, ctx: Any, batch: Batch) -> Tensor:
        with torch.no_grad():
            out = ctx.forward(batch, model=ctx.policy, hidden=True)
            return self.head(pool_last(out.hidden, batch.attention_mask)).squeeze(-1).float()

    @hookimpl
    def loss(self, ctx: Any, batch: Batch) -> LossOutput:
        c, r, m = pair_scores(self.scores(ctx, batch), batch)
        margin = self.cfg.margin + (m if self.cfg.use_data_margin else 0.0)
        losses = bradley_terry_loss(c, r, margin)
        n_pairs = batch.totals.get("sequences", float(len(batch))) / 2
        d = (c - r).detach()
        return LossOutput(
            terms={self.name: losses.sum() / n_pairs},
            metrics={
                "pref/accuracy": (d > 0).float().mean(),
                "pref/margin": d.mean(),
                "pref/chosen": c.detach().mean(),
                "pref/rejected": r.detach().mean(),
            },
        )

    def _pair_scores(self, ctx: Any, items: list[Any]) -> tuple[Tensor, Tensor]:
        from rlfuse.plugins._data.pairs import pair_batch

        cs, rs = [], []
        was = ctx.policy.training
        ctx.policy.eval()
        try:
            for s in range(0, len(items), self.cfg.eval_batch_size):
                b = pair_batch(items[s : s + self.cfg.eval_batch_size], ctx.tokenizer, ctx.cfg.data.max_length, ctx.device)
                c, r, _ = pair_scores(self._scores_no_grad(ctx, b), b)
                cs.append(c.cpu())
                rs.append(r.cpu())
        finally:
            ctx.policy.train(was)
        return torch.cat(cs), torch.cat(rs)

    @hookimpl
    def evaluate(self, ctx: Any, step: int) -> dict[str, float] | None:
        if not self.eval_items:
            return None
        c, r = self._pair_scores(ctx, self.eval_items)
        d = c - r
        acc = torch.where(d.abs() < 1e-6, torch.full_like(d, 0.5), (d > 0).float())
        return {
            "eval/pref/accuracy": float(acc.mean()),
            "eval/pref/margin": float(d.mean()),
            "eval/pref/loss": float(bradley_terry_loss(c, r).mean()),
        }

    @hookimpl
    def teardown(self, ctx: Any, summary: dict[str, Any]) -> None:
        folder = ctx.run_dir / self.cfg.output
        items = list(ctx.train_records)[: self.cfg.stats_pairs]
        stats: dict[str, Any] = {"format": FORMAT}
        if items:
            c, r = self._pair_scores(ctx, items)
            allv = torch.cat([c, r])
            stats.update(mean=float(allv.mean()), std=float(allv.std().clamp_min(1e-6)), pairs=len(items))
        if "eval/pref/accuracy_after" in summary:
            stats["eval_accuracy"] = summary["eval/pref/accuracy_after"]
        state = ctx.policy_state_dict()  # every rank: gathered when the policy is sharded
        if ctx.dist.is_main:  # only rank 0 writes
            save_reward_model(ctx.policy, self.head, ctx.tokenizer, folder, stats, state)
        summary["reward_model"] = str(folder)


def to_sequence_classifier(
    policy: nn.Module, head: nn.Linear, pad_token_id: int, state: dict[str, Any] | None = None
) -> nn.Module:
    """A transformers ``*ForSequenceClassification`` (num_labels=1) holding the policy's trunk
    and ``head`` as its ``score`` layer; ``state`` (``ctx.policy_state_dict()``) replaces the
    policy's own weights (a sharded policy's, gathered)."""
    import copy

    from transformers import AutoModelForSequenceClassification

    from rlfuse.models import is_peft

    if is_peft(policy):  # a LoRA-trained trunk: the reward model holds it merged
        policy = copy.deepcopy(policy).merge_and_unload()
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    config.pad_token_id = pad_token_id
    config.architectures = None
    config.tie_word_embeddings = False
    dtype = next(policy.parameters()).dtype
    model = AutoModelForSequenceClassification.from_config(config).to(dtype)
    if state is not None and not is_peft(policy):
        prefix = policy.base_model_prefix + "."
        trunk = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    else:
        trunk = policy.base_model.state_dict()
    missing, unexpected = model.base_model.load_state_dict(trunk, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"reward model trunk mismatch: missing {missing}, unexpected {unexpected}")
    score = getattr(model, "score", None)
    if not isinstance(score, nn.Linear) or score.weight.shape != head.weight.shape:
        raise RuntimeError(f"{type(model).__name__} has no score layer of shape {tuple(head.weight.shape)}")
    with torch.no_grad():
        score.weight.copy_(head.weight)
        if score.bias is not None:
            score.bias.zero_()
    return model.eval()


def save_reward_model(
    policy: nn.Module, head: nn.Linear, tokenizer: Any, folder: Any, stats: dict[str, Any],
    state: dict[str, Any] | None = None,
) -> None:
    """Write the reward model folder atomically (a re-run never sees a half-written one)."""
    from rlfuse.checkpoint import atomic_folder

    model = to_sequence_classifier(policy, head, tokenizer.pad_token_id, state)
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / STATS_FILE).write_text(json.dumps(stats, indent=2, sort_keys=True))
