"""rlfuse.kernels — memory-flat log-prob and policy-loss ops (Triton on CUDA, chunked torch on CPU).

Every plugin computes log-probs over the vocabulary through these ops; nothing else in rlfuse
calls ``log_softmax`` on (tokens x vocab) logits. See docs/kernels.md.

This package depends on nothing but torch (and, optionally, triton).
"""

if __name__ == "kernels":
    # Imported as the top-level ``kernels``: only when the repository root is on sys.path
    # (``python -m pytest`` or ``python -m ...`` run from a checkout). That name belongs to
    # Hugging Face's ``kernels`` package, which transformers (>= 5.25) imports: hand the import
    # over to it instead of shadowing it. rlfuse's own kernels are ``rlfuse.kernels``.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    )
    if _spec is None or _spec.loader is None:
        raise ImportError(
            f"no module named 'kernels' outside {_root} (the folder there is rlfuse's, imported as rlfuse.kernels)"
        )
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module  # what `import kernels` returns
    _spec.loader.exec_module(_module)
else:
    from ._dispatch import (
        BACKENDS,
        get_default_backend,
        set_default_backend,
        triton_interpreter_active,
    )
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
