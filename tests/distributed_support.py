"""Run rlfuse on N local ranks for the distributed tests (gloo on CPU, 127.0.0.1 only).

Every rank is a subprocess ``python -m distributed_support SCENARIO ARGS_JSON`` with torchrun's
environment variables set by hand (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``,
``MASTER_PORT``), one thread and Python's fault handler on (a rank killed by a signal,
SIGABRT or SIGSEGV, leaves every thread's Python stack in its log); :func:`launch` starts
them and :func:`wait` joins them with a hard timeout (a rank still running after it is
killed and the test fails). Each rank writes
what the test checks under ``out/``: ``rank<r>.json`` and, for jobs, ``rank<r>.pt`` (the flat
trainable weights); scenario ``jobs`` runs several jobs in the same ranks (one start-up).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, world: int, args: dict[str, Any], out: Path, env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for r in range(world):
        e = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS),
                 PYTHONFAULTHANDLER="1", **(env or {}))  # a rank that aborts prints every thread's stack
        e.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed_support", scenario, json.dumps({**args, "out": str(out)})],
            env=e, stdout=open(out / f"rank{r}.log", "w"), stderr=subprocess.STDOUT, cwd=str(TESTS),
        ))
    return procs


def wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Join every rank within ``timeout`` seconds; kill them all and raise on a hang."""
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()
        raise AssertionError(f"ranks still running after {timeout} s (a hang)") from None
    return codes


def logs(out: Path, world: int) -> str:
    return "\n".join(f"--- rank {r}\n" + (out / f"rank{r}.log").read_text()[-3000:] for r in range(world))


def results(out: Path, world: int) -> list[dict[str, Any]]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


# ----------------------------------------------------------------- what a rank runs


def _job(args: dict[str, Any]) -> None:
    """A whole rlfuse job (``run_job``), then this rank's flat weights and summary."""
    import torch

    from rlfuse import distributed
    from support import run_job

    torch.set_num_threads(1)
    out = Path(args["out"])
    rank = int(os.environ["RANK"])
    with distributed.exit_on_failure():
        summary = run_job(args["overrides"], args["run_dir"])
    (out / f"rank{rank}.json").write_text(json.dumps({"summary": summary}, default=str))
    distributed.shutdown()


def _jobs(args: dict[str, Any]) -> None:
    """Several jobs one after the other in the same ranks (one process group, as the stages
    of a pipeline share it): each job ``{"name", "overrides", "resume_from": [run_dir, step]?}``
    runs in ``<out>/<name>_run`` and leaves ``<out>/<name>/rank<r>.pt``. ``resume_from``
    first copies that run's checkpoint of ``step`` into the job's fresh run dir (rank 0)."""
    import shutil

    import torch

    from rlfuse import distributed
    from support import run_job

    torch.set_num_threads(1)
    out = Path(args["out"])
    rank = distributed.init(timeout_s=60).rank  # the jobs' trainers reuse this group
    with distributed.exit_on_failure():
        for job in args["jobs"]:
            run, keep = out / f"{job['name']}_run", out / job["name"]
            keep.mkdir(parents=True, exist_ok=True)
            if job.get("resume_from"):
                src, step = job["resume_from"]
                if rank == 0:
                    name = f"step_{int(step):07d}"
                    shutil.copytree(out / f"{src}_run" / "checkpoints" / name, run / "checkpoints" / name)
                distributed.current().barrier("test: checkpoint copied")
            os.environ["RLFUSE_TEST_OUT"] = str(keep)
            run_job(job["overrides"], run)
    (out / f"rank{rank}.json").write_text(json.dumps({"jobs": [j["name"] for j in args["jobs"]]}))
    distributed.shutdown()


class KeepWeights:
    """A test plugin: at teardown, save this rank's flat weights to ``$RLFUSE_TEST_OUT/rank<r>.pt``
    (a sharded policy is gathered around teardown: its full weights)."""

    def __init__(self, cfg: Any = None, name: str = "keep") -> None:
        pass

    from rlfuse import hookimpl

    @hookimpl
    def teardown(self, ctx: Any) -> None:
        import torch

        flat = torch.cat([p.detach().reshape(-1).float() for p in ctx.policy.parameters()])
        torch.save(flat, Path(os.environ["RLFUSE_TEST_OUT"]) / f"rank{ctx.dist.rank}.pt")


class CrashOnce:
    """A test plugin: on rank 1, raise at step ``RLFUSE_TEST_CRASH_STEP`` the first time only
    (a marker file remembers); every rank appends ``attempt step`` lines to a trace file."""

    from rlfuse import hookimpl

    def __init__(self, cfg: Any = None, name: str = "crash") -> None:
        self.trace = Path(os.environ["RLFUSE_TEST_TRACE"])
        self.at = int(os.environ["RLFUSE_TEST_CRASH_STEP"])

    @hookimpl(tryfirst=True)
    def rollout(self, ctx: Any, step: int) -> None:
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        with open(self.trace, "a") as f:
            f.write(f"{ctx.dist.rank} {attempt} {step}\n")
        marker = self.trace.with_suffix(".crashed")
        if ctx.dist.rank == 1 and step == self.at and not marker.exists():
            marker.write_text("1")
            raise RuntimeError("injected crash")
        return None


class FailSaveOnRank1:
    """A test plugin: its ``save_state`` raises on rank 1 (a rank that cannot write its part
    of a checkpoint)."""

    from rlfuse import hookimpl

    def __init__(self, cfg: Any = None, name: str = "bad") -> None:
        self.rank = int(os.environ.get("RANK", "0"))

    @hookimpl
    def save_state(self) -> dict[str, Any]:
        if self.rank == 1:
            raise OSError("injected: no space left for rank 1's part")
        return {}


def _flat_model(seed: int):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))


def _fake_ctx(dist: Any, policy: Any, strategy: str = "none") -> Any:
    from types import SimpleNamespace

    import torch
    from omegaconf import OmegaConf

    recorded: dict[str, float] = {}
    return SimpleNamespace(
        dist=dist, policy=policy, modules=torch.nn.ModuleDict(), metrics=recorded,
        cfg=OmegaConf.create({"trainer": {"strategy": strategy}}), record=recorded.update,
    )


def _flat(model: Any):
    import torch

    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _sync_checks(args: dict[str, Any]) -> None:
    """Unit checks of the sync plugins and the metric reduction on real ranks."""
    import torch

    from rlfuse import distributed
    from rlfuse.plugins.sync import allreduce, diloco, gossip

    torch.set_num_threads(1)
    d = distributed.init(timeout_s=30)
    r = d.rank
    res: dict[str, Any] = {}
    # as in every job, a transformers model is built after the group exists (it imports
    # torch._dynamo, which must not keep the group alive past shutdown: checked at the end)
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2))

    # metric reduction with uneven counts; rank 1 has a key the others lack
    values = [float(v) for v in range(1, 3 + 4 * r)]  # rank r holds 2 + 4r values
    sums = {"x/mean": sum(values)}
    counts = {"x/mean": float(len(values))}
    if r == 1:
        sums["x/only_one"], counts["x/only_one"] = 5.0, 2.0
    res["reduced"] = d.reduce_metrics(sums, counts)

    def after(plugin: Any, steps: int = 1, k: int = 1, seed_base: int = 100) -> tuple[Any, Any]:
        model = _flat_model(0)  # common start
        ctx = _fake_ctx(d, model)
        if isinstance(plugin, diloco.Plugin):
            plugin.before_step(ctx=ctx)
        start = _flat(model).clone()
        with torch.no_grad():
            for p in model.parameters():  # each rank drifts differently ("local training")
                g = torch.Generator().manual_seed(seed_base + r)
                p.add_(torch.randn(p.shape, generator=g))
        before = _flat(model).clone()
        for s in range(steps):
            plugin.sync(ctx=ctx, step=s)
        return start, before, _flat(model).clone(), ctx.metrics

    _, before, avg, m_ar = after(allreduce.Plugin(allreduce.Config(every=1)))
    res["allreduce"] = {"before": before.tolist(), "after": avg.tolist(), "metrics": m_ar}
    _, _, dl, m_dl = after(diloco.Plugin(diloco.Config(every=1, outer_lr=1.0, outer_momentum=0.0)))
    res["diloco"] = {"after": dl.tolist(), "metrics": m_dl}
    start, _, dl2, _ = after(diloco.Plugin(diloco.Config(every=1, bf16=True)))
    res["diloco_nesterov_bf16"] = {"start": start.tolist(), "after": dl2.tolist()}
    _, gb, ga, m_g = after(gossip.Plugin(gossip.Config(every=1, topology="ring")))
    res["gossip"] = {"before": gb.tolist(), "after": ga.tolist(), "metrics": m_g}

    # consolidate: the final policy becomes the mean over ranks (same perturbations as above)
    model = _flat_model(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + r)))
    changed = allreduce.Plugin(allreduce.Config()).consolidate(ctx=_fake_ctx(d, model))
    res["consolidate"] = {"changed": changed, "after": _flat(model).tolist()}

    # two-phase: rank 1 fails while preparing -> every rank raises, nobody applies
    applied = []
    try:
        d.two_phase(lambda: 1 / (r != 1), lambda v: d.all_reduce(torch.ones(3)), applied.append, what="test update")
        res["two_phase"] = "no error"
    except distributed.PeerLost as e:
        res["two_phase"] = str(e)
    res["two_phase_applied"] = len(applied)
    Path(args["out"], f"rank{r}.json").write_text(json.dumps(res))
    # shutdown: rank 1 arrives a second late; no rank may leave before every rank arrived
    time.sleep(1.0 * r)
    entered = time.time()
    distributed.shutdown()
    left = time.time()
    Path(args["out"], f"shutdown{r}.json").write_text(json.dumps({"entered": entered, "left": left,
                                                                 "threads": _thread_names()}))


def _thread_names() -> list[str]:
    """This process's native threads by name (Linux: gloo's are ``pt_gloo_*``/``gloo_*``)."""
    task = Path("/proc/self/task")
    return sorted((t / "comm").read_text().strip() for t in task.iterdir()) if task.exists() else []


def _collective_loop(args: dict[str, Any]) -> None:
    """All-reduce in a loop until a peer is lost; report how the error read and when."""
    import torch

    from rlfuse import distributed

    d = distributed.init(timeout_s=float(args["timeout_s"]), heartbeat_s=0.5)
    out = Path(args["out"])
    with distributed.exit_on_failure():
        (out / f"ready{d.rank}").write_text("1")
        t = torch.ones(1000)
        while True:
            d.all_reduce(t, op="mean", what="test all-reduce")
            time.sleep(0.05)


def main() -> None:
    scenario, raw = sys.argv[1], sys.argv[2]
    args = json.loads(raw)
    {"job": _job, "jobs": _jobs, "sync_checks": _sync_checks, "collective_loop": _collective_loop}[scenario](args)


if __name__ == "__main__":
    main()
