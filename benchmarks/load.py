"""Load: many concurrent SDK clients against one backend, each creating a sandbox, running commands
and file calls in it for a bounded time, then killing it (issue 18, item 3).

    python benchmarks/load.py [--config configs/example_config.toml] [--template default-sandbox]
                              [--clients 200] [--duration-s 60] [--sdk trenvx|e2b] [--quick]

It starts its own backend (``trenvx serve``, no pools unless ``--hot``: every create is a restore
into a new VMM process) on a data_root of its own whose ``templates``, ``kernels`` and ``cache`` are
links to the config's data_root, so it needs the template built there and leaves nothing behind.

First one client alone (the unloaded reference: one create, ``--reference-rounds`` rounds of calls).
Then ``--clients`` clients at once, each with its own SDK object (its own HTTP connections):

- **create**: ``AsyncSandbox.create``, all at once (or spread evenly over ``--ramp-s``); a refusal
  (429: a sandbox limit; 503: host memory) is retried after the server's ``Retry-After`` (5 s,
  10 s) until ``--admit-s`` has passed, and counted as a refusal;
- **rounds**, until every client has its sandbox and ``--duration-s`` more seconds have passed:
  ``commands.run("echo ...")`` (its output checked), every ``--python-every``-th round
  ``python3 -c`` (checked), ``files.write`` of a small file, ``files.read`` (compared), and
  ``files.list`` of its directory (the file listed), then ``--think-s`` of idling;
- **kill**.

A call that raises or answers wrongly is an error, classified by phase and kind (the exception's
class and HTTP status, or ``wrong_answer``). A client whose sandbox is gone (a call answered that it
does not exist: the server ended it) stops there and counts it lost, its failed call an error.
Reported: the error rate over all calls, refusals,
latency percentiles (p50/p90/p99/max) of create, command, python, file calls and kill, against the
unloaded reference, throughput (calls per second in the steady phase), a timeline (every 2 s: the
sandboxes alive, the server's RSS, threads and fds, the host's MemAvailable and load) and what
degraded first: the moment each signal first crossed its bar (a call kind's rolling p50 at 3x its
unloaded p50, the first refusal, the first error, MemAvailable under 10% of RAM), in order.

Table on stdout, JSON in benchmarks/results/ (``load-<time>.json``). Everything started is killed
and its files removed; the backend's own data_root is kept (and named) only when something was
left in it. Numbers from a shared 2-core TCG host are noisy: the JSON records the host's load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import tomli_w

from _common import config_as_toml_data, pct, run_cancellable, solo_backend_config, write_results  # benchmarks/ is on sys.path when run as a script
from start_latency import Server, free_port

from trenvx.config import PoolConfig, load_config
from trenvx.layout import DataRoot
from trenvx.network.slot import CLAIMS_DIR, owner_id
from trenvx.template.store import TemplateStore

MiB = 1 << 20
DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "example_config.toml")
SDKS = {"trenvx": "sandbox_sdk.e2b", "e2b": "e2b"}
"""The SDK module whose ``AsyncSandbox`` the clients use: trenvx's own, or E2B's unmodified one."""
SHARED = ("templates", "kernels")
"""The parts of the config's data_root a benchmark's own data_root links to (read, never written).
Not ``cache``: it holds the VMM's preload library, which a jailed VMM must find inside its data_root
(its mount namespace shows only its sandbox's files and what they use, not a link out)."""
REFUSALS = {429: "limit (429)", 503: "memory (503)"}
RETRY_AFTER_S = {"limit (429)": 5.0, "memory (503)": 10.0}
"""The server's Retry-After of each refusal (server/errors.py), which the SDK errors do not carry."""
KINDS = ("create", "command", "python", "write", "read", "list", "kill")
FILE_KINDS = ("write", "read", "list")


# -- the backend ---------------------------------------------------------------------------------


@dataclass
class Backend:
    """A benchmark's own ``trenvx serve`` on a data_root of its own (``work/data``)."""

    server: Server
    work: Path
    data_root: Path
    shared_root: Path
    template: str
    build: Any
    base: Any

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def owner(self) -> str:
        """The owner id of this data_root's network slots and nftables tables."""
        return owner_id(self.data_root)

    def sandbox_dirs(self) -> list[str]:
        d = self.data_root / "sandboxes"
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def cleanup(self) -> bool:
        """Remove the work directory (the links, not what they point to) when no sandbox directory
        is left in it; False (and kept, for a look) otherwise."""
        if self.sandbox_dirs():
            return False
        shutil.rmtree(self.work, ignore_errors=True)
        return True


def own_backend(config_path: str, template: str, prefix: str, *, max_sandboxes: int, hot: int = 0,
                orchestrator: dict[str, Any] | None = None) -> Backend:
    """The config's template served by a new backend (not yet started) on a data_root of its own.

    ``max_sandboxes``: at least this many sandboxes admitted (per host and per template); ``hot``:
    a hot pool of that many (0: none); ``orchestrator``: ``[orchestrator]`` settings to change. Raises ``ValueError`` for a template the config lacks and
    ``TemplateNotFound`` (which says how to build it) for one not built in the config's data_root."""
    base = load_config(config_path)
    if template not in base.template:
        raise ValueError(f"{config_path} has no template {template!r}; name one of {sorted(base.template)} with --template")
    shared = Path(base.data_root)
    build = TemplateStore(DataRoot(shared)).current(template)
    # /tmp and a short name: the sandboxes' UNIX socket paths must stay under 108 bytes
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))
    work.chmod(0o755)  # as /var/lib is: jailed VMMs (other uids) must traverse it to their sandbox's files
    root = work / "data"
    root.mkdir()
    for name in SHARED:
        (shared / name).mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(shared / name)
    port = free_port()
    pool = None
    if hot:
        pool = PoolConfig(templates=[template], warm_min=1, warm_max=2, hot_min=hot, hot_max=hot,
                          hot_warmup_cmd=base.pool.hot_warmup_cmd)
    cfg = solo_backend_config(base, template, port, pool)
    orch = cfg.orchestrator.model_copy(update={
        "max_sandboxes": max(cfg.orchestrator.max_sandboxes, max_sandboxes),
        "max_sandboxes_per_template": max(cfg.orchestrator.max_sandboxes_per_template, max_sandboxes),
        **(orchestrator or {}),
    })
    cfg = cfg.model_copy(update={"orchestrator": orch, "data_root": root})
    (work / "config.toml").write_text(tomli_w.dumps(config_as_toml_data(cfg)))
    # the server reads its data_root from its config: an inherited TRENVX_DATA_ROOT would override it
    os.environ.pop("TRENVX_DATA_ROOT", None)
    server = Server(work / "config.toml", port, work / "server.log")
    return Backend(server, work, root, shared, template, build, base)


def host_meta(backend: Backend) -> dict[str, Any]:
    vm = psutil.virtual_memory()
    return {"template": backend.template, "build_id": backend.build.build_id,
            "mem_mb": backend.build.manifest.machine.mem_mb, "accelerator": backend.build.manifest.machine.accelerator,
            "host": platform.node(), "cpus": os.cpu_count(), "ram_gib": round(vm.total / 2**30, 1),
            "kernel": platform.release(), "loadavg_at_start": os.getloadavg(),
            "qemu_processes_at_start": vmm_count(None),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit(),
            "trenvx_src": str(Path(importlib.import_module("trenvx").__file__ or "").parent)}


def git_commit() -> str:
    import subprocess

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                           cwd=Path(__file__).resolve().parent)
        return r.stdout.strip()
    return ""


# -- what the server holds -------------------------------------------------------------------------


def vmm_count(data_root: Path | None) -> int:
    """VMM processes (QEMU, Firecracker, Cloud Hypervisor) whose command line names ``data_root``
    (every file a sandbox's VMM opens is under it); all of this host's when None."""
    n = 0
    for p in psutil.process_iter(["name", "cmdline"]):
        name = p.info["name"] or ""
        if not any(v in name for v in ("qemu", "firecracker", "cloud-hyperv")):
            continue
        if data_root is None or str(data_root) in " ".join(p.info["cmdline"] or []):
            n += 1
    return n


def slots_of(owner: str) -> int:
    """Network slots claimed host-wide under /run/trenvx/net/slots by ``owner``'s processes."""
    import json

    n = 0
    with contextlib.suppress(OSError):
        for claim in CLAIMS_DIR.iterdir():
            with contextlib.suppress(OSError, ValueError):
                if json.loads(claim.read_text()).get("owner") == owner:
                    n += 1
    return n


def server_process(server: Server) -> psutil.Process | None:
    if server.proc is None:
        return None
    with contextlib.suppress(psutil.Error):
        return psutil.Process(server.proc.pid)
    return None


def server_sample(backend: Backend) -> dict[str, float]:
    """One look at the server process (RSS, threads, open fds) and the host."""
    out: dict[str, float] = {"mem_available_mib": psutil.virtual_memory().available / MiB,
                             "loadavg_1m": os.getloadavg()[0]}
    p = server_process(backend.server)
    if p is not None:
        with contextlib.suppress(psutil.Error, OSError):
            with p.oneshot():
                out["server_rss_mib"] = p.memory_info().rss / MiB
                out["server_threads"] = p.num_threads()
                out["server_fds"] = p.num_fds()
    return out


# -- the clients -----------------------------------------------------------------------------------


@dataclass
class Call:
    """One SDK call: its kind, when it started (seconds since the load began), how long it took,
    and the error class when it failed."""

    kind: str
    t: float
    seconds: float
    error: str = ""
    steady: bool = False


@dataclass
class Run:
    """What the clients recorded."""

    t0: float = field(default_factory=time.monotonic)
    calls: list[Call] = field(default_factory=list)
    refusals: Counter[str] = field(default_factory=Counter)
    refusal_times: list[float] = field(default_factory=list)
    error_samples: dict[str, str] = field(default_factory=dict)
    lost: list[float] = field(default_factory=list)
    alive: int = 0
    creating: int = 0
    created: int = 0
    not_admitted: int = 0
    all_created_at: float | None = None
    steady_end: float | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    def steady(self, t: float) -> bool:
        return self.all_created_at is not None and t >= self.all_created_at and (self.steady_end is None or t <= self.steady_end)


class WrongAnswer(Exception):
    """A call succeeded but answered something else than it should have."""


class SandboxLost(Exception):
    """The client's sandbox is gone (a call answered that it does not exist): its rounds stop."""


def is_lost(exc: BaseException) -> bool:
    """Does ``exc`` say the sandbox does not exist (any more)?"""
    return type(exc).__name__ in ("SandboxNotFoundError", "SandboxNotFoundException")


def error_class(exc: BaseException) -> str:
    """What kind of error, for counting: the exception's class and its HTTP status if it has one."""
    status = getattr(exc, "status_code", None)
    if isinstance(exc, WrongAnswer):
        return "wrong_answer"
    return f"{type(exc).__name__}({status})" if status else type(exc).__name__


def refusal_of(exc: BaseException) -> str:
    """``limit (429)`` / ``memory (503)`` when ``exc`` is an admission refusal, else ``""``."""
    status = getattr(exc, "status_code", None)
    if status in REFUSALS:
        return REFUSALS[status]
    name = type(exc).__name__
    if name in ("RateLimitError", "RateLimitException"):
        return REFUSALS[429]
    if name in ("InsufficientCapacityError",):
        return REFUSALS[503]
    return ""


@dataclass
class Workload:
    """What each client does (see the module docstring)."""

    sdk: str = "trenvx"
    template: str = "default-sandbox"
    url: str = ""
    think_s: float = 0.5
    python_every: int = 3
    command_timeout_s: float = 300.0
    request_timeout_s: float = 300.0
    admit_s: float = 600.0

    def sdk_class(self) -> Any:
        return importlib.import_module(SDKS[self.sdk]).AsyncSandbox

    def connection(self) -> dict[str, Any]:
        if self.sdk == "trenvx":
            return {"api_url": self.url, "request_timeout": self.request_timeout_s}
        os.environ.update({"E2B_API_URL": self.url, "E2B_SANDBOX_URL": self.url, "E2B_API_KEY": "benchmark"})
        os.environ.pop("E2B_DEBUG", None)
        return {"request_timeout": self.request_timeout_s}


async def timed(run: Run, kind: str, coro: Any) -> Any:
    """Await ``coro``, recording the call; re-raise its error after recording it."""
    t = run.now()
    t_start = time.perf_counter()
    try:
        result = await coro
    except BaseException as exc:
        if isinstance(exc, asyncio.CancelledError):
            raise
        cls = error_class(exc)
        run.calls.append(Call(kind, t, time.perf_counter() - t_start, cls, run.steady(t)))
        run.error_samples.setdefault(f"{kind}: {cls}", str(exc)[:500])
        raise
    run.calls.append(Call(kind, t, time.perf_counter() - t_start, "", run.steady(t)))
    return result


async def create_admitted(w: Workload, run: Run, timeout_s: int) -> Any:
    """A new sandbox; refusals retried (after Retry-After, else 1 s) until ``w.admit_s`` passed."""
    cls = w.sdk_class()
    deadline = time.monotonic() + w.admit_s
    while True:
        t = run.now()
        t_start = time.perf_counter()
        run.creating += 1
        try:
            sbx = await cls.create(w.template, timeout=timeout_s, **w.connection())
        except Exception as exc:
            refusal = refusal_of(exc)
            if not refusal or time.monotonic() > deadline:
                run.calls.append(Call("create", t, time.perf_counter() - t_start, error_class(exc), run.steady(t)))
                run.error_samples.setdefault(f"create: {error_class(exc)}", str(exc)[:500])
                if refusal:
                    run.not_admitted += 1
                raise
            run.refusals[refusal] += 1
            run.refusal_times.append(t)
            run.error_samples.setdefault(f"refused: {refusal}", str(exc)[:500])
            retry_after = float(getattr(exc, "retry_after", 0) or RETRY_AFTER_S[refusal])
        else:
            run.calls.append(Call("create", t, time.perf_counter() - t_start, "", run.steady(t)))
            return sbx
        finally:
            run.creating -= 1
        await asyncio.sleep(retry_after)


async def one_round(w: Workload, run: Run, sbx: Any, me: str, i: int) -> None:
    """One round of calls on ``sbx``; each call's failure is recorded and the round goes on, unless
    the sandbox is gone: then :class:`SandboxLost` (its calls would all fail the same way)."""
    token = f"{me}-{i}"
    path = f"/tmp/load/{me}-{i % 4}.txt"
    body = f"{me} round {i}\n" * 8
    calls = [("command", lambda: _checked_run(sbx, f"echo {token}", token, w))]
    if w.python_every and i % w.python_every == 0:
        calls.append(("python", lambda: _checked_run(sbx, f"python3 -c 'print(6 * {i + 7})'", str(6 * (i + 7)), w)))
    calls += [("write", lambda: sbx.files.write(path, body, request_timeout=w.request_timeout_s)),
              ("read", lambda: _checked_read(sbx, path, body, w)),
              ("list", lambda: _checked_list(sbx, "/tmp/load", path.rsplit("/", 1)[1], w))]
    for kind, call in calls:
        try:
            await timed(run, kind, call())
        except Exception as exc:
            if is_lost(exc):
                run.lost.append(run.now())
                raise SandboxLost(str(exc)) from exc


async def _checked_run(sbx: Any, cmd: str, want: str, w: Workload) -> Any:
    r = await sbx.commands.run(cmd, timeout=w.command_timeout_s, request_timeout=w.request_timeout_s)
    if r.exit_code != 0 or r.stdout.strip() != want:
        raise WrongAnswer(f"{cmd!r} answered exit {r.exit_code}, stdout {r.stdout[:200]!r}, stderr {r.stderr[:200]!r}")
    return r


async def _checked_read(sbx: Any, path: str, want: str, w: Workload) -> None:
    got = await sbx.files.read(path, request_timeout=w.request_timeout_s)
    if got != want:
        raise WrongAnswer(f"read {path} gave {len(got)} chars, not the {len(want)} written")


async def _checked_list(sbx: Any, path: str, name: str, w: Workload) -> None:
    entries = await sbx.files.list(path, request_timeout=w.request_timeout_s)
    if name not in [e.name for e in entries]:
        raise WrongAnswer(f"{name} not listed in {path}: {[e.name for e in entries][:10]}")


async def client(w: Workload, run: Run, all_created: asyncio.Event, duration_s: float, n: int,
                 start_after_s: float = 0.0) -> None:
    """One client: (after ``start_after_s``) create, rounds until the steady phase ends, kill."""
    me = uuid.uuid4().hex[:8]
    await asyncio.sleep(start_after_s)
    try:
        # outlives the ramp, the steady phase and a last call that takes its whole timeout (<= 3600 s)
        sbx = await create_admitted(w, run, timeout_s=min(3600, int(w.admit_s + duration_s + 2 * w.request_timeout_s + 600)))
    except Exception:
        sbx = None
    run.created += 1  # created or given up: the ramp is over for this client
    if sbx is not None:
        run.alive += 1
    if run.created == n:
        run.all_created_at = run.now()
        run.steady_end = run.all_created_at + duration_s
        all_created.set()
    if sbx is None:
        return
    try:
        i = 0
        while not (all_created.is_set() and run.now() >= (run.steady_end or 0)):
            await one_round(w, run, sbx, me, i)
            i += 1
            await asyncio.sleep(w.think_s)
    except SandboxLost:
        pass
    finally:
        with contextlib.suppress(Exception):
            await timed(run, "kill", sbx.kill(request_timeout=w.request_timeout_s)
                        if w.sdk == "trenvx" else sbx.kill())
        run.alive -= 1


async def sample_loop(backend: Backend, run: Run, out: list[dict[str, float]], interval_s: float) -> None:
    while True:
        s = await asyncio.to_thread(server_sample, backend)
        s.update({"t": round(run.now(), 1), "alive": run.alive, "creating": run.creating,
                  "vmm_processes": await asyncio.to_thread(vmm_count, backend.data_root)})
        out.append(s)
        await asyncio.sleep(interval_s)


# -- what the numbers say ------------------------------------------------------------------------


def lat(xs: list[float]) -> dict[str, float]:
    """n, p50/p90/p99/max of ``xs`` seconds, in ms."""
    ms = [x * 1000 for x in xs]
    return {"n": len(ms), "p50": pct(ms, 50), "p90": pct(ms, 90), "p99": pct(ms, 99), "max": max(ms) if ms else float("nan")}


def latency_table(calls: list[Call]) -> dict[str, dict[str, float]]:
    """Percentiles of each call kind's successful calls, plus ``command`` (echo) and ``file`` (the
    three file calls together)."""
    ok = [c for c in calls if not c.error]
    out = {k: lat([c.seconds for c in ok if c.kind == k]) for k in KINDS}
    out["file"] = lat([c.seconds for c in ok if c.kind in FILE_KINDS])
    return {k: v for k, v in out.items() if v["n"]}


def first_degraded(calls: list[Call], reference: dict[str, dict[str, float]], run: Run,
                   samples: list[dict[str, float]], ram_mib: float, factor: float = 3.0,
                   window: int = 20) -> list[dict[str, Any]]:
    """When each signal first crossed its bar, earliest first: a call kind's rolling p50 (over
    ``window`` calls, by start time) at ``factor`` x its unloaded p50; the first admission refusal;
    the first error; MemAvailable under 10% of RAM."""
    events: list[dict[str, Any]] = []
    for kind in ("create", "command", "python", "file"):
        ref = reference.get(kind, {}).get("p50")
        if not ref or ref != ref:
            continue
        series = sorted((c for c in calls if not c.error and (c.kind == kind or (kind == "file" and c.kind in FILE_KINDS))),
                        key=lambda c: c.t)
        for i in range(window, len(series) + 1):
            p50 = pct([c.seconds * 1000 for c in series[i - window:i]], 50)
            if p50 >= factor * ref:
                events.append({"signal": f"{kind} latency", "t_s": round(series[i - 1].t, 1),
                               "detail": f"rolling p50 {p50:.0f} ms >= {factor:g}x unloaded {ref:.0f} ms"})
                break
    if run.lost:
        events.append({"signal": "sandbox lost", "t_s": round(min(run.lost), 1),
                       "detail": f"{len(run.lost)} sandboxes gone under their clients (a call answered not found)"})
    if run.refusal_times:
        events.append({"signal": "admission refusal", "t_s": round(min(run.refusal_times), 1),
                       "detail": ", ".join(f"{v} x {k}" for k, v in run.refusals.items())})
    errs = [c for c in calls if c.error]
    if errs:
        first = min(errs, key=lambda c: c.t)
        at = min(samples, key=lambda s: abs(s["t"] - first.t - first.seconds)) if samples else {}
        events.append({"signal": "error", "t_s": round(first.t, 1),
                       "detail": f"{first.kind}: {first.error} after {first.seconds:.0f} s "
                                 f"({at.get('alive', '?')} sandboxes alive, {at.get('creating', '?')} creates in flight then)"})
    low = [s for s in samples if s["mem_available_mib"] < 0.10 * ram_mib]
    if low:
        events.append({"signal": "MemAvailable < 10%", "t_s": low[0]["t"], "detail": f"{low[0]['mem_available_mib']:.0f} MiB"})
    return sorted(events, key=lambda e: e["t_s"])


def error_summary(calls: list[Call]) -> dict[str, Any]:
    errs = [c for c in calls if c.error]
    return {"calls": len(calls), "errors": len(errs), "error_rate": len(errs) / len(calls) if calls else float("nan"),
            "by_class": dict(Counter(f"{c.kind}: {c.error}" for c in errs).most_common())}


# -- the run ---------------------------------------------------------------------------------------


async def reference(w: Workload, rounds: int) -> dict[str, dict[str, float]]:
    """One client alone: the unloaded latencies."""
    run = Run()
    run.all_created_at = 0.0
    sbx = await create_admitted(w, run, timeout_s=600)
    try:
        for i in range(rounds):
            await one_round(w, run, sbx, "ref", i)
    finally:
        await timed(run, "kill", sbx.kill())
    errs = [c for c in run.calls if c.error]
    if errs:
        raise RuntimeError(f"the unloaded reference failed: {run.error_samples}")
    return latency_table(run.calls)


async def load(backend: Backend, w: Workload, clients: int, duration_s: float, sample_s: float,
               ramp_s: float = 0.0) -> dict[str, Any]:
    run = Run()
    samples: list[dict[str, float]] = []
    sampler = asyncio.create_task(sample_loop(backend, run, samples, sample_s))
    all_created = asyncio.Event()
    try:
        await asyncio.gather(*(client(w, run, all_created, duration_s, clients, i * ramp_s / clients)
                               for i in range(clients)))
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    samples.append({**server_sample(backend), "t": round(run.now(), 1), "alive": run.alive,
                    "vmm_processes": vmm_count(backend.data_root)})
    steady = [c for c in run.calls if c.steady and c.kind not in ("create", "kill")]
    steady_s = max(1e-9, (run.steady_end or run.now()) - (run.all_created_at or 0.0))
    admitted = sum(1 for c in run.calls if c.kind == "create" and not c.error)
    inside = [c for c in run.calls if c.kind not in ("create", "kill") and not c.error]
    return {"run": run, "samples": samples, "admitted": admitted, "steady_seconds": steady_s,
            "ramp_seconds": run.all_created_at, "total_seconds": run.now(),
            "throughput": {"calls_per_s": len(steady) / steady_s,
                           "commands_per_s": sum(1 for c in steady if c.kind in ("command", "python")) / steady_s,
                           "file_calls_per_s": sum(1 for c in steady if c.kind in FILE_KINDS) / steady_s,
                           "creates_per_s": admitted / max(1e-9, run.all_created_at or run.now()),
                           "overall_calls_per_s": len(inside) / max(1e-9, run.now()),
                           "overall_calls": len(inside)}}


def print_report(meta: dict[str, Any], data: dict[str, Any]) -> None:
    print(f"\nload: {meta['clients']} clients ({meta['sdk']} SDK, each its own client; creates "
          f"{'all at once' if not meta['ramp_s'] else 'spread over %g s' % meta['ramp_s']}), template {meta['template']} "
          f"({meta['mem_mb']} MiB guest, {meta['accelerator'].upper()}), {meta['cpus']} cores, {meta['ram_gib']} GiB; "
          f"steady phase {data['steady_seconds']:.0f} s after a {data['ramp_seconds'] or 0:.0f} s ramp; "
          f"host load at start {meta['loadavg_at_start'][0]:.1f}, {meta['qemu_processes_at_start']} other VMMs")
    e = data["errors"]
    print(f"admitted {data['admitted']}/{meta['clients']}; calls {e['calls']}, errors {e['errors']} "
          f"(rate {100 * e['error_rate']:.3f}%); refusals retried: {dict(data['refusals']) or 'none'}; "
          f"sandboxes lost under their clients {data['sandboxes_lost']}; peak sandboxes alive {data['peak_alive']}")
    for k, v in e["by_class"].items():
        print(f"  error {k}: {v}  e.g. {data['error_samples'].get(k, '')[:160]}")
    head = f"{'call':10} {'n':>6} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}   {'unloaded p50':>12}   (ms)"
    print(head)
    print("-" * len(head))
    for kind, v in data["latency_ms"].items():
        ref = data["reference_ms"].get(kind, {}).get("p50", float("nan"))
        print(f"{kind:10} {v['n']:>6} {v['p50']:>8.0f} {v['p90']:>8.0f} {v['p99']:>8.0f} {v['max']:>8.0f}   {ref:>12.0f}")
    t = data["throughput"]
    print(f"throughput (steady): {t['calls_per_s']:.1f} calls/s ({t['commands_per_s']:.1f} commands/s, "
          f"{t['file_calls_per_s']:.1f} file calls/s); creates {t['creates_per_s']:.2f}/s during the ramp; "
          f"overall {t['overall_calls_per_s']:.1f} calls/s ({t['overall_calls']} calls in {data['total_seconds']:.0f} s)")
    s = data["server"]
    print(f"server: RSS {s['rss_mib_start']:.0f} -> max {s['rss_mib_max']:.0f} MiB, threads max {s['threads_max']}, "
          f"fds max {s['fds_max']}; host MemAvailable min {s['mem_available_mib_min']:.0f} MiB, load max {s['loadavg_max']:.1f}")
    print("what degraded first:" if data["degraded"] else "nothing degraded past its bar")
    for ev in data["degraded"]:
        print(f"  t={ev['t_s']:>6.1f}s  {ev['signal']}: {ev['detail']}")


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.environ.get("TRENVX_CONFIG", DEFAULT_CONFIG))
    ap.add_argument("--template", default="default-sandbox")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--duration-s", type=float, default=60.0, help="the steady phase, after every client has its sandbox")
    ap.add_argument("--think-s", type=float, default=0.5, help="idle time between a client's rounds")
    ap.add_argument("--python-every", type=int, default=3, help="python3 -c in every K-th round (0: never)")
    ap.add_argument("--admit-s", type=float, default=600.0, help="how long refused creates are retried")
    ap.add_argument("--ramp-s", type=float, default=0.0,
                    help="spread the clients' creates evenly over this many seconds (default 0: all at once)")
    ap.add_argument("--request-timeout-s", type=float, default=900.0,
                    help="the SDK's timeout of every call, and of every command (default 900 s)")
    ap.add_argument("--reference-rounds", type=int, default=10)
    ap.add_argument("--sdk", choices=sorted(SDKS), default="trenvx")
    ap.add_argument("--hot", type=int, default=0, help="a hot pool of this many (default: none, every create cold)")
    ap.add_argument("--sample-s", type=float, default=2.0)
    ap.add_argument("--no-health-checks", action="store_true",
                    help="the backend without its agent health checks (orchestrator.health_check_interval_s = 0)")
    ap.add_argument("--quick", action="store_true", help="CI: 10 clients, a 10 s steady phase, 2 reference rounds")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.duration_s, args.reference_rounds = 10, 10.0, 2
    if args.clients < 1 or args.duration_s < 0:
        ap.error("--clients must be at least 1 and --duration-s not negative")
    try:
        backend = own_backend(args.config, args.template, "load", max_sandboxes=args.clients + 2, hot=args.hot,
                              orchestrator={"health_check_interval_s": 0} if args.no_health_checks else None)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    meta = {**host_meta(backend), "clients": args.clients, "sdk": args.sdk, "duration_s": args.duration_s,
            "think_s": args.think_s, "python_every": args.python_every, "hot_pool": args.hot,
            "ramp_s": args.ramp_s, "request_timeout_s": args.request_timeout_s,
            "health_checks": not args.no_health_checks,
            "data_root": str(backend.data_root)}
    w = Workload(sdk=args.sdk, template=args.template, url=backend.url, think_s=args.think_s,
                 python_every=args.python_every, admit_s=args.admit_s,
                 command_timeout_s=args.request_timeout_s, request_timeout_s=args.request_timeout_s)
    try:
        await backend.server.start()
        if args.hot:
            await backend.server.wait_pool(args.template, 300)
        print(f"== unloaded reference ({args.reference_rounds} rounds, one client)", flush=True)
        ref = await reference(w, args.reference_rounds)
        print(f"== {args.clients} clients", flush=True)
        result = await load(backend, w, args.clients, args.duration_s, args.sample_s, args.ramp_s)
        left: Any = "the server did not answer"
        with contextlib.suppress(httpx.HTTPError, ValueError):
            async with httpx.AsyncClient(base_url=backend.url, timeout=30) as c:
                left = (await c.get("/sandboxes")).json()
        server_died = backend.server.proc.poll() if backend.server.proc is not None else None
        if server_died is not None:  # the figures up to its death are still the result
            print(f"the server exited with {server_died} during the load; see {backend.server.log_path}", file=sys.stderr)
    except BaseException:
        await backend.server.stop()
        if not backend.cleanup():
            print(f"sandbox directories were left in {backend.data_root}", file=sys.stderr)
        raise
    await backend.server.stop()
    run: Run = result.pop("run")
    samples = result.pop("samples")
    ram_mib = psutil.virtual_memory().total / MiB

    def series(key: str) -> list[float]:
        return [s[key] for s in samples if key in s]

    data = {
        **result,
        "errors": error_summary(run.calls), "error_samples": run.error_samples,
        "refusals": dict(run.refusals), "not_admitted": run.not_admitted, "sandboxes_lost": len(run.lost),
        "latency_ms": latency_table(run.calls),
        "latency_ms_steady": latency_table([c for c in run.calls if c.steady]),
        "reference_ms": ref,
        "peak_alive": max([s["alive"] for s in samples] or [0]),
        "server": {"rss_mib_start": (series("server_rss_mib") or [float("nan")])[0],
                   "rss_mib_max": max(series("server_rss_mib") or [float("nan")]),
                   "threads_max": max(series("server_threads") or [0]), "fds_max": max(series("server_fds") or [0]),
                   "mem_available_mib_min": min(series("mem_available_mib") or [float("nan")]),
                   "loadavg_max": max(series("loadavg_1m") or [0.0])},
        "degraded": first_degraded(run.calls, ref, run, samples, ram_mib),
        "sandboxes_listed_after": len(left) if isinstance(left, list) else left,
        "server_exit_during_load": server_died,
        "left_behind": {"sandbox_dirs": backend.sandbox_dirs(), "vmm_processes": vmm_count(backend.data_root),
                        "network_slots": slots_of(backend.owner)},
        "timeline": samples,
    }
    print_report(meta, data)
    kept = not backend.cleanup()
    if kept:
        print(f"sandbox directories were left in {backend.data_root}: {data['left_behind']['sandbox_dirs'][:5]}")
    path = write_results("load", {"benchmark": "load", "meta": meta, **data}, args.json)
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cancellable(main))
