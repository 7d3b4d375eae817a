"""Before/after of each less-work change to the training forward, on a real model.

    python tests/benchmarks/bench_forward.py [--model DIR] [--repeats 5] [--threads 2]

A benchmark, not a test. One DPO-shaped batch (4 pairs of the real-model workload of
bench_vs_trl.py: chat prompt ~46 tokens, answers 2-8 tokens) and one GRPO-shaped batch (2
prompts x 4 answers of 16 tokens, left-padded), through four variants of
``rlfuse.models.forward`` with forward + backward (and a no-grad forward):

* ``all positions``  -- the forward before these changes: lm_head + log-softmax at every position;
* ``scored only``    -- lm_head + log-softmax only at response tokens (and padding columns dropped);
* ``shared prefix``  -- plus: each prompt run once for the rows that share it (4D mask).

Prints the median CPU seconds (process time, all threads: steadier than wall time on a
shared machine) and wall seconds over ``--repeats`` alternating repetitions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def all_positions_forward(model, batch):
    """The forward as it was: every position through the lm_head and the log-softmax."""
    from rlfuse.kernels import linear_token_logprobs
    from rlfuse.models import position_ids

    ids, mask = batch.input_ids, batch.attention_mask
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
    head = model.get_output_embeddings()
    lp, ent = linear_token_logprobs(out.last_hidden_state[:, :-1], head.weight, labels, return_entropy=True)
    return torch.cat([lp.new_zeros(lp.shape[0], 1), lp], 1)


def batches(model_dir: str, tok):
    sys.path.insert(0, str(HERE))
    import bench_vs_trl as bvt

    from rlfuse.data import Batch
    from rlfuse.plugins._data.records import encode_answers, pack
    from rlfuse.plugins._sampling import left_pad

    data = Path("/tmp") / "rlfuse-bench-forward-data"
    data.mkdir(exist_ok=True)
    bvt.write_real_data(data, model_dir, n_rows=16)
    rows = [json.loads(x) for x in (data / "preferences.jsonl").read_text().splitlines()[:4]]
    p = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    a = encode_answers(tok, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    ids, attn, resp = pack(p * 2, a, tok.pad_token_id)
    dpo = Batch(ids, attn, resp)
    prompts = [json.loads(x)["prompt"] for x in (data / "prompts.jsonl").read_text().splitlines()[:2]]
    pids = [tok(x, add_special_tokens=False)["input_ids"] for x in prompts]
    ids, mask = left_pad([x for x in pids for _ in range(4)], tok.pad_token_id)
    g = torch.Generator().manual_seed(0)
    ans = torch.randint(100, 40000, (8, 16), generator=g)
    lens = torch.tensor([16, 12, 16, 9, 16, 16, 5, 14])
    am = (torch.arange(16)[None] < lens[:, None]).long()
    grpo = Batch(torch.cat([ids, ans.masked_fill(am == 0, tok.pad_token_id)], 1), torch.cat([mask, am], 1),
                 torch.cat([torch.zeros_like(mask), am], 1).float())
    return {"dpo (4 pairs)": dpo, "grpo (2x4 rows)": grpo}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/work/models/smollm2-135m")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlfuse import models

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)

    def variant(share: bool):
        def fn(m, b):
            models.SHARE_PREFIX = share
            return models.forward(m, b, entropy=True).logprobs
        return fn

    variants = {"all positions": all_positions_forward, "scored only": variant(False), "shared prefix": variant(True)}
    print(f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {a.model}, threads={a.threads}, "
          f"median of {a.repeats}")
    print("| batch | variant | real tokens / padded | fwd+bwd CPU s | fwd+bwd wall s | no-grad fwd CPU s |")
    print("|---|---|---|---|---|---|")
    for name, batch in batches(a.model, tok).items():
        res: dict[str, dict[str, list[float]]] = {v: {"cpu": [], "wall": [], "ng": []} for v in variants}
        for _ in range(a.repeats):
            for v, fn in variants.items():
                model.zero_grad(set_to_none=True)
                w0, c0 = time.perf_counter(), time.process_time()
                lp = fn(model, batch)
                (lp * batch.response_mask).sum().backward()
                res[v]["cpu"].append(time.process_time() - c0)
                res[v]["wall"].append(time.perf_counter() - w0)
                c0 = time.process_time()
                with torch.no_grad():
                    fn(model, batch)
                res[v]["ng"].append(time.process_time() - c0)
        for v in variants:
            r = res[v]
            print(f"| {name} | {v} | {int(batch.attention_mask.sum())} / {batch.input_ids.numel()} | "
                  f"{statistics.median(r['cpu']):.2f} | {statistics.median(r['wall']):.2f} | "
                  f"{statistics.median(r['ng']):.2f} |", flush=True)


if __name__ == "__main__":
    main()
