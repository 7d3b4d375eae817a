"""The whole contract of an rlfuse plugin, on one page.

Every training step the core calls the five step hooks in this order::

    rollout -> reward -> advantage -> (for each optimiser step: loss ... ; sync)

and around them a few lifecycle hooks (``setup``, ``evaluate``, ``log``, ``save_state`` /
``load_state``, ``teardown``). Each hook below is an empty function with the arguments the
core passes; an implementation may accept any subset of them (pluggy matches by name), so
adding an argument here never breaks an existing plugin.

Implement a hook by decorating a function (or a method of a plugin class) with
:data:`rlfuse.hookimpl` and giving it the hook's exact name. A decorated function whose name
matches no hook below is an error at start-up, not a silent no-op.

Who calls what: :mod:`rlfuse.trainer` is the only caller of these hooks, except
:func:`compare`, which plugins that need preferences call (``ctx.hook.compare(...)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from rlfuse.data import Advantages, Batch, LossOutput
    from rlfuse.trainer import Context

PROJECT = "rlfuse"
hookspec = pluggy.HookspecMarker(PROJECT)


# ---------------------------------------------------------------- lifecycle hooks


@hookspec
def setup(ctx: Context) -> None:
    """Called once, after the models and tokenizer are built and before the first step.

    Plugins keep references to what they need (``ctx.policy``, ``ctx.tokenizer``), load data,
    and may add trainable modules with ``ctx.add_module(name, module)`` (a value head, say):
    those are optimised with the policy and saved in checkpoints.

    :param ctx: the run's :class:`~rlfuse.trainer.Context`.
    :returns: nothing. Every implementation is called.
    """


@hookspec
def evaluate(ctx: Context, step: int) -> dict[str, float] | None:
    """Measure the current policy (held-out reward, accuracy, ...).

    Called before the first step, every ``trainer.eval_every`` steps and after the last step.
    Names should use the ``eval/`` namespace; the core stores the first and last value of each
    as ``<name>_before`` and ``<name>_after`` in ``summary.json``.

    :param ctx: the run's context.
    :param step: the number of training steps done so far.
    :returns: a dict of float metrics, or None. Every implementation is called and the dicts
        are merged.
    """


@hookspec
def log(ctx: Context, step: int, metrics: dict[str, float]) -> None:
    """Receive the metrics of one training step (or of an evaluation).

    Implemented by logger plugins (``logger=[jsonl,console,wandb]``); the trainer itself never
    writes metrics anywhere.

    :param ctx: the run's context.
    :param step: the training step the metrics belong to.
    :param metrics: flat ``namespace/name -> float`` mapping, always including ``step``.
    :returns: nothing. Every implementation is called.
    """


@hookspec
def save_state(ctx: Context) -> dict[str, Any] | None:
    """Return plugin state to be stored in a checkpoint (KL controller, data position, ...).

    :param ctx: the run's context.
    :returns: ``{key: picklable state}`` with a key unique to the plugin instance, or None.
        Every implementation is called and the dicts are merged.
    """


@hookspec
def load_state(ctx: Context, state: dict[str, Any]) -> None:
    """Restore what :func:`save_state` returned when a run resumes.

    :param ctx: the run's context.
    :param state: the merged dict of every plugin's saved state; take your own key.
    :returns: nothing. Every implementation is called.
    """


@hookspec
def teardown(ctx: Context, summary: dict[str, Any]) -> None:
    """Called once at the end of a run, after the final checkpoint is written.

    :param ctx: the run's context.
    :param summary: the figures written to ``summary.json``; a plugin may add to it.
    :returns: nothing. Every implementation is called.
    """


# ---------------------------------------------------------------- the five step hooks


@hookspec(firstresult=True)
def rollout(ctx: Context, step: int) -> Batch | None:
    """Produce the training batch of this step.

    Online algorithms generate responses from ``ctx.policy`` (and fill ``old_logprobs``, and
    ``ref_logprobs`` when a KL term needs them); offline ones (SFT, reward model, DPO) read
    the next records of a dataset.

    :param ctx: the run's context.
    :param step: the index of the step about to run.
    :returns: a :class:`~rlfuse.data.Batch`. Stops at the first non-None result.
    """


@hookspec
def reward(ctx: Context, batch: Batch) -> dict[str, torch.Tensor] | None:
    """Score the responses of a batch.

    :param ctx: the run's context.
    :param batch: the batch from :func:`rollout`.
    :returns: ``{name: scores}``: per-sequence scores of shape (B,) or per-token scores of
        shape (B, T) aligned with ``batch.input_ids``. Every implementation is called; the
        core multiplies each named score by the ``weight`` of the reward component of that
        name (default 1), adds them into ``batch.rewards`` / ``batch.token_rewards`` and logs
        ``reward/<name>/mean``.
    """


@hookspec(firstresult=True)
def advantage(ctx: Context, batch: Batch) -> Advantages | None:
    """Turn rewards into per-token advantages (and returns, for a critic).

    :param ctx: the run's context.
    :param batch: the rewarded batch; ``batch.rewards`` (B,) and/or ``batch.token_rewards``
        (B, T) are set.
    :returns: an :class:`~rlfuse.data.Advantages` whose tensors the core stores on the batch.
        Stops at the first non-None result; offline algorithms register none.
    """


@hookspec
def loss(ctx: Context, batch: Batch) -> LossOutput | dict[str, torch.Tensor] | None:
    """Compute loss terms on one micro-batch.

    ``ctx.forward(batch)`` gives the policy's token log-probs (and entropy, hidden states),
    computed once per micro-batch and shared by every loss plugin.

    Terms must be this micro-batch's share of the mini-batch loss: the core *sums* them over
    micro-batches (it does not average), so normalise with ``batch.totals`` (token and
    sequence counts of the whole mini-batch), which makes the result independent of how the
    mini-batch was split.

    :param ctx: the run's context.
    :param batch: one micro-batch.
    :returns: named scalar terms (a dict, or a :class:`~rlfuse.data.LossOutput` that also
        carries statistics to log). Every implementation is called; the core adds all terms,
        back-propagates the sum and logs each term as ``loss/<name>``.
    """


@hookspec
def sync(ctx: Context, step: int) -> None:
    """Called after every optimiser step.

    A no-op for one process; parameter averaging with peers, refreshing the reference model,
    or pushing weights to a rollout engine otherwise.

    :param ctx: the run's context.
    :param step: the training step in progress.
    :returns: nothing. Every implementation is called.
    """


# ---------------------------------------------------------------- scale-out hooks


@hookspec
def before_step(ctx: Context, step: int) -> None:
    """Called after the backward passes of a mini-batch, before gradient clipping and the
    optimiser step (and after the core's own data-parallel gradient reduction).

    A plugin may read or change the gradients: average them with peers (``sync=allreduce``
    with ``average: grads``), add noise, skip parameters.

    :param ctx: the run's context.
    :param step: the training step in progress.
    :returns: nothing. Every implementation is called.
    """


@hookspec
def consolidate(ctx: Context) -> bool | None:
    """Called once after the last step and its evaluation, before ``final/`` is written.

    A plugin whose ranks each trained their own model (the decentralized algorithm) may
    replace the policy's weights with a combination of every rank's -- the consensus average.
    Every rank calls it (it may run collectives through ``ctx.dist``).

    :param ctx: the run's context.
    :returns: True when it changed the policy: the core then evaluates the new policy again
        (logged as ``eval/consolidated/<name>``) and writes it to ``final/``. Every
        implementation is called.
    """


# ---------------------------------------------------------------- human feedback


@hookspec(firstresult=True)
def compare(ctx: Context, prompts: list[str], first: list[str], second: list[str], rows: list[dict[str, Any]]) -> list[str] | None:
    """Say which of two answers to each prompt is better: the labeller's hook.

    Implemented by ``labeller`` plugins (``labeller=simulated`` ranks by the task's true
    reward, ``labeller=human`` asks a person); called by plugins that need preferences, such
    as ``rollout=policy_pairs``, with a chunk of pairs at a time.

    :param ctx: the run's context.
    :param prompts: the prompt of each pair (text as the policy saw it).
    :param first: answer A of each pair.
    :param second: answer B of each pair (same length as ``first``).
    :param rows: the dataset row of each pair's prompt (columns such as a reference answer).
    :returns: one label per pair: ``"A"`` (first is better), ``"B"``, ``"tie"`` or ``"skip"``
        (no preference). A shorter list means the labeller stopped (a person quit): the
        caller keeps the answers given and asks no more. Stops at the first non-None result.
    """
