"""torch.distributed for rlfuse: the process group, deadline-guarded collectives, metric reduction.

One process runs one rank. ``torchrun --nproc-per-node N -m rlfuse ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init` reads them
once per process and every stage of a pipeline reuses the same group. Without them (a plain
``rlfuse``) :func:`init` returns a one-rank :class:`Dist` whose collectives are no-ops, so the
core and the plugins call the same methods either way.

Deadlines: the process group is created with ``dist.timeout_s``, so a collective whose peer
never arrives raises instead of waiting forever (gloo: a recv deadline; NCCL: the watchdog).
Every collective goes through :meth:`Dist.guard`, which turns that failure into
:class:`PeerLost` naming the rank(s) that stopped: each rank writes a heartbeat into the
rendezvous store every ``dist.heartbeat_s`` from a daemon thread, and a rank that failed
writes why; the rank whose heartbeat is stale (killed, stopped, or its node gone) is the lost one.

Plugins reach all of this through ``ctx.dist`` (rank, world size, ``all_reduce`` /
``broadcast`` / ``exchange`` with a deadline, ``two_phase`` for all-or-nothing updates).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any

import torch
from torch import nn

_HB_PREFIX = "rlfuse/hb/"
_FAIL_PREFIX = "rlfuse/failed/"


class PeerLost(RuntimeError):
    """A collective did not complete: a peer died, hung, or failed (the message names it)."""


class Dist:
    """The ranks of this run and the collectives between them (a no-op for one rank).

    :param rank: this process's rank (0 in a single process).
    :param world_size: number of ranks.
    :param timeout_s: deadline of every collective.
    """

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        local_rank: int = 0,
        timeout_s: float = 300.0,
        heartbeat_s: float = 1.0,
        backend: str = "none",
        store: Any = None,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        self.backend = backend
        self.store = store
        self.bytes_sent = 0  # payload bytes this rank sent through the helpers below
        self.bytes_logged = 0  # bytes_sent when the last step's perf/comm_bytes was taken
        self._stop = threading.Event()
        self._hb: threading.Thread | None = None

    # -- who am I ---------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """True when there is more than one rank."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that logs and writes checkpoints, ``final/`` and summaries."""
        return self.rank == 0

    # -- deadline-guarded collectives -------------------------------------------------
    def guard(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run the collective ``fn``; a failure or a missed deadline becomes :class:`PeerLost`
        naming the lost rank(s) and ``what`` was being done."""
        if not self.enabled:
            return fn()
        try:
            return fn()
        except PeerLost:
            raise
        except Exception as e:  # noqa: BLE001 - backends raise RuntimeError/DistBackendError
            raise PeerLost(self.diagnose(what, e)) from e

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", what: str = "all_reduce") -> torch.Tensor:
        """In-place all-reduce (``sum | mean | max | min``) of ``tensor`` within the deadline."""
        if not self.enabled:
            return tensor
        import torch.distributed as td

        red = {"sum": td.ReduceOp.SUM, "mean": td.ReduceOp.SUM, "max": td.ReduceOp.MAX, "min": td.ReduceOp.MIN}[op]
        self.bytes_sent += tensor.numel() * tensor.element_size()
        self.guard(what, lambda: td.all_reduce(tensor, op=red))
        if op == "mean":
            tensor /= self.world_size
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0, what: str = "broadcast") -> torch.Tensor:
        if not self.enabled:
            return tensor
        import torch.distributed as td

        if self.rank == src:
            self.bytes_sent += tensor.numel() * tensor.element_size()
        self.guard(what, lambda: td.broadcast(tensor, src=src))
        return tensor

    def all_gather_object(self, obj: Any, what: str = "all_gather_object") -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.enabled:
            return [obj]
        import torch.distributed as td

        out: list[Any] = [None] * self.world_size
        self.guard(what, lambda: td.all_gather_object(out, obj))
        return out

    def exchange(self, tensor: torch.Tensor, peers: Sequence[int], what: str = "exchange") -> dict[int, torch.Tensor]:
        """Send ``tensor`` to every rank in ``peers`` and receive theirs (point-to-point, no
        global collective): ``{peer: their tensor}``. Every peer must call it with this rank
        among its own peers (a symmetric topology)."""
        if not self.enabled or not peers:
            return {}
        import torch.distributed as td

        recv = {p: torch.empty_like(tensor) for p in peers}
        ops = [td.P2POp(td.isend, tensor, p) for p in peers] + [td.P2POp(td.irecv, recv[p], p) for p in peers]
        self.bytes_sent += tensor.numel() * tensor.element_size() * len(peers)

        def run() -> None:
            for work in td.batch_isend_irecv(ops):
                work.wait(timedelta(seconds=self.timeout_s))

        self.guard(what, run)
        return recv

    def barrier(self, what: str = "barrier") -> None:
        """Wait for every rank, within the deadline."""
        if self.enabled:
            self.all_reduce(torch.zeros(1), what=what)

    def two_phase(
        self,
        local: Callable[[], Any],
        communicate: Callable[[Any], Any],
        apply: Callable[[Any], None],
        what: str,
    ) -> None:
        """An all-or-nothing update across ranks, in two agreements:

        1. every rank runs ``local()`` (no collectives), then the ranks agree all succeeded --
           a rank that failed makes every rank raise :class:`PeerLost` naming it before any
           communication;
        2. ``communicate(value)`` (the collectives; a lost peer raises :class:`PeerLost` here),
           then the ranks agree every result is complete and finite;
        3. only then does each rank ``apply(result)``.

        A rank that raises never applies, and a rank whose collectives completed waits in the
        second agreement, which cannot complete without every peer -- so no rank is ever left
        half-updated with a partial result.
        """
        error: BaseException | None = None
        value = None
        try:
            value = local()
        except Exception as e:  # noqa: BLE001
            error = e
        self._agree(error is None, what, error)
        result = communicate(value)
        finite = not isinstance(result, torch.Tensor) or bool(torch.isfinite(result).all())
        self._agree(finite, what, ValueError("non-finite values after the exchange") if not finite else None)
        apply(result)

    def _agree(self, ok: bool, what: str, error: BaseException | None) -> None:
        key = f"rlfuse/why/{what}/"
        if not ok and self.store is not None:  # the peers read why, after the agreement
            self.store.set(f"{key}{self.rank}", f"{type(error).__name__}: {error}"[:300])
        failed = self.failed_ranks(ok, what=f"{what} (agreement)")
        if failed:
            why = []
            for r in failed:
                if r == self.rank and error is not None:
                    why.append(f"rank {r}: {type(error).__name__}: {error}")
                elif self.store is not None and self.store.check([f"{key}{r}"]):
                    why.append(f"rank {r}: {self.store.get(f'{key}{r}').decode()}")
            detail = f" ({'; '.join(why)})" if why else ""
            raise PeerLost(f"{what} aborted on every rank, nothing applied: rank(s) {failed} failed{detail}") from error

    def failed_ranks(self, ok: bool, what: str = "agreement") -> list[int]:
        """The ranks that report ``ok=False`` (one small all-gather)."""
        if not self.enabled:
            return [] if ok else [0]
        flags = torch.zeros(self.world_size)
        flags[self.rank] = 0.0 if ok else 1.0
        self.all_reduce(flags, what=what)
        return [r for r in range(self.world_size) if flags[r] > 0]

    # -- tensors of a model -------------------------------------------------------------
    def broadcast_parameters(self, modules: Iterable[nn.Module], src: int = 0) -> None:
        """Make every rank start from rank ``src``'s weights (parameters and buffers)."""
        if not self.enabled:
            return
        tensors = [t for m in modules for t in list(m.parameters()) + list(m.buffers())]
        for chunk in _buckets(tensors):
            flat = torch.cat([t.detach().reshape(-1).float() for t in chunk])
            self.broadcast(flat, src=src, what="broadcast of the initial weights")
            unflatten_into(flat, chunk)

    def sum_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Sum the gradients of ``params`` over ranks (bucketed flat all-reduces). With loss
        terms normalised by global counts (``batch.totals``) the sum is the gradient of the
        global-batch loss, exactly as one process would compute it."""
        if not self.enabled:
            return
        grads = []
        for p in params:
            if p.grad is None:  # every rank must send the same layout
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        for chunk in _buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in chunk])
            self.all_reduce(flat, what="gradient all-reduce")
            unflatten_into(flat, chunk)

    # -- metrics ------------------------------------------------------------------------
    def reduce_metrics(
        self, sums: dict[str, float], counts: dict[str, float], what: str = "metric reduction"
    ) -> dict[str, float]:
        """Exact global means: ``sum_r sums[k] / sum_r counts[k]`` for every key any rank has.

        Sums and counts are reduced separately, so a mean over uneven token or row counts is
        exact. The key set is agreed first, so a metric logged by one rank only (a
        rank-conditional metric) can never leave the ranks in different collectives; a rank
        without a key contributes 0 to its sum and its count.
        """
        if not self.enabled:
            return {k: v / counts[k] if counts[k] else 0.0 for k, v in sums.items()}
        keys = sorted(set().union(*self.all_gather_object(sorted(sums), what=f"{what} (keys)")))
        buf = torch.zeros(2, len(keys), dtype=torch.float64)
        for i, k in enumerate(keys):
            if k in sums:
                buf[0, i] = float(sums[k])
                buf[1, i] = float(counts.get(k, 1.0))
        self.all_reduce(buf, what=what)
        return {k: float(buf[0, i] / buf[1, i]) if buf[1, i] else 0.0 for i, k in enumerate(keys)}

    # -- failure diagnosis -----------------------------------------------------------------
    def start_heartbeat(self) -> None:
        if self.store is None or self._hb is not None:
            return
        self._beat()

        def loop() -> None:
            while not self._stop.wait(self.heartbeat_s):
                self._beat()

        self._hb = threading.Thread(target=loop, name="rlfuse-heartbeat", daemon=True)
        self._hb.start()

    def _beat(self) -> None:
        try:
            self.store.set(f"{_HB_PREFIX}{self.rank}", repr(time.time()))
        except Exception:  # noqa: BLE001 - the store host may be gone; diagnose() reports it
            pass

    def mark_failed(self, reason: str) -> None:
        """Tell the peers why this rank is about to stop (read by their :meth:`diagnose`)."""
        if self.store is None:
            return
        try:
            self.store.set(f"{_FAIL_PREFIX}{self.rank}", reason[:500])
        except Exception:  # noqa: BLE001
            pass

    def diagnose(self, what: str, error: BaseException | None = None) -> str:
        """One line naming the ranks that failed (their own reason) or went silent."""
        failed, stale = self._lost_ranks()
        if failed:
            who = "; ".join(f"rank {r} failed: {why}" for r, why in failed.items())
        elif stale:
            who = f"lost rank(s) {stale} (no heartbeat for > {self._stale_after():.0f} s: killed, stopped or its node is gone)"
        else:
            who = "no peer is known to be lost"
        cause = f" [{type(error).__name__}: {str(error).splitlines()[0][:200]}]" if error is not None else ""
        return f"rank {self.rank}: {what} did not complete within dist.timeout_s={self.timeout_s:g}: {who}{cause}"

    def _stale_after(self) -> float:
        return max(3.0 * self.heartbeat_s, 3.0)

    def _lost_ranks(self) -> tuple[dict[int, str], list[int]]:
        if self.store is None:
            return {}, []
        failed: dict[int, str] = {}
        stale: list[int] = []
        # a peer killed a moment ago still has a fresh heartbeat: wait until it goes stale
        deadline = time.time() + self._stale_after() + self.heartbeat_s
        while True:
            try:
                failed, stale = self._read_peers()
            except Exception:  # noqa: BLE001 - the store itself is gone (its host died)
                return {}, [0] if self.rank != 0 else []
            if failed or stale or time.time() > deadline:
                return failed, stale
            time.sleep(min(0.5, self.heartbeat_s))

    def _read_peers(self) -> tuple[dict[int, str], list[int]]:
        failed: dict[int, str] = {}
        stale: list[int] = []
        now = time.time()
        for r in range(self.world_size):
            if r == self.rank:
                continue
            if self.store.check([f"{_FAIL_PREFIX}{r}"]):
                failed[r] = self.store.get(f"{_FAIL_PREFIX}{r}").decode()
                continue
            key = f"{_HB_PREFIX}{r}"
            if not self.store.check([key]) or now - float(self.store.get(key).decode()) > self._stale_after():
                stale.append(r)
        return failed, stale

    def close(self) -> None:
        """Stop the heartbeat and wait for its thread: a daemon thread still inside a store
        call when the interpreter exits is torn down mid-C++ (``terminate called without an
        active exception``). The wait is bounded (a store call to a gone host may hang)."""
        self._stop.set()
        if self._hb is not None:
            self._hb.join(timeout=max(10.0, 2 * self.heartbeat_s + 1.0))
            self._hb = None
        self.store = None  # with the group destroyed, nothing keeps the store (rank 0: its server) alive


# ------------------------------------------------------------------------ process-wide


_CURRENT: Dist | None = None


def init(timeout_s: float = 300.0, heartbeat_s: float = 1.0, backend: str = "auto") -> Dist:
    """The process's :class:`Dist`, created on first call from torchrun's environment
    variables (``WORLD_SIZE`` > 1 starts a process group; otherwise a one-rank no-op)."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _CURRENT = Dist(timeout_s=timeout_s)
        return _CURRENT
    # torch._dynamo imported after the group exists (transformers imports it when it builds a
    # model) keeps a reference to the default group: destroy_process_group() then no longer
    # frees it, gloo's worker threads live on into interpreter exit, and one that releases a
    # finished collective's tensors there cannot take the GIL and aborts the process (SIGABRT,
    # "terminate called without an active exception") after a finished run. Imported before
    # the group is created it holds none (it costs nothing extra: every job builds a model).
    import torch._dynamo  # noqa: F401
    import torch.distributed as td

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"])
    # torchrun's agent hosts the store; a bare launch (tests, SLURM scripts) has rank 0 host it
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    timeout = timedelta(seconds=timeout_s)
    store = td.TCPStore(addr, port, world, is_master=rank == 0 and not agent_store, timeout=timeout)
    # a torchrun restart reuses the agent's store: keys of the failed attempt must not be seen
    store = td.PrefixStore(f"rlfuse/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    td.init_process_group(backend, store=td.PrefixStore("pg", store), rank=rank, world_size=world, timeout=timeout)
    _CURRENT = Dist(rank, world, local_rank, timeout_s, heartbeat_s, backend, td.PrefixStore("rlfuse", store))
    _CURRENT.start_heartbeat()
    return _CURRENT


def current() -> Dist:
    """The process's :class:`Dist` (a one-rank no-op before :func:`init`)."""
    return _CURRENT if _CURRENT is not None else Dist()


def shutdown() -> None:
    """Leave the process group: once, at the end of the process, on every rank.

    In order: this rank's heartbeat thread is stopped and joined (and the store dropped); the
    ranks meet in a last barrier, so no rank tears its group (or, on rank 0 of a bare launch,
    the store it hosts) down while a peer is still in its last steps; then the group is
    destroyed. A group that outlives this (something still refers to it) keeps gloo's worker
    threads into interpreter exit, where one releasing a finished collective's tensors cannot
    take the GIL and aborts the process: :func:`init` keeps torch._dynamo from holding the
    group, and the last barrier waits until the worker has released its tensor, so even a
    group kept alive elsewhere (FSDP's DTensor caches refer to its mesh) has no work left to
    release. A peer already lost only makes the barrier fail (ignored: nobody to wait for)."""
    global _CURRENT
    d, _CURRENT = _CURRENT, None
    if d is None or not d.enabled:
        return
    import torch.distributed as td

    d.close()
    flag = torch.zeros(1)
    try:
        d.all_reduce(flag, what="the last barrier (shutdown)")
    except PeerLost:
        pass
    else:  # the waiter wakes before the worker drops its reference: wait for it (bounded)
        deadline = time.monotonic() + 10.0
        while flag._use_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.001)
    if td.is_initialized():
        td.destroy_process_group()


# ------------------------------------------------------------------------ helpers

_BUCKET = 1 << 24  # elements per flat all-reduce (64 MiB of fp32)


def _buckets(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive groups of same-dtype/device tensors of at most ``_BUCKET`` elements."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        if not out or size + t.numel() > _BUCKET or (out[-1][0].dtype, out[-1][0].device) != (t.dtype, t.device):
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.numel()
    return out


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy the flat vector ``flat`` back into ``tensors`` in order (cast to their dtype/device)."""
    i = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[i : i + n].view_as(t))
            i += n


# ------------------------------------------------------------------------ the trainer's side
# A few functions the trainer calls at fixed points; each is the identity for one rank.


def init_from(cfg: Any) -> Dist:
    """:func:`init` with the run's ``dist`` settings (idempotent)."""
    d = cfg.get("dist") or {}
    return init(float(d.get("timeout_s", 300.0)), float(d.get("heartbeat_s", 1.0)), str(d.get("backend", "auto")))


def data_parallel(ctx: Any) -> bool:
    """Whether the ranks train one model together (``trainer.strategy=ddp`` or ``fsdp``)
    rather than one model each (``none``: the decentralized algorithm, whose sync plugin
    combines them)."""
    return ctx.dist.enabled and ctx.cfg.trainer.get("strategy", "ddp") in ("ddp", "fsdp")


def for_rank(cfg: Any, rank: int) -> Any:
    """Rank ``rank``'s config: without logger plugins unless it is rank 0, and with
    ``algo.agents[rank]`` (a nested mapping of overrides) merged in -- per-rank settings for
    heterogeneous agents (own data, reward weights, ...). An unknown key is an error naming it."""
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    if rank > 0 and cfg.get("logger"):  # only rank 0 logs: the other ranks load no logger plugin
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.logger = {}
    agents = cfg.algo.get("agents") or []
    if rank >= len(agents) or not agents[rank]:
        return cfg
    try:
        return OmegaConf.merge(cfg, agents[rank])
    except OmegaConfBaseException as e:
        raise ValueError(f"Config error in algo.agents[{rank}]: {str(e).splitlines()[0]}") from None


def prepare(ctx: Any) -> None:
    """Start every rank from rank 0's weights (policy and extra modules); under
    ``trainer.strategy=fsdp`` then shard the policy (:mod:`rlfuse.fsdp`)."""
    from rlfuse import fsdp

    strategy = ctx.cfg.trainer.get("strategy", "ddp")
    if strategy not in ("ddp", "fsdp", "none"):
        raise ValueError(f"trainer.strategy must be ddp, fsdp or none, got '{strategy}' (see docs/scaling.md)")
    if strategy == "fsdp":
        fsdp.check(ctx)  # also in one process, so a config that cannot scale out fails early
    ctx.dist.broadcast_parameters([ctx.policy, *ctx.modules.values()])
    if fsdp.sharded(ctx):
        fsdp.shard(ctx)


def batch_totals(ctx: Any, batch: Any) -> dict[str, float]:
    """``batch.totals`` of a mini-batch: masked response tokens and rows, summed over ranks
    under data parallelism, so a loss normalised by them equals one process's on the global
    batch (the gradients are then summed, not averaged: :func:`reduce_gradients`)."""
    counts = torch.tensor([float(batch.response_mask.sum()), float(len(batch))], dtype=torch.float64)
    if data_parallel(ctx):
        ctx.dist.all_reduce(counts, what="batch totals")
    return {"tokens": max(float(counts[0]), 1.0), "sequences": float(counts[1])}


def reduce_gradients(ctx: Any, params: Sequence[torch.Tensor]) -> None:
    """Sum the gradients over ranks under data parallelism; FSDP has already reduced (and
    sharded) the policy's in backward, so only the replicated ones are summed here."""
    from rlfuse import fsdp

    if data_parallel(ctx):
        ctx.dist.sum_gradients(fsdp.replicated(params) if fsdp.sharded(ctx) else params)


# How a per-rank step metric combines into the global one.
_SUMMED = ("loss/", "perf/tokens_per_s")  # shares of a global total (loss terms use global totals)


def reduce_step_metrics(ctx: Any, metrics: dict[str, float]) -> dict[str, float]:
    """One global value per key, on every rank: loss terms and throughput are summed over
    ranks under data parallelism (each rank holds its share), everything else is a mean
    weighted by the rank's rows. The private ``_rows`` entry is consumed."""
    rows = float(metrics.pop("_rows", 1.0))
    if not ctx.dist.enabled:
        return metrics
    sent = ctx.dist.bytes_sent
    metrics["perf/comm_bytes"] = float(sent - ctx.dist.bytes_logged)  # all this rank's traffic this step
    ctx.dist.bytes_logged = sent
    dp = data_parallel(ctx)
    sums, counts = {}, {}
    for k, v in metrics.items():
        if dp and k.startswith(_SUMMED):
            sums[k], counts[k] = v, 1.0 / ctx.dist.world_size
        else:
            sums[k], counts[k] = v * rows, rows
    return ctx.dist.reduce_metrics(sums, counts, what="step metric reduction")


def reduce_eval_metrics(ctx: Any, results: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Evaluation results, the mean over ranks; with one model per rank (``strategy=none``)
    also each rank's own as ``eval/rank<r>/<name>``. ``prefix`` replaces ``eval/``."""
    def rename(k: str) -> str:
        return prefix + k.split("/", 1)[1] if prefix and k.startswith("eval/") else k

    if not ctx.dist.enabled:
        return {rename(k): v for k, v in results.items()}
    out = ctx.dist.reduce_metrics({k: float(v) for k, v in results.items()}, dict.fromkeys(results, 1.0),
                                  what="evaluation reduction")
    out = {rename(k): v for k, v in out.items()}
    if not data_parallel(ctx) and not prefix:
        per_rank = ctx.dist.all_gather_object({k: float(v) for k, v in results.items()}, what="evaluation gather")
        for r, res in enumerate(per_rank):
            out.update({f"eval/rank{r}/{k.split('/', 1)[1]}": v for k, v in res.items() if k.startswith("eval/")})
    return out


class exit_on_failure:  # noqa: N801 - used as a context manager
    """Around a whole run under torchrun: an exception on this rank is written to the store
    (so the peers' errors name this rank and its reason), printed as one line, and the
    process exits with status 1 at once -- tearing down a process group whose peer is gone
    could block, and torchrun restarts or stops the job from the exit status."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> bool:
        d = current()
        if error is None or not d.enabled or not isinstance(error, Exception):
            return False
        import sys
        import traceback

        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        d.mark_failed(reason)
        if not isinstance(error, PeerLost):
            traceback.print_exception(kind, error, tb, file=sys.stderr)
        print(f"[rlfuse] rank {d.rank}/{d.world_size} stopped: {str(error).splitlines()[0] if str(error) else reason}",
              file=sys.stderr, flush=True)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)
