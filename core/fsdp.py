"""``trainer.strategy=fsdp``: the policy sharded over ranks with FSDP2 (``fully_shard``).

Every decoder layer (the classes a Hugging Face model lists in ``_no_split_modules``) is one
FSDP unit; the rest of the policy (embeddings, final norm, the lm_head tied or not) belongs to
a root unit, :class:`ShardedRoot`, which wraps the policy. Each rank keeps ``1/N`` of every
parameter, of its gradient and of the AdamW moments; a unit's full parameters exist only
while it runs.

Why a root of our own: :func:`rlfuse.models.forward` calls the model body and reads the
lm_head weight itself (the fused log-prob kernel never forms the logits), so the root
parameters must be gathered around that whole function, not around the model's own
``forward``. ``ShardedRoot(fn, *args)`` runs ``fn`` inside its forward: FSDP's hooks gather
the root parameters before it and, in backward, reduce-scatter their gradients, exactly as
for a module forward. :func:`rlfuse.models.forward` finds the root through :func:`root_of`.

Generation cannot run layer by layer: ``generate`` calls the model once per new token and
ranks stop at different lengths, so a per-layer all-gather would leave the ranks in
different collectives. :func:`gathered` (entered by the trainer around rollouts and
evaluations) gathers every unit once and keeps it gathered, so nothing inside communicates.

Gradients: FSDP's reduce-scatter *sums* (divide factor 1, sum-only collectives: gloo has
no pre-multiplied sum), as ``distributed.sum_gradients`` does for ``ddp``: with loss terms
normalised by the global ``batch.totals`` the sum is the global-batch gradient. Modules a
plugin adds (value head, reward head) are small and stay replicated; their gradients are
summed like under ``ddp``. The reference model is not sharded (a full frozen copy per rank).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from rlfuse.errors import ConfigError

_ROOT = "_rlfuse_fsdp_root"  # key in the policy's __dict__ (not a submodule: no cycle)
PRECISIONS = ("fp32", "bf16-mixed")


class ShardedRoot(nn.Module):
    """The root FSDP unit: holds the policy and runs a function of it inside its forward,
    so the root parameters are gathered for the function and their gradients reduced."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)


def sharded(ctx: Any) -> bool:
    """Whether this run shards the policy (``trainer.strategy=fsdp`` on more than one rank)."""
    return ctx.dist.enabled and ctx.cfg.trainer.get("strategy", "ddp") == "fsdp"


def root_of(model: nn.Module) -> ShardedRoot | None:
    """The :class:`ShardedRoot` of a sharded policy, or None."""
    return model.__dict__.get(_ROOT)


def _is_dtensor(t: torch.Tensor | None) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _units(root: ShardedRoot) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in root.modules() if isinstance(m, FSDPModule)]


def check(ctx: Any) -> None:
    """What FSDP supports here; anything else is an error naming the key."""
    mode = ctx.precision.mode
    if mode not in PRECISIONS:
        raise ConfigError("trainer.precision", f"trainer.strategy=fsdp supports {' and '.join(PRECISIONS)} "
                          "(docs/scaling.md, FSDP)", mode)
    if ctx.cfg.model.lora.r:
        raise ConfigError("model.lora.r", "LoRA is not supported with trainer.strategy=fsdp (use ddp: the frozen "
                          "base is not trained, so sharding it saves little)")


def shard(ctx: Any) -> None:
    """Shard ``ctx.policy`` in place: ``fully_shard`` on every decoder layer, then on a
    :class:`ShardedRoot` around the policy. Call before the optimiser is built (it must see
    the sharded parameters) and after every rank holds the same weights."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    check(ctx)
    policy = ctx.policy
    if ctx.precision.mode == "bf16-mixed":  # gathered in bf16, gradients reduced in fp32
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    names = set(getattr(policy, "_no_split_modules", None) or [])
    for layer in [m for m in policy.modules() if type(m).__name__ in names]:
        fully_shard(layer, reshard_after_forward=True, mp_policy=mp)
    root = ShardedRoot(policy)
    fully_shard(root, reshard_after_forward=False, mp_policy=mp)
    for unit in _units(root):
        unit.set_gradient_divide_factor(1.0)  # sum, like ddp (see the module docstring)
        unit.set_force_sum_reduction_for_comms(True)
    policy.__dict__[_ROOT] = root
    with torch.no_grad():  # FSDP's root is whichever unit runs first: make it ours
        root(lambda: None)
    root.reshard()  # the optimiser must see the sharded parameters, not the gathered ones


@contextmanager
def gathered(ctx: Any) -> Iterator[None]:
    """Every unit of the sharded policy gathered, and kept gathered, for the block
    (generation, evaluation: no collective inside); resharded after. A no-op unsharded."""
    root = root_of(ctx.policy) if ctx.policy is not None else None
    if root is None:
        yield
        return
    units = _units(root)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(unit is not root, recurse=False)
            unit.reshard()


# ------------------------------------------------------------------ gradients


def grad_norm(ctx: Any, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The global 2-norm of the gradients of ``params``: sharded ones summed over ranks,
    replicated ones (extra modules) counted once."""
    if not sharded(ctx):
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    grads = [p.grad for p in params if p.grad is not None]
    local = torch.zeros(2, dtype=torch.float32)
    for g in grads:
        if _is_dtensor(g):
            local[0] += g.to_local().float().pow(2).sum().cpu()
        else:
            local[1] += g.float().pow(2).sum().cpu()
    shards = ctx.dist.all_reduce(local[:1].clone(), what="gradient norm")
    return (shards[0] + local[1]).sqrt()


def clip_grad_norm_(ctx: Any, params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for sharded and replicated gradients alike.

    Unsharded, the gradients are rescaled only when the norm exceeds ``max_norm``: torch
    multiplies every gradient by the clamped coefficient, which is exactly 1.0 below the bound
    -- a pass over all gradients that changes no bit (on SmolLM2: ~40 ms an update on CPU)."""
    if not sharded(ctx):
        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads)
        if not bool(max_norm / (total + 1e-6) >= 1.0):  # torch's own coefficient, before its clamp
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total
    total = grad_norm(ctx, params)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                (p.grad.to_local() if _is_dtensor(p.grad) else p.grad).mul_(coef.to(p.grad.device))
    return total


def replicated(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters FSDP does not reduce (not DTensors): their gradients are summed by
    ``distributed.sum_gradients``."""
    return [p for p in params if not _is_dtensor(p)]


# ------------------------------------------------------------------ full state dicts


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_policy_state(ctx: Any, everywhere: bool = False) -> dict[str, torch.Tensor] | None:
    """The policy's full state dict: on CPU on rank 0 only (an empty dict on the others), or
    with ``everywhere`` on every rank (on the policy's device). Every rank must call it
    (all-gathers). None when the policy is not sharded."""
    if root_of(ctx.policy) is None:
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(ctx.policy, options=_options(cpu_offload=not everywhere))


def load_policy_state(ctx: Any, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (every rank holds it) into the sharded policy."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(ctx.policy, dict(state), options=_options())


def _owner(ctx: Any) -> nn.Module:
    """A module holding every parameter the optimiser updates (names for its state dict)."""
    return nn.ModuleDict({"policy": ctx.policy, "extra": ctx.modules})


def full_optimizer_state(ctx: Any, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser's full state dict (keyed by parameter names) on rank 0; every rank calls."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(_owner(ctx), opt, options=_options(cpu_offload=True))


def load_optimizer_state(ctx: Any, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load :func:`full_optimizer_state`'s result (every rank holds it) into the sharded optimiser."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(_owner(ctx), opt, state, options=_options())
