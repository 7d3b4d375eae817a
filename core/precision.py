"""Training precision: the dtype the trained weights are kept in, separate from the compute dtype.

``trainer.precision`` picks one of:

=============  ==================  ========================  ==================================
mode           trained weights     optimiser state           forward / backward
=============  ==================  ========================  ==================================
fp32           fp32                fp32 (AdamW)              fp32
bf16-mixed     fp32 (masters)      fp32 (AdamW)              bf16 under ``torch.autocast``
fp16-mixed     fp32 (masters)      fp32 (AdamW)              fp16 under autocast, loss scaled
                                                             by a ``GradScaler``
bf16-true      bf16                fp32 (AdamW moments)      bf16; the update is computed in
                                                             fp32 and written back to the bf16
                                                             weight with stochastic rounding
=============  ==================  ========================  ==================================

``auto`` (the default) is ``bf16-mixed`` on a CUDA device that supports bf16 and on a CPU with
bf16 instructions (AMX or AVX512-BF16) for a pretrained model (``model=hf``), and ``fp32``
elsewhere (on a CPU without bf16 instructions bf16 autocast is slower than fp32: see
docs/precision.md for the measurements).

Why not plain AdamW on bf16 weights: a bf16 number has 8 significant bits, so an update
smaller than half the spacing between neighbouring bf16 values (``|w| * 2**-9``) rounds back to
the same weight. AdamW's update is about ``lr`` per element, so at ``lr=1e-6`` every weight
with ``|w| > ~5e-4`` -- nearly all of them -- never moves. :class:`StochasticRoundingAdamW`
rounds up with probability proportional to the remainder, so the expected weight follows the
fp32 trajectory.

Under the mixed modes a forward keeps no low-precision copy of a weight for the backward:
autograd would save autocast's bf16/fp16 copy of every matrix (SmolLM2-135M: 257 MiB in bf16)
until the backward reaches it; :func:`recast_saved_weights` saves a reference to the fp32 weight
instead and the backward casts it again -- the same values (rounding to nearest is a function of
the weight), one extra cast per weight and step. Measured on a GRPO step of SmolLM2 (with
:mod:`rlfuse.models`' tied-embedding gradient fold): peak RSS 3,065-3,085 -> 2,766-2,815 MiB.

The trainer owns the optimiser: it calls :meth:`Precision.autocast` around rollouts, loss
forwards and evaluation, :meth:`Precision.backward` for the loss, :meth:`Precision.unscale`
before clipping and :meth:`Precision.step` for the update. Plugins may use
``ctx.precision.autocast()`` for forwards of their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

MODES = ("auto", "fp32", "bf16-mixed", "fp16-mixed", "bf16-true")
_LOW = {"bfloat16", "float16"}


def _cast_of_weight(t: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """``(weight, transposed)`` when ``t`` is a low-precision cast of a trained fp32 weight (or
    its transpose, as a linear layer saves it), else None."""
    fn = t.grad_fn
    if fn is None or t.dtype == torch.float32:
        return None
    transposed = type(fn).__name__ == "TBackward0" and t.dim() == 2
    if transposed:
        fn = fn.next_functions[0][0]
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return None
    w = getattr(fn.next_functions[0][0], "variable", None)  # an AccumulateGrad: a leaf
    if w is None or w.dtype != torch.float32 or w.shape != (t.shape[::-1] if transposed else t.shape):
        return None
    return w, transposed


def _pack(t: torch.Tensor) -> Any:
    found = _cast_of_weight(t)
    if found is None:
        return t
    w, transposed = found
    return (w, t.dtype, transposed, w._version)


def _unpack(saved: Any) -> torch.Tensor:
    if isinstance(saved, torch.Tensor):
        return saved
    w, dtype, transposed, version = saved
    if w._version != version:
        raise RuntimeError(
            f"a trained weight of shape {tuple(w.shape)} was modified in place between the forward and "
            "the backward; its low-precision copy for the backward cannot be recomputed"
        )
    c = w.detach().to(dtype)
    return c.t() if transposed else c


def recast_saved_weights() -> contextlib.AbstractContextManager:
    """Saved-tensor hooks that keep a reference to the fp32 weight instead of its bf16/fp16 cast
    and cast it again in the backward (bitwise the same tensor: tested)."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)


#: CPU flags (/proc/cpuinfo) of native bf16 matrix instructions: AMX tiles, AVX512-BF16 dot products
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_bf16_matmul() -> bool:
    """Whether this (Linux) CPU has native bf16 matrix instructions (AMX-BF16 or AVX512-BF16),
    where bf16 autocast outruns fp32 (measured: docs/precision.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split(":", 1)[-1].split() for flag in BF16_CPU_FLAGS)
    except OSError:
        pass
    return False


def resolve_mode(mode: str, device: torch.device, pretrained: bool = False) -> str:
    """``auto`` -> a concrete mode for ``device``; any other valid mode is returned as is.

    ``auto``: bf16-mixed on a bf16 GPU, and on a CPU with bf16 instructions (AMX or AVX512-BF16)
    for a pretrained model (``pretrained``: ``model=hf``; measured 1.17-1.34x faster than fp32 with
    AMX, 1.46-1.65x with AVX512-BF16 alone, docs/precision.md; on a CPU without bf16
    instructions autocast was 1.9x slower); fp32 elsewhere. The tiny model -- built, or a stage
    of a pipeline loading the previous stage's tiny model -- stays fp32: its per-op overhead
    dominates, and the docs quote its seeded fp32 figures."""
    if mode not in MODES:
        raise ValueError(f"trainer.precision must be one of {', '.join(MODES)}; got '{mode}'")
    if mode != "auto":
        return mode
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    if device.type == "cpu" and pretrained and cpu_has_bf16_matmul():
        return "bf16-mixed"
    return "fp32"


def check_model_dtype(mode: str, model_dtype: str | None, lora: bool = False) -> None:
    """Refuse the combination that silently does not train: low-precision weights under a
    mode whose optimiser expects fp32 masters. With LoRA the base is frozen: a bf16/fp16 base
    is fine under a mixed mode (the adapters are fp32, autocast matches the dtypes)."""
    if lora and model_dtype in _LOW and mode in ("bf16-mixed", "fp16-mixed"):
        return
    if model_dtype in _LOW and mode in ("fp32", "bf16-mixed", "fp16-mixed"):
        raise ValueError(
            f"model.dtype={model_dtype} with trainer.precision={mode} would train {model_dtype} "
            "weights with plain AdamW, which rounds away updates smaller than half a "
            f"{model_dtype} ulp (almost all of them at lr 1e-6). Leave model.dtype unset (the "
            "precision decides: fp32 masters), or use trainer.precision=bf16-true "
            "(see docs/precision.md)"
        )
    if mode == "bf16-true" and model_dtype not in (None, "bfloat16"):
        raise ValueError(f"trainer.precision=bf16-true trains bfloat16 weights; model.dtype={model_dtype} contradicts it")


@dataclass
class Precision:
    """The resolved precision of one run (see the module docstring)."""

    mode: str
    device: torch.device
    scaler: Any = None  # torch.amp.GradScaler for fp16-mixed

    @classmethod
    def create(cls, mode: str, device: torch.device, model_dtype: str | None = None, lora: bool = False,
               pretrained: bool = False) -> Precision:
        mode = resolve_mode(mode, device, pretrained)
        check_model_dtype(mode, model_dtype, lora)
        scaler = torch.amp.GradScaler(device.type) if mode == "fp16-mixed" else None
        return cls(mode, device, scaler)

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device) -> Precision:
        """From ``trainer.precision``; also checks ``model.dtype`` / ``model.ref_dtype`` /
        ``trainer.save_dtype`` before the first step (errors name the key)."""
        names = ("float32", "bfloat16", "float16")
        for key, value in (("model.dtype", cfg.model.dtype), ("model.ref_dtype", cfg.model.ref_dtype),
                           ("trainer.save_dtype", cfg.trainer.save_dtype)):  # fmt: skip
            if value is not None and value not in names and not (key == "model.ref_dtype" and value == "auto"):
                raise ValueError(f"{key} must be one of {', '.join(names)} (or null), got '{value}'")
        return cls.create(cfg.trainer.precision, device, cfg.model.dtype, lora=bool(cfg.model.lora.r),
                          pretrained=cfg.model.kind == "hf")

    def reference_dtype(self, ref_dtype: str | None) -> str | None:
        """``model.ref_dtype`` resolved: ``auto`` is bfloat16 under bf16-mixed, else null (the
        policy's dtype)."""
        if ref_dtype == "auto":
            return "bfloat16" if self.mode == "bf16-mixed" else None
        return ref_dtype

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype of the trained weights."""
        return torch.bfloat16 if self.mode == "bf16-true" else torch.float32

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None when autocast is off."""
        return {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}.get(self.mode)

    def autocast(self, cache: bool = True) -> contextlib.AbstractContextManager:
        """Autocast to the compute dtype in mixed modes, with :func:`recast_saved_weights`; a
        no-op otherwise. ``cache=False`` (the trainer's loss forwards) casts each weight where it
        is used instead of keeping every copy until the context ends; forwards that call the
        model many times (generation: one call per token) keep autocast's cache."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(self.device.type, dtype=self.compute_dtype, cache_enabled=cache))
        stack.enter_context(recast_saved_weights())
        return stack

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Cast the trained weights to :attr:`param_dtype` (fp32 masters, or bf16 for
        ``bf16-true``, which casts the whole model). Frozen weights (a LoRA base) keep the
        dtype they were loaded in."""
        if self.mode == "bf16-true":
            return model.to(self.param_dtype)
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point() and p.dtype != self.param_dtype:
                p.data = p.data.to(self.param_dtype)
        return model

    def optimizer(self, groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.Optimizer:
        """AdamW, or :class:`StochasticRoundingAdamW` for ``bf16-true``."""
        if self.mode == "bf16-true":
            return StochasticRoundingAdamW(groups, **kwargs)
        return torch.optim.AdamW(groups, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, opt: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale (before clipping them)."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)

    def step(self, opt: torch.optim.Optimizer) -> None:
        """The optimiser step (skipped by the GradScaler when a gradient is inf/NaN)."""
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()


def round_stochastic_(dst: torch.Tensor, src: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Write fp32 ``src`` into bf16 ``dst``, rounding up with probability equal to the
    discarded fraction, so that ``E[dst] == src`` (up to the last fp32 bit).

    A bf16 is the top 16 bits of an fp32: add a uniform random integer in [0, 2**16) to the
    fp32 bit pattern and truncate the low 16 bits.
    """
    bits = src.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    rounded = (bits + noise).bitwise_and_(-65536).view(torch.float32)  # low 16 bits cleared: exact in bf16
    finite = torch.isfinite(src)
    dst.copy_(torch.where(finite, rounded, src))


class StochasticRoundingAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) for bf16 weights.

    The moments are kept in fp32; each step computes the new weight in fp32 and writes it
    back to the bf16 weight with stochastic rounding (:func:`round_stochastic_`), so updates
    far below a bf16 ulp still move the weight in expectation. Weights that are not bf16 are
    updated exactly as ``torch.optim.AdamW`` would.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                st["step"] += 1
                t = float(st["step"])
                g = p.grad.float()
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v / (1 - b2**t)).sqrt_().add_(eps)
                x = p.float()
                if wd:
                    x.mul_(1 - lr * wd)
                x.addcdiv_(m, denom, value=-lr / (1 - b1**t))
                if p.dtype == torch.bfloat16:
                    round_stochastic_(p, x)
                else:
                    p.copy_(x)
        return loss
