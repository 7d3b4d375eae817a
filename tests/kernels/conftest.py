"""Shared fixtures of the kernel tests.

Backends under test: ``torch`` always; ``triton`` when it can run in this process — on a CUDA
device, or on CPU when ``TRITON_INTERPRET=1`` was set before ``rlfuse.kernels`` was imported.
A plain CPU ``pytest`` run covers the Triton kernels through ``test_triton_interpreter.py``,
which re-runs the ``triton`` cases of this folder in a subprocess with ``TRITON_INTERPRET=1``
(the variable must be set before Triton decorates the kernels, so it cannot be flipped in an
already-running process). Those tests are skipped only when triton cannot be imported.
"""

from __future__ import annotations

import pytest
import torch

from rlfuse.kernels import logprobs as lp_mod
from rlfuse.kernels import triton_interpreter_active

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

ON_CUDA = torch.cuda.is_available()
INTERPRETING = triton_interpreter_active()
TRITON_IN_PROCESS = HAS_TRITON and (
    (ON_CUDA and not INTERPRETING) or (INTERPRETING and not ON_CUDA)
)
DEVICE = torch.device("cuda" if ON_CUDA and not INTERPRETING else "cpu")
BACKENDS = ["torch"] + (["triton"] if TRITON_IN_PROCESS else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    """Small vocabulary tiles and torch row chunks so every loop runs several iterations."""
    if INTERPRETING:
        monkeypatch.setattr(lp_mod, "MAX_BLOCK_V", 256)
    monkeypatch.setattr(lp_mod, "TORCH_CHUNK_ELEMS", 4096)
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
