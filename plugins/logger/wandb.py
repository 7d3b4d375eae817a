"""``logger=wandb``: the run in Weights & Biases (``logger=[jsonl,console,wandb]``).

Every W&B call of rlfuse is in this file. On global rank 0 only, at ``setup``:

* ``wandb.init`` with the resolved config, plus ``choices`` (the option chosen in every group:
  ``algo``, ``rollout``, ``reward``, ...; also as tags such as ``advantage:grpo``) and
  ``plugins`` (every installed distribution that provides rlfuse plugins, with its version);
* name, group and tags from ``ctx.run_info``: in a sweep (``rlfuse -m ...``) the group is the
  sweep's name and each job is named and tagged by its own overrides; ``job_type`` is the
  preset (``sft``, ``reward_model``, ``ppo``: a pipeline's stages are separate runs);
* ``mode: auto`` never prompts and never hangs: without an API key (``WANDB_API_KEY``, a
  ``~/.netrc`` entry for the W&B host) or when the host is unreachable within
  ``network_timeout`` seconds, the run is written offline and one line says how to upload it
  (``wandb sync DIR``). ``WANDB_MODE=offline|disabled`` is honoured;
* the W&B run id is stored in ``<run_dir>/wandb_run_id``: a resumed run
  (``trainer.resume=true``) continues the same W&B run (``resume="allow"``); under
  ``wandb agent`` the run is the one the agent created (``WANDB_RUN_ID``).

Then ``log`` sends each step's metrics (the fixed ``namespace/name`` keys) against one x-axis,
``step`` (the training step; evaluations share the step they follow). Every ``samples_every``
steps a ``samples`` table -- step, prompt, response, each reward component (unweighted), the
total reward, the mean advantage over the response, the response length in tokens -- is logged
and appended to ``<run_dir>/samples.jsonl``. ``teardown`` copies the run's summary and
finishes the run; an exception in any hook (or the process exiting with the run still open)
finishes it with ``exit_code=1``, so a crashed job never merges into the next one.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import socket
import string
import sys
import threading
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rlfuse import hookimpl

MODES = ("auto", "online", "offline", "disabled")
RUN_ID_FILE = "wandb_run_id"
SAMPLES_FILE = "samples.jsonl"


@dataclass
class Config:
    project: str = "rlfuse"
    entity: str | None = None  # W&B team or user (default: your default entity)
    mode: str = "auto"  # auto | online | offline | disabled
    name: str | None = None  # default: the job's overrides, else the run dir's name
    group: str | None = None  # default: the sweep's name in a multirun
    tags: list[str] = field(default_factory=list)  # added to the automatic group:option tags
    samples_every: int = 10  # steps between samples tables (0 = never)
    samples_rows: int = 16  # rows per samples table
    network_timeout: float = 2.0  # auto mode: seconds allowed to reach the W&B host
    console: str = "off"  # W&B's capture of stdout/stderr: off | wrap | redirect | auto


# ----------------------------------------------------------------------- mode


def has_api_key() -> bool:
    """Whether W&B credentials exist locally (env or netrc), checked without the network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import netrc

    host = _host()
    paths = [os.environ["NETRC"]] if os.environ.get("NETRC") else [
        os.path.expanduser("~/.netrc"), os.path.expanduser("~/_netrc")]
    for p in paths:
        try:
            if os.path.exists(p) and netrc.netrc(p).authenticators(host):
                return True
        except (netrc.NetrcParseError, OSError):
            continue
    return False


def _host() -> str:
    return urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"


def reachable(host: str, timeout: float) -> bool:
    """A TCP connection to ``host:443`` within ``timeout`` seconds (DNS included: the check
    runs in a daemon thread, so a resolver that hangs cannot hang the run)."""
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def resolve_mode(mode: str, timeout: float) -> tuple[str, str]:
    """(the W&B mode to use, why) -- ``auto`` becomes online only with a key and the network."""
    if mode not in MODES:
        raise ValueError(f"logger.wandb.mode must be one of {', '.join(MODES)}; got '{mode}'")
    if mode != "auto":
        return mode, f"logger.wandb.mode={mode}"
    env = (os.environ.get("WANDB_MODE") or "").lower()
    if env in ("offline", "dryrun", "disabled"):
        return ("disabled" if env == "disabled" else "offline"), f"WANDB_MODE={env}"
    if not has_api_key():
        return "offline", "no W&B API key (WANDB_API_KEY or ~/.netrc)"
    if not reachable(_host(), timeout):
        return "offline", f"{_host()} not reachable"
    return "online", "API key found"


# ----------------------------------------------------------------------- run metadata


def choices(cfg: Any) -> dict[str, str]:
    """The option chosen in every group, read from the composed config."""
    out = {"algo": str(cfg.algo.name), "model": str(cfg.model.name_or_path or "tiny"),
           "kernels": str(cfg.kernels.backend)}
    for g in ("rollout", "advantage", "sync"):
        if cfg.get(g) and cfg[g].get("plugin"):
            out[g] = str(cfg[g].plugin)
    for g in ("reward", "loss", "logger", "eval", "plugins"):
        if cfg.get(g):
            out[g] = ",".join(str(k) for k in cfg[g])
    return out


def plugin_distributions() -> dict[str, str]:
    """Distribution -> version of every installed package that provides rlfuse plugins."""
    out: dict[str, str] = {}
    for group in ("rlfuse", "rlfuse.configs", "rlfuse.commands"):
        for ep in entry_points(group=group):
            if ep.dist is not None:
                out[ep.dist.name] = ep.dist.version
    return dict(sorted(out.items()))


def rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", "0"))


def _tag(text: str) -> str:
    return text if len(text) <= 64 else text[:61] + "..."  # W&B's tag limit is 64 characters


# ----------------------------------------------------------------------- the plugin


def _guarded(hook: str) -> Any:
    """A wrapper implementation of ``hook`` that finishes the W&B run (exit code 1) when any
    implementation of the hook raises, then lets the exception continue."""

    def guard(self: Plugin) -> Any:
        try:
            return (yield)
        except BaseException:
            self._finish(1)
            raise

    guard.__name__ = guard.__qualname__ = hook
    return hookimpl(wrapper=True)(guard)


class Plugin:
    Config = Config

    def __init__(self, cfg: Config, name: str = "wandb") -> None:
        if cfg.mode not in MODES:
            raise ValueError(f"logger.wandb.mode must be one of {', '.join(MODES)}; got '{cfg.mode}'")
        if cfg.samples_every < 0 or cfg.samples_rows < 1:
            raise ValueError("logger.wandb: samples_every must be >= 0 and samples_rows >= 1")
        self.cfg = cfg
        self.run: Any = None
        self.run_dir: Path | None = None
        self.offline_hint = ""

    # -- lifecycle ---------------------------------------------------------------------
    @hookimpl
    def setup(self, ctx: Any) -> None:
        if rank() != 0:
            return
        import wandb
        from omegaconf import OmegaConf

        mode, why = resolve_mode(self.cfg.mode, self.cfg.network_timeout)
        self.run_dir = Path(ctx.run_dir)
        id_file = self.run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if ctx.cfg.trainer.resume and id_file.exists() else None
        # under `wandb agent` the agent has created the run: WANDB_RUN_ID names it
        run_id = run_id or os.environ.get("WANDB_RUN_ID") or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        id_file.write_text(run_id + "\n")
        info = ctx.run_info
        picked = choices(ctx.cfg)
        config = OmegaConf.to_container(ctx.cfg, resolve=True)
        config["choices"] = picked
        config["plugins_installed"] = plugin_distributions()
        config["overrides"] = list(info.overrides)
        tags = [_tag(f"{g}:{o}") for g, o in picked.items() if g != "logger"]
        tags += [_tag(o) for o in info.overrides if not o.startswith(("hydra.", "run_dir="))]
        tags += list(self.cfg.tags)
        if wandb.run is not None:  # a run left open by an earlier job: never merge jobs
            wandb.run.finish(exit_code=1)
        self.run = wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            name=self.cfg.name or info.name or self.run_dir.name,
            group=self.cfg.group or info.sweep,
            job_type=picked["algo"],
            tags=sorted(set(tags)),
            config=config,
            dir=str(self.run_dir),
            id=run_id,
            resume="allow",
            mode=mode,
            settings=wandb.Settings(console=self.cfg.console, quiet=True),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        atexit.register(self._atexit)
        if mode == "offline":
            where = Path(self.run.dir).parent if self.run.dir else self.run_dir / "wandb"
            self.offline_hint = f"wandb sync {where}"
            print(f"[rlfuse] W&B offline ({why}); upload later with: {self.offline_hint}", file=sys.stderr, flush=True)

    @hookimpl
    def log(self, ctx: Any, step: int, metrics: dict[str, float]) -> None:
        if self.run is None:
            return
        row: dict[str, Any] = {**metrics, "step": step}
        batch = getattr(ctx, "batch", None)
        every = self.cfg.samples_every
        if batch is not None and every and step % every == 0 and not any(k.startswith("eval/") for k in metrics):
            columns, rows = self.samples(batch, step)
            with (self.run_dir / SAMPLES_FILE).open("a", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(dict(zip(columns, r, strict=True))) + "\n")
            import wandb

            row["samples"] = wandb.Table(columns=columns, data=rows)
        self.run.log(row)

    def samples(self, batch: Any, step: int) -> tuple[list[str], list[list[Any]]]:
        """The samples table of a batch: (columns, rows) for the first ``samples_rows`` rows."""
        n = min(len(batch), self.cfg.samples_rows)
        comps = sorted(k for k in batch.extras if k.startswith("reward/"))
        columns = ["step", "prompt", "response", *comps, "reward", "advantage", "length"]
        mask = batch.response_mask.float()
        lengths = mask.sum(-1)
        total = None
        if batch.rewards is not None:
            total = batch.rewards.float().cpu()
        if batch.token_rewards is not None:
            tok = (batch.token_rewards.float() * mask).sum(-1).cpu()
            total = tok if total is None else total + tok
        adv = None
        if batch.advantages is not None:
            adv = ((batch.advantages.float() * mask).sum(-1) / lengths.clamp_min(1)).cpu()
        rows = []
        for i in range(n):
            rows.append([
                step,
                batch.prompts[i] if i < len(batch.prompts) else "",
                batch.responses[i] if i < len(batch.responses) else "",
                *[float(batch.extras[c][i]) for c in comps],
                None if total is None else float(total[i]),
                None if adv is None else float(adv[i]),
                int(lengths[i]),
            ])
        return columns, rows

    @hookimpl
    def teardown(self, summary: dict[str, Any]) -> None:
        if self.run is None:
            return
        # summary.json's figures (eval/*_before/_after, steps, ...); W&B keeps each metric's last value itself
        self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})
        self._finish(0)
        if self.offline_hint:
            print(f"[rlfuse] W&B run saved offline; upload with: {self.offline_hint}", file=sys.stderr, flush=True)

    # -- failures: an exception in any hook finishes the run as failed -----------------
    def _finish(self, exit_code: int) -> None:
        run, self.run = self.run, None
        atexit.unregister(self._atexit)
        if run is not None:
            run.finish(exit_code=exit_code)

    def _atexit(self) -> None:
        self._finish(1)  # still open at exit: the run did not reach teardown

    rollout = _guarded("rollout")
    reward = _guarded("reward")
    advantage = _guarded("advantage")
    loss = _guarded("loss")
    sync = _guarded("sync")
    evaluate = _guarded("evaluate")
    save_state = _guarded("save_state")


# ----------------------------------------------------------------------- reading offline runs


def read_records(path: str | Path) -> Any:
    """Yield the protobuf records of a ``run-<id>.wandb`` file (W&B's transaction log: a
    7-byte header, then LevelDB-log framing -- 32 KiB blocks of ``crc32 | length | type |
    data`` chunks, a record split over blocks as FIRST, MIDDLE..., LAST chunks)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    block, pos, parts = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and n == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):  # FULL or LAST: a complete record
            rec = pb.Record()
            rec.ParseFromString(parts)
            yield rec


def read_offline_run(run_file: str | Path) -> dict[str, Any]:
    """What an offline run holds, from its ``.wandb`` file: ``id``, ``name``, ``group``,
    ``tags``, ``config``, ``history`` (a list of logged rows), ``summary`` and ``exit_code``
    (None when the run never finished)."""
    out: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "exit_code": None}

    def key(item: Any) -> str:
        return item.key or "/".join(item.nested_key)

    for rec in read_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(id=r.run_id, name=r.display_name, group=r.run_group, tags=list(r.tags), job_type=r.job_type)
            out["config"].update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({key(u): json.loads(u.value_json) for u in rec.summary.update})
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out
