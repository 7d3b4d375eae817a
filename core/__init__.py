"""rlfuse: fine-tune language models with RL and preference learning.

A minimal core runs a loop of five hooks (rollout, reward, advantage, loss, sync); every
algorithm is a set of plugins chosen by Hydra config. Plugin authors need only::

    from rlfuse import hookimpl, Batch, Advantages, LossOutput
"""

from __future__ import annotations

import os


def _oversubscribed() -> bool:
    """Several processes will share the cores: torchrun started more than one rank here, or
    the machine is already busier than its cores (1-minute load average)."""
    try:
        if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            return True
        return os.getloadavg()[0] >= (os.cpu_count() or 1)
    except (ValueError, OSError):
        return False


# OpenMP threads that spin while waiting make small CPU ops up to ~100x slower whenever the
# machine is busier than its cores (measured: a (1024x64)@(64x256) matmul, 0.6 ms passive vs
# 89 ms spinning on a loaded 2-core box) -- but on cores of its own, sleeping threads cost every
# op a wake-up (a SmolLM2 GRPO step: 5.1 s passive vs 3.0 s with OpenMP's default). So passive
# only when the cores are shared. Set before torch loads OpenMP; yours wins if set.
if _oversubscribed():
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pluggy  # noqa: E402

from rlfuse.data import Advantages, Batch, ForwardOutput, HeadInputs, LossOutput  # noqa: E402

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("rlfuse")

__all__ = ["Advantages", "Batch", "ForwardOutput", "HeadInputs", "LossOutput", "hookimpl", "__version__"]
