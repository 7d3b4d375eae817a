"""rlfuse.kernels — memory-flat log-prob and policy-loss ops (Triton on CUDA, chunked torch on CPU).

Every plugin computes log-probs over the vocabulary through these ops; nothing else in rlfuse
calls ``log_softmax`` on (tokens x vocab) logits. See docs/kernels.md.

This package depends on nothing but torch (and, optionally, triton).
"""

from ._dispatch import BACKENDS, get_default_backend, set_default_backend, triton_interpreter_active
from .logprobs import linear_token_logprobs, token_logprobs
from .policy_loss import (
    PolicyLossConfig,
    PolicyLossOutput,
    aggregation_weights,
    clipped_policy_loss,
    fused_policy_loss,
    linear_policy_loss,
)

__all__ = [
    "BACKENDS",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "aggregation_weights",
    "clipped_policy_loss",
    "fused_policy_loss",
    "get_default_backend",
    "linear_policy_loss",
    "linear_token_logprobs",
    "set_default_backend",
    "token_logprobs",
    "triton_interpreter_active",
]
