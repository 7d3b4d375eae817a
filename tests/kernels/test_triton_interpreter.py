"""Run the ``triton`` cases of this folder under the Triton CPU interpreter.

``TRITON_INTERPRET=1`` only takes effect if it is set before Triton decorates the kernels
(import time of ``rlfuse.kernels``), so a plain CPU run re-runs the triton-parametrised tests
of ``test_logprobs.py`` and ``test_policy_loss.py`` in a subprocess with the variable set.
When the triton backend already runs in this process (CUDA, or the whole session was started
with ``TRITON_INTERPRET=1``) those cases ran directly and this test is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlfuse.kernels import triton_interpreter_active

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

HERE = Path(__file__).resolve().parent
IN_PROCESS = torch.cuda.is_available() or triton_interpreter_active()


@pytest.mark.skipif(not HAS_TRITON, reason="triton cannot be imported")
@pytest.mark.skipif(IN_PROCESS, reason="the triton cases already run in this process")
def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton",
        str(HERE / "test_logprobs.py"), str(HERE / "test_policy_loss.py"),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, env=env, cwd=HERE.parents[1], capture_output=True, text=True, timeout=900
    )
    tail = (proc.stdout[-6000:] + "\n" + proc.stderr[-3000:]).strip()
    assert proc.returncode == 0, f"triton interpreter tests failed:\n{tail}"
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
