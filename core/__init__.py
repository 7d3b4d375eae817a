"""rlfuse: fine-tune language models with RL and preference learning.

A minimal core runs a loop of five hooks (rollout, reward, advantage, loss, sync); every
algorithm is a set of plugins chosen by Hydra config. Plugin authors need only::

    from rlfuse import hookimpl, Batch, Advantages, LossOutput
"""

from __future__ import annotations

import pluggy

from rlfuse.data import Advantages, Batch, ForwardOutput, LossOutput

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("rlfuse")

__all__ = ["Advantages", "Batch", "ForwardOutput", "LossOutput", "hookimpl", "__version__"]
