"""Make ``import rlfuse.kernels`` work from a checkout without ``pip install -e .`` (the
benchmark scripts run as-is on a lent GPU machine): a throw-away ``rlfuse`` package in /tmp
whose ``kernels`` is a link to this checkout's kernels/ (which depends on torch/triton only)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def ensure_kernels_importable(tag: str = "bench") -> None:
    try:
        import rlfuse.kernels  # noqa: F401
    except ImportError:
        shim = Path(f"/tmp/rlfuse_{tag}_shim/rlfuse")
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "__init__.py").touch()
        link = shim / "kernels"
        if not link.exists():
            link.symlink_to(REPO / "kernels")
        sys.path.insert(0, str(shim.parent))
