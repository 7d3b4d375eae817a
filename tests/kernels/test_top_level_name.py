"""The repository's ``kernels/`` folder must not shadow another ``kernels`` package.

Run from a checkout (``python -m pytest``, ``python -m ...``), the repository root is on
sys.path and ``import kernels`` finds rlfuse's folder first; transformers >= 5.25 imports Hugging
Face's ``kernels`` package by that name. The folder hands such an import over to the installed
package (or fails with a message naming both), and ``rlfuse.kernels`` stays rlfuse's.
"""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def _other_kernels() -> bool:
    path = [p for p in sys.path if Path(p or os.curdir).resolve() != REPO]
    return importlib.machinery.PathFinder.find_spec("kernels", path) is not None


def test_top_level_kernels_from_the_repository_root_is_not_rlfuses():
    r = _run("import kernels, rlfuse.kernels as k; print(kernels.__file__); print(k.__file__); "
             "print(hasattr(kernels, 'linear_token_logprobs'), hasattr(k, 'linear_token_logprobs'))")
    if _other_kernels():
        assert r.returncode == 0, r.stderr
        top, ours, flags = r.stdout.split("\n")[:3]
        assert Path(top).resolve().parent != REPO / "kernels"
        assert Path(ours).resolve() == REPO / "kernels" / "__init__.py"
        assert flags == "False True"
    else:
        assert r.returncode != 0
        assert "no module named 'kernels' outside" in r.stderr and "rlfuse.kernels" in r.stderr


def test_transformers_imports_from_the_repository_root():
    r = _run("import transformers.activations, rlfuse.kernels; print('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
