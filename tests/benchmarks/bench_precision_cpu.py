"""bf16 autocast vs fp32 on this CPU, at SmolLM2-135M's shapes: which one should `auto` pick?

    python tests/benchmarks/bench_precision_cpu.py [--rounds 3] [--batch 4] [--seq 128]

A randomly initialised Llama with SmolLM2-135M's configuration (speed does not depend on the
weights), one forward + backward of a language-model loss per step, 2 threads, the two modes
alternating round by round; prints each mode's step times and median. The result on our CI
machine is in docs/precision.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq))

    def step(amp: bool) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    times: dict[str, list[float]] = {"fp32": [], "bf16-autocast": []}
    for _ in range(a.rounds):
        times["fp32"].append(step(False))
        times["bf16-autocast"].append(step(True))
    for name, v in times.items():
        print(f"{name}: {[round(x, 2) for x in v]} s, median {statistics.median(v):.2f} s")
    print(f"bf16 autocast / fp32 (median): {statistics.median(times['bf16-autocast']) / statistics.median(times['fp32']):.2f}x")


if __name__ == "__main__":
    main()
