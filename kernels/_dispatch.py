"""Backend selection shared by every op in ``rlfuse.kernels``.

Every op takes ``backend=None | "auto" | "triton" | "torch"``:

* ``None``   -> the process default (:func:`set_default_backend`, starts as ``"auto"``);
* ``"auto"`` -> Triton when the tensor lives on a CUDA (or ROCm) device and Triton imports,
  otherwise the chunked torch implementation;
* ``"triton"`` -> the Triton kernels. On CPU tensors this only works under the Triton
  interpreter, i.e. when ``TRITON_INTERPRET=1`` was set *before* ``rlfuse.kernels`` was
  imported (Triton decides at ``@triton.jit`` time); otherwise a clear RuntimeError;
* ``"torch"`` -> the chunked torch implementation (any device).

This module depends on nothing but torch (and optionally triton).
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")

_TRUE = ("1", "true", "yes", "on")
#: TRITON_INTERPRET as seen when rlfuse.kernels was imported (what the @triton.jit kernels use).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE

try:  # triton is optional: the torch paths work without it
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    HAS_TRITON = True
    _TRITON_IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - depends on the environment
    HAS_TRITON = False
    _TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_default_backend = "auto"


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(
            f"unknown kernels backend {name!r}; valid backends are: {', '.join(BACKENDS)}"
        )
    return name


def set_default_backend(name: str) -> None:
    """Set the backend that ops use when called with ``backend=None``.

    The core calls this once at start-up with ``cfg.kernels.backend``.

    :param name: one of ``"auto"``, ``"triton"``, ``"torch"``.
    :raises ValueError: for any other name (the message lists the valid ones).
    """
    global _default_backend
    _default_backend = _check_name(name)


def get_default_backend() -> str:
    """The process-wide default backend (``"auto"`` unless :func:`set_default_backend` changed it)."""
    return _default_backend


def triton_interpreter_active() -> bool:
    """True when the Triton kernels were defined under ``TRITON_INTERPRET=1`` (CPU execution)."""
    return HAS_TRITON and INTERPRET


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Resolve ``backend`` for tensors on ``device`` to the concrete ``"triton"`` or ``"torch"``.

    :raises ValueError: unknown backend name.
    :raises RuntimeError: ``"triton"`` requested where Triton cannot run.
    """
    name = _check_name(_default_backend if backend is None else backend)
    on_gpu = device.type == "cuda"
    if name == "torch":
        return "torch"
    if name == "auto":
        return "triton" if (on_gpu and HAS_TRITON and not INTERPRET) else "torch"
    # explicit "triton"
    if not HAS_TRITON:
        raise RuntimeError(
            f"rlfuse.kernels: backend='triton' requested but triton cannot be imported "
            f"({_TRITON_IMPORT_ERROR}); install triton or use backend='torch'/'auto'"
        )
    if on_gpu and not INTERPRET:
        return "triton"
    if not on_gpu and INTERPRET:
        return "triton"
    if on_gpu:
        raise RuntimeError(
            "rlfuse.kernels: backend='triton' with CUDA tensors, but TRITON_INTERPRET=1 was set when "
            "rlfuse.kernels was imported (the kernels were built for the CPU interpreter); unset it"
        )
    raise RuntimeError(
        f"rlfuse.kernels: backend='triton' needs CUDA tensors, got tensors on {device}. To run the "
        "Triton kernels on CPU, set TRITON_INTERPRET=1 in the environment before rlfuse is imported "
        "(slow, for tests); otherwise use backend='auto' or 'torch'"
    )
