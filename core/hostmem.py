"""Host (CPU) memory: keep freed memory in the process instead of paging it in again each step.

glibc's ``malloc`` serves every request above 32 MiB with a fresh ``mmap`` and gives it back
to the kernel on ``free``. A training step on a real model makes several such tensors anew
each step -- the (vocabulary x hidden) gradient of the embedding and of the lm_head, their
bf16 copies under autocast (SmolLM2-135M: 49,152 x 576, 57-113 MB each) -- and the kernel
zero-fills every 4 KiB page of them on first touch: a DPO step on SmolLM2 spent a quarter of its
time in those page faults (``aten::fill_`` of 113 MB taking 100 ms; docs/performance.md).

``trainer.host_memory: keep`` tells glibc to take large blocks from the heap as well
(``M_MMAP_MAX = 0``) and not to return freed heap memory to the kernel (``M_TRIM_THRESHOLD``
2 GiB): the next step's tensors reuse the pages already mapped. The cost: the process keeps
its high-water mark resident (peak RSS is what it was, plus heap fragmentation: measured
+0-170 MiB on SmolLM2). ``release`` leaves glibc's defaults; ``auto`` (the default) is
``keep`` when training on the CPU and ``release`` on an accelerator (host tensors there are
small). The setting is process-wide and only ever applied once; other allocators
(jemalloc, tcmalloc via ``LD_PRELOAD``) and non-glibc systems are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

MODES = ("auto", "keep", "release")
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_applied: str | None = None


def resolve(mode: str, device: torch.device) -> str:
    if mode not in MODES:
        raise ValueError(f"trainer.host_memory must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        return "keep" if device.type == "cpu" else "release"
    return mode


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # raises AttributeError on musl and others
        return libc
    except (OSError, AttributeError):
        return None


def apply(mode: str, device: torch.device) -> str:
    """Apply ``trainer.host_memory`` for ``device``; returns what is in effect (``keep``,
    ``release``, or ``unsupported`` where glibc's mallopt is not available)."""
    global _applied
    want = resolve(mode, device)
    if want == "release" or _applied == "keep":
        return _applied or "release"
    libc = _glibc()
    if libc is None:
        return "unsupported"
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _applied = "keep" if ok else "unsupported"
    return _applied
