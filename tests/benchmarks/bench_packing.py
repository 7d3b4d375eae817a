"""Padding-free packing (``model.pack``) vs the padded forward, on rows of very uneven length.

    python tests/benchmarks/bench_packing.py [--model tiny|head|DIR] [--rows 16] [--repeats 3]

A benchmark, not a test. One SFT-shaped micro-batch: ``--rows`` rows that share no prompt
(prompt 4-12 tokens, answers spread evenly from ``--min`` to ``--max`` tokens, right padding),
forward + backward of the summed answer log-probs through ``rlfuse.models.forward``:

* ``padded`` -- ``model.pack=false``: the batch as it is (all-padding columns dropped);
* ``packed`` -- ``model.pack=true``: rows placed one after another in common sequences
  (first-fit by decreasing length, none longer than the longest row), per-row position ids,
  a block-diagonal 4D mask.

``--model``: ``tiny`` (the built-in model), ``head`` (2-layer Llama, SmolLM2-135M's widths and
vocabulary, random weights) or a ``save_pretrained`` folder. Prints medians over ``--repeats``
alternating repetitions of wall and CPU seconds (process time, all threads).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402  (tests/benchmarks/timing.py)


def main() -> None:
    from bench_fused_loss import build_model

    from rlfuse import models, packing
    from rlfuse.data import Batch
    from rlfuse.plugins._data.records import pack

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--min", type=int, default=4)
    ap.add_argument("--max", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default=None, help="sdpa | eager (default: the model's)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, vocab = build_model(a.model)
    if a.attn:
        model.config._attn_implementation = a.attn
    g = torch.Generator().manual_seed(0)
    lens = torch.linspace(a.min, a.max, a.rows).long().tolist()
    perm = torch.randperm(a.rows, generator=g).tolist()
    prompts = [torch.randint(4, vocab, (4 + i % 9,), generator=g).tolist() for i in range(a.rows)]
    answers = [torch.randint(4, vocab, (lens[perm[i]],), generator=g).tolist() for i in range(a.rows)]
    batch = Batch(*pack(prompts, answers, pad_id=0))
    pos = models.position_ids(batch.attention_mask)
    lay = packing.plan_shared_prefixes(batch.input_ids, batch.attention_mask, batch.response_mask, pos, pack=True)

    def step(pack_on: bool) -> None:
        models.PACK = pack_on
        model.zero_grad(set_to_none=True)
        models.forward(model, batch, entropy=True).logprobs.sum().backward()

    times = timing.alternate(step, {"padded": False, "packed": True}, a.repeats, a.iters)
    B, T = batch.input_ids.shape
    shape = f"{tuple(lay.input_ids.shape)}" if lay is not None else "not packed"
    print(f"model={a.model} attn={model.config._attn_implementation} rows={B} padded={B}x{T}={B * T} "
          f"real={int(batch.attention_mask.sum())} packed={shape} threads={a.threads} repeats={a.repeats}")  # fmt: skip
    timing.print_table(times, "fwd+bwd")


if __name__ == "__main__":
    main()
