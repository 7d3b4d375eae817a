"""``loss=ppo`` on the fused path vs the unfused path: the training micro-batch and whole steps.

    python tests/benchmarks/bench_fused_loss.py [--model tiny|head|DIR] [--repeats 3] [--iters 4]
    python tests/benchmarks/bench_fused_loss.py --steps 4 [--repeats 3]      (whole PPO steps)
    python tests/benchmarks/bench_fused_loss.py --rm [--model head]          (reward-model forward)

A benchmark, not a test. Variants (``kernels.fused_loss``):

* ``unfused`` (``false``) -- the shared forward computes log-probs + entropy with
  ``linear_token_logprobs`` (scored tokens only), then ``clipped_policy_loss``;
* ``fused``   (``auto``)  -- the forward stops before the lm_head and ``linear_policy_loss``
  computes lm_head, log-softmax, ratio, clip, KL, entropy and the masked sum in one chunked
  pass, gradients included.

Micro-batch mode (default): one PPO micro-batch (``--rows`` rows, a ``--prompt``-token prompt
shared by groups of 4, ``--response`` answer tokens of uneven length), forward + loss +
backward ``--iters`` times per repetition, through the core's ``Context.forward`` exactly as
the trainer calls it. ``--model``: ``tiny`` (the built-in model, vocabulary 100), ``head`` (a
2-layer Llama with SmolLM2-135M's hidden size 576 and vocabulary 49,152: the lm_head-heavy
case, random weights), or a ``save_pretrained`` folder. Step mode (``--steps N``): whole
``algo=ppo`` jobs on the tiny model (generation, rewards, GAE, 4 epochs), N timed steps after
one warm-up, each variant in a fresh process.

``--rm``: a reward model's training forward (``loss=bradley_terry`` declares only hidden
states): 4 pairs, a 40-token prompt, answers of 4-16 tokens, forward + a scalar head on the last
token + backward; ``false`` computes the (unused) log-probs as before, ``auto`` stops before the
lm_head.

Prints medians over ``--repeats`` alternating repetitions of wall and CPU seconds (process
time, all threads: steadier than wall time on a shared machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import timing  # tests/benchmarks/timing.py (the script's folder is on sys.path)
import torch

VARIANTS = {"unfused": "false", "fused": "auto"}


def build_model(name: str):
    from rlfuse import models
    from rlfuse.config import ModelConfig

    if name == "tiny":
        tok = models.build_tiny_tokenizer()
        return models.build_tiny_model(ModelConfig(), tok, seed=0), len(tok)
    if name == "head":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)  # fmt: skip
        return LlamaForCausalLM(cfg), 49152
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    return m, m.config.vocab_size


def make_batch(model, vocab: int, rows: int, prompt: int, response: int):
    from rlfuse import models
    from rlfuse.data import Batch

    g = torch.Generator().manual_seed(0)
    groups = max(1, rows // 4)
    prompts = [torch.randint(4, vocab, (prompt,), generator=g) for _ in range(groups)]
    ids = torch.stack([prompts[i * groups // rows] for i in range(rows)])
    lens = torch.randint(response // 2, response + 1, (rows,), generator=g)
    rmask = (torch.arange(response)[None] < lens[:, None]).long()
    resp = torch.randint(4, vocab, (rows, response), generator=g).masked_fill(rmask == 0, 0)
    batch = Batch(torch.cat([ids, resp], 1), torch.cat([torch.ones_like(ids), rmask], 1),
                  torch.cat([torch.zeros_like(ids), rmask], 1).float())  # fmt: skip
    with torch.no_grad():
        lp = models.forward(model, batch).logprobs
    m = batch.response_mask
    batch.old_logprobs = (lp + 0.1 * torch.randn(lp.shape, generator=g)) * m
    batch.advantages = torch.randn(lp.shape, generator=g) * m
    batch.totals = {"tokens": float(m.sum()), "sequences": float(rows)}
    return batch


def micro(args) -> None:
    from omegaconf import OmegaConf

    from rlfuse.manager import instantiate, resolve
    from rlfuse.trainer import Context

    torch.set_num_threads(args.threads)
    model, vocab = build_model(args.model)
    model.train()
    batch = make_batch(model, vocab, args.rows, args.prompt, args.response)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    options = {"kl_coef": 0.05, "entropy_coef": 0.01}  # every term of the loss in play
    plugin = instantiate(resolve("ppo"), options, name="ppo", where="loss.ppo")

    def step(mode: str) -> None:
        ctx = Context.__new__(Context)
        ctx.policy, ctx._reference = model, ref
        ctx.cfg = OmegaConf.create({"kernels": {"backend": "auto", "fused_loss": mode}})
        ctx._forward_needs = {"entropy": False, "hidden": False}
        ctx._head_readers, ctx._logprob_readers = 0, False
        plugin.setup(ctx)
        part = batch.select(torch.arange(len(batch)))
        part.totals, part.ref_logprobs = batch.totals, batch.ref_logprobs
        model.zero_grad(set_to_none=True)
        plugin.loss(ctx=ctx, batch=part).terms["policy"].backward()

    with torch.no_grad():  # reference log-probs once, like the trainer
        from rlfuse import models

        batch.ref_logprobs = models.forward(ref, batch).logprobs * batch.response_mask
    times = timing.alternate(step, VARIANTS, args.repeats, args.iters)
    tokens = int(batch.response_mask.sum())
    print(f"model={args.model} vocab={vocab} rows={args.rows} prompt={args.prompt} response<={args.response} "
          f"scored tokens={tokens} threads={args.threads} repeats={args.repeats} iters={args.iters}")  # fmt: skip
    timing.print_table(times, "fwd+loss+bwd")


def rm(args) -> None:
    from omegaconf import OmegaConf

    from rlfuse.data import Batch
    from rlfuse.plugins._data.records import pack
    from rlfuse.trainer import Context

    torch.set_num_threads(args.threads)
    model, vocab = build_model(args.model)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, vocab, (40,), generator=g).tolist() for _ in range(4)]
    answers = [torch.randint(4, vocab, (int(n),), generator=g).tolist() for n in torch.randint(4, 17, (8,), generator=g)]
    batch = Batch(*pack(prompts * 2, answers, pad_id=0))
    head = torch.nn.Linear(model.config.hidden_size, 1)

    def step(mode: str) -> None:
        ctx = Context.__new__(Context)
        ctx.policy = model
        ctx.cfg = OmegaConf.create({"kernels": {"backend": "auto", "fused_loss": mode}})
        ctx._forward_needs = {"entropy": False, "hidden": False}
        ctx._head_readers, ctx._logprob_readers = 0, False
        ctx.require_forward(hidden=True)  # what loss=bradley_terry declares
        part = batch.select(torch.arange(len(batch)))
        model.zero_grad(set_to_none=True)
        h = ctx.forward(part).hidden
        head(h[torch.arange(len(batch)), part.attention_mask.sum(1) - 1]).sum().backward()

    variants = {"log-probs computed (false)": "false", "stops before the lm_head (auto)": "auto"}
    times = timing.alternate(step, variants, args.repeats, args.iters)
    print(f"reward-model forward, model={args.model} vocab={vocab} rows={len(batch)} threads={args.threads}")
    timing.print_table(times, "fwd+bwd")


def step_child(mode: str, steps: int, threads: int) -> None:
    from hydra import compose, initialize_config_module

    import rlfuse  # noqa: F401
    from rlfuse.trainer import train

    torch.set_num_threads(threads)
    over = ["algo=ppo", "algo.warmup=null", f"trainer.max_steps={steps + 1}", "trainer.progress=false", "eval=[]",
            "logger=[jsonl]", "trainer.eval_every=0", f"kernels.fused_loss={mode}"]  # fmt: skip
    with initialize_config_module("rlfuse.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=over)
    run_dir = f"/tmp/rlfuse-bench-fused-{mode}-{os.getpid()}"
    c0 = time.process_time()
    train(cfg, run_dir)
    rows = [json.loads(x) for x in open(f"{run_dir}/metrics.jsonl") if "perf/step_time" in x][1:]
    print(json.dumps({"step_s": statistics.median(r["perf/step_time"] for r in rows), "cpu_s": time.process_time() - c0,
                      "loss": rows[-1].get("loss/policy")}))  # fmt: skip


def steps(args) -> None:
    times: dict[str, list[dict]] = {k: [] for k in VARIANTS}
    for _ in range(args.repeats):
        for name, mode in VARIANTS.items():
            cmd = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            times[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"algo=ppo tiny model, {args.steps} timed steps per job, threads={args.threads}, repeats={args.repeats}")
    print("| variant | median step s (median over jobs) | job CPU s (median) | step s per job |")
    print("|---|---|---|---|")
    for name, rs in times.items():
        st = [r["step_s"] for r in rs]
        print(f"| {name} | {statistics.median(st):.3f} | {statistics.median(r['cpu_s'] for r in rs):.1f} | "
              f"{', '.join(f'{s:.3f}' for s in st)} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=24)
    ap.add_argument("--response", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--rm", action="store_true", help="the reward-model forward instead")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        step_child(a.child, a.steps, a.threads)
    elif a.rm:
        rm(a)
    elif a.steps:
        steps(a)
    else:
        micro(a)


if __name__ == "__main__":
    main()
