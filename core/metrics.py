"""The metric vocabulary: every logged key is ``<namespace>/<name>``, one name per quantity.

A test logs one step of every preset and fails on a key outside these namespaces, so a new
metric either fits one below or adds its namespace here (and to docs/metrics.md).
"""

from __future__ import annotations

NAMESPACES: dict[str, str] = {
    "reward": "the step's rewards: reward/mean, reward/std (weighted total) and reward/<component>/{mean,std}",
    "loss": "loss terms as the loss plugins returned them (loss/<term>) and loss/total",
    "policy": "the policy update: clip fraction, ratio, approx KL old->new, entropy, pg loss, nll",
    "critic": "the value function: value loss, value clip fraction, value and return means",
    "kl": "divergence from the frozen reference: kl/ref (mean over sequences of the summed per-token log-ratio), kl/ref_token (per-token masked mean of the loss term's estimator), kl/beta",
    "advantage": "advantage estimator statistics (mean, abs_mean, baseline, group sizes)",
    "pref": "preference learning (DPO family, reward model): accuracy, chosen/rejected, margin, log-probs",
    "optim": "the optimiser: lr, grad_norm, updates, skipped steps",
    "perf": "speed and memory: step_time, tokens_per_s",
    "response": "generated responses: length_mean",
    "eval": "evaluations (eval/<...>), before/during/after training",
    "sync": "parameter exchange between ranks/agents: bytes, seconds, participants",
    "consensus": "the decentralized algorithm: distance of each agent to the consensus",
    "data": "data pipeline counters (skipped rows, truncations)",
}

NON_METRIC_KEYS = ("step", "stage")  # bookkeeping columns of a metrics.jsonl row


def namespace(key: str) -> str:
    """The namespace of a metric key (its part before the first ``/``)."""
    return key.split("/", 1)[0] if "/" in key else ""


def unknown_keys(keys: list[str] | set[str]) -> list[str]:
    """Keys that are neither bookkeeping columns nor in a documented namespace."""
    return sorted(k for k in keys if k not in NON_METRIC_KEYS and namespace(k) not in NAMESPACES)
