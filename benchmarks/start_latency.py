"""Start latency through the public SDK: trenvx's pools against cold restores, an E2B-style restore
and a cold boot, side by side in one run.

    python benchmarks/start_latency.py [--config configs/example_config.toml] [--template NAME]
                                       [-n 200] [--bursts 10,50,100] [--quick]

For each mode it starts a real backend (``trenvx serve``) with that mode's config on a free port,
waits until its pool is full, then through ``sandbox_sdk.Sandbox``:

- **sequential**: ``-n`` creates one after another (``--gap-s`` apart, so a pool can refill as it
  would between an agent's requests); create -> ready (``Sandbox.create`` returned: the server
  answers once the sandbox's agent answered) and create -> ``Hello World`` printed;
- **bursts**: for each size, that many creates at once (after the pool refilled): time until all
  are ready, p50/p99 per sandbox, failures;
- the stage breakdown (the server's ``startTimes`` of each sandbox) and which path served it.

Modes: ``hot`` (the pool tier of restored, warmed-up VMs), ``warm`` (VMM processes waiting for the
snapshot), ``cold`` (a new VMM process per create), ``e2b`` (E2B-style: guest RAM copied into
private memory from a full snapshot, new process per create), ``boot`` (no snapshot; fewer creates,
no bursts: each takes seconds). Table on stdout, JSON in benchmarks/results/. The backend of each
mode is stopped (killing its sandboxes and pools) before the next one starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import tomli_w

from _common import config_as_toml_data, pct, run_cancellable, solo_backend_config  # benchmarks/ is on sys.path when run as a script

from sandbox_sdk.sandbox import Sandbox
from trenvx.config import Config, NetworkMode, PoolConfig, StartMode, load_config
from trenvx.layout import DataRoot
from trenvx.template.store import TemplateStore
from trenvx.vmm.process import memory_of

HELLO = "python3 -c \"print('Hello World')\""
MODES = ("hot", "hot-usernet", "warm", "cold", "e2b", "boot")
REFILL_MODES = {"hot-normal": "normal", "hot-nice": "nice", "hot-idle": "idle"}
"""The hot pool with its refills at a given CPU priority (``pool.refill_priority``; ``hot`` runs the
config's, ``normal`` by default): ``hot-nice`` is the policy before issue 18 (nice 10), ``hot-idle``
the lowest (cgroup cpu.idle). Not in the default run: ``--modes hot-normal,hot-nice,hot-idle``
compares them side by side (benchmarks/results/start-latency-refill-priority.json)."""
USERNET_SUFFIX = "-usernet"
"""hot-usernet: the hot pool with QEMU user networking (no network slot: the create path before
issue 12), on a copy of the template built for that backend, to show what a slot costs a create."""
RESULTS = Path(__file__).resolve().parent / "results"


def summary(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "p50": pct(xs, 50), "p95": pct(xs, 95), "p99": pct(xs, 99), "max": max(xs) if xs else float("nan")}


def solo_backend(config_path: str, template: str, prefix: str) -> tuple[Server, Any, Config]:
    """A benchmark's own backend for ``template`` (see ``_common.solo_backend_config``: no pool),
    not yet started, with E2B's SDK pointed at it: the server, the template's current build and
    the config it serves. ``TemplateNotFound`` says how to build a missing template;
    ``ValueError`` when the config has no such template."""
    base = load_config(config_path)
    if template not in base.template:
        raise ValueError(f"{config_path} has no template {template!r}")
    build = TemplateStore(DataRoot(base.data_root)).current(template)
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    port = free_port()
    (work / "config.toml").write_text(tomli_w.dumps(config_as_toml_data(solo_backend_config(base, template, port))))
    server = Server(work / "config.toml", port, work / "server.log")
    os.environ.update({"E2B_API_URL": server.url, "E2B_SANDBOX_URL": server.url, "E2B_API_KEY": "benchmark"})
    os.environ.pop("E2B_DEBUG", None)
    return server, build, base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def usernet_config(base: Config, template: str) -> Config:
    """``base`` with user networking and the template copied as ``<template>-usernet``."""
    copy = base.template[template].model_copy(update={"name": template + USERNET_SUFFIX})
    return base.model_copy(update={
        "network": base.network.model_copy(update={"mode": NetworkMode.user}),
        "template": {**base.template, copy.name: copy},
    })


def mode_config(base: Config, mode: str, template: str, pool_size: int, port: int) -> dict[str, Any]:
    """The base config with this mode's start_mode and pool, as a TOML-ready dict."""
    refill_priority = REFILL_MODES.get(mode)
    if mode == "hot-usernet":
        base = usernet_config(base, template)
        template += USERNET_SUFFIX
        mode = "hot"
    elif refill_priority:
        mode = "hot"
    no_pool = PoolConfig(templates=[template], warm_min=0, warm_max=0, hot_min=0, hot_max=0)
    pools = {
        "hot": PoolConfig(templates=[template], warm_min=2, warm_max=4, hot_min=pool_size, hot_max=pool_size,
                          hot_warmup_cmd=base.pool.hot_warmup_cmd),
        "warm": PoolConfig(templates=[template], warm_min=pool_size, warm_max=pool_size, hot_min=0, hot_max=0),
    }
    start = {"e2b": StartMode.snapshot_private, "boot": StartMode.boot}.get(mode, StartMode.snapshot)
    orch = base.orchestrator.model_copy(update={
        "port": port, "host": "127.0.0.1", "start_mode": start, "api_key": "",
        "max_sandboxes": max(base.orchestrator.max_sandboxes, 1000),
        "max_sandboxes_per_template": max(base.orchestrator.max_sandboxes_per_template, 1000),
        "keep_on_exit": False,
    })
    pool = pools.get(mode, no_pool)
    if refill_priority:
        pool = pool.model_copy(update={"refill_priority": refill_priority})
    cfg = base.model_copy(update={"orchestrator": orch, "pool": pool})
    return config_as_toml_data(cfg)


@dataclass
class Server:
    """One ``trenvx serve`` process for one mode; stopped with SIGTERM (it kills what it started)."""

    config_path: Path
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout_s: float = 120) -> None:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from trenvx.cli.admin import main; main()", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(base_url=self.url, timeout=2) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the backend exited with {self.proc.returncode}; see {self.log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await c.get("/health")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"the backend did not answer /health within {timeout_s:.0f}s; see {self.log_path}")

    async def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        for _ in range(600):
            if self.proc.poll() is not None:
                return
            await asyncio.sleep(0.1)
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    async def pool_ready(self, template: str) -> dict[str, int]:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as c:
            text = (await c.get("/metrics")).text
        out: dict[str, int] = {}
        for kind in ("ready", "target"):
            for tier in ("warm", "hot"):
                m = re.search(rf'trenvx_pool_{kind}{{template="{re.escape(template)}",tier="{tier}"}} (\S+)', text)
                out[f"{kind}_{tier}"] = int(float(m.group(1))) if m else 0
        return out

    async def wait_pool(self, template: str, timeout_s: float) -> dict[str, int]:
        """Until every pool tier holds its target (or the time is up); the last reading."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = await self.pool_ready(template)
            full = all(state[f"ready_{t}"] >= state[f"target_{t}"] for t in ("warm", "hot"))
            if full or time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.5)

    async def sandbox_info(self, sandbox_id: str) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as c:
            r = await c.get(f"/sandboxes/{sandbox_id}")
            return dict(r.json().get("trenvx") or {}) if r.status_code == 200 else {}


@dataclass
class ModeResult:
    mode: str
    ready_ms: list[float] = field(default_factory=list)
    hello_ms: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    bursts: list[dict[str, Any]] = field(default_factory=list)
    pool: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "ready_ms": summary(self.ready_ms), "hello_ms": summary(self.hello_ms),
            "stages_ms_p50": {k: pct(v, 50) for k, v in self.stages.items()}, "served_by": self.sources,
            "failures": self.failures[:20], "n_failures": len(self.failures), "bursts": self.bursts, "pool": self.pool,
        }


async def one_create(server: Server, template: str, *, hello: bool) -> tuple[float, float | None, Sandbox]:
    t0 = time.perf_counter()
    sb = await Sandbox.create(template=template, api_url=server.url, timeout=600)
    ready = (time.perf_counter() - t0) * 1000
    if not hello:
        return ready, None, sb
    p = await sb.process.start(HELLO)
    out = await p.wait()
    if out.stdout.strip() != "Hello World":
        raise RuntimeError(f"unexpected output {out.stdout!r} {out.stderr!r}")
    return ready, (time.perf_counter() - t0) * 1000, sb


def pooled_memory(data_root: DataRoot) -> dict[str, float]:
    """Average PSS/RSS (MiB) of the pooled VMs now (those with a ``pooled`` marker)."""
    pss, rss = [], []
    for d in data_root.sandboxes.iterdir():
        marker = d / "pooled"
        if not marker.is_file():
            continue
        with contextlib.suppress(Exception):
            r, p = memory_of(int(json.loads(marker.read_text())["pid"]))
            rss.append(r / 2**20)
            pss.append(p / 2**20)
    return {"count": len(pss), "pss_mib_avg": statistics.mean(pss) if pss else 0.0,
            "rss_mib_avg": statistics.mean(rss) if rss else 0.0}


async def run_mode(mode: str, base: Config, args: argparse.Namespace, workdir: Path) -> ModeResult:
    result = ModeResult(mode)
    template = args.template
    if mode == "hot-usernet":
        from trenvx.template.builder import TemplateBuilder

        template = args.template + USERNET_SUFFIX
        built = await TemplateBuilder(usernet_config(base, args.template)).build(template)
        print(f"   template {template}: {'reused' if built.skipped else 'built'} (user networking)", flush=True)
    bursts = [] if mode == "boot" else args.bursts
    if mode == "e2b":  # every sandbox a private copy of the guest RAM: keep the burst within memory
        import psutil

        room = psutil.virtual_memory().available * 0.6 / 2**20
        mem_mb = TemplateStore(DataRoot(base.data_root)).current(template).machine.mem_mb
        skipped = [b for b in bursts if b * mem_mb > room]
        bursts = [b for b in bursts if b * mem_mb <= room]
        if skipped:
            print(f"   e2b: bursts {skipped} skipped: {mem_mb} MiB of private RAM each would not fit in memory")
    pool_size = max([args.hot_size or 0, *bursts, 4]) if mode in ("hot", "hot-usernet", "warm", *REFILL_MODES) else 0
    port = free_port()
    cfg_path = workdir / f"{mode}.toml"
    cfg_path.write_text(tomli_w.dumps(mode_config(base, mode, args.template, pool_size, port)))
    server = Server(cfg_path, port, workdir / f"{mode}-server.log")
    n = args.boot_n if mode == "boot" else args.n
    print(f"== {mode}: {n} sequential creates, bursts {bursts or 'none'}", flush=True)
    await server.start()
    try:
        if pool_size:
            t = time.perf_counter()
            state = await server.wait_pool(template, args.pool_timeout_s)
            mem = pooled_memory(DataRoot(base.data_root))
            result.pool = {"size": pool_size, "filled_in_s": round(time.perf_counter() - t, 1), **state, **mem}
            print(f"   pool {state} in {result.pool['filled_in_s']} s; pooled VM PSS {mem['pss_mib_avg']:.1f} MiB",
                  flush=True)
        for i in range(n):
            try:
                ready, hello, sb = await one_create(server, template, hello=True)
            except Exception as e:  # noqa: BLE001 - counted and reported
                result.failures.append(f"sequential {i}: {type(e).__name__}: {e}")
                continue
            try:
                info = await server.sandbox_info(sb.id)
            finally:
                await sb.close()
            result.ready_ms.append(ready)
            result.hello_ms.append(hello or float("nan"))
            src = info.get("startSource") or "?"
            result.sources[src] = result.sources.get(src, 0) + 1
            for k, v in (info.get("startTimes") or {}).items():
                result.stages.setdefault(k, []).append(float(v))
            if args.gap_s:
                await asyncio.sleep(args.gap_s)
        for size in bursts:
            if pool_size:
                await server.wait_pool(template, args.pool_timeout_s)
            t0 = time.perf_counter()
            outcomes = await asyncio.gather(*(one_create(server, template, hello=False) for _ in range(size)),
                                            return_exceptions=True)
            all_ready = (time.perf_counter() - t0) * 1000
            ok = [o for o in outcomes if not isinstance(o, BaseException)]
            failed = [f"{type(o).__name__}: {o}" for o in outcomes if isinstance(o, BaseException)]
            lat = [o[0] for o in ok]
            sources: dict[str, int] = {}
            for o in ok:
                info = await server.sandbox_info(o[2].id)
                s = info.get("startSource") or "?"
                sources[s] = sources.get(s, 0) + 1
            await asyncio.gather(*(o[2].close() for o in ok), return_exceptions=True)
            result.bursts.append({"size": size, "all_ready_ms": all_ready if not failed else None,
                                  "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "failures": len(failed),
                                  "failure_examples": failed[:3], "served_by": sources})
            print(f"   burst {size}: all ready in {all_ready:.0f} ms, p50 {pct(lat, 50):.0f} p99 {pct(lat, 99):.0f}, "
                  f"{len(failed)} failed, {sources}", flush=True)
    finally:
        await server.stop()
    return result


def print_table(results: list[ModeResult], meta: dict[str, Any]) -> None:
    print(f"\nstart latency, {meta['template']} ({meta['vcpu']} vCPU, {meta['mem_mb']} MiB) on {meta['host']}: "
          f"{meta['cpus']} CPUs, accelerator {meta['accelerator']}")
    head = f"{'mode':11} {'n':>4} {'ready p50':>10} {'p95':>7} {'p99':>7} {'max':>7} {'hello p50':>10} {'p99':>7}  served by"
    print(head)
    print("-" * len(head))
    for r in results:
        s, h = summary(r.ready_ms), summary(r.hello_ms)
        print(f"{r.mode:11} {s['n']:>4} {s['p50']:>10.1f} {s['p95']:>7.1f} {s['p99']:>7.1f} {s['max']:>7.1f} "
              f"{h['p50']:>10.1f} {h['p99']:>7.1f}  {r.sources}{'  FAILURES ' + str(len(r.failures)) if r.failures else ''}")
    print("\nbursts (ms): all ready / p50 / p99 / failures")
    for r in results:
        if r.bursts:
            print(f"{r.mode:11} " + "   ".join(
                f"{b['size']}: {b['all_ready_ms'] or float('nan'):.0f}/{b['p50_ms']:.0f}/{b['p99_ms']:.0f}/{b['failures']}"
                for b in r.bursts))
    print("\nstage p50 (ms) on the create path")
    for r in results:
        print(f"{r.mode:11} " + ", ".join(f"{k} {pct(v, 50):.1f}" for k, v in r.stages.items()))
    by = {r.mode: summary(r.ready_ms)["p50"] for r in results}
    for fast in ("hot", "warm"):
        if fast in by and "e2b" in by and by[fast] > 0:
            print(f"{fast} p50 is {by['e2b'] / by[fast]:.1f}x faster than the E2B-style restore's p50")
    if "hot" in by and "hot-usernet" in by:
        print(f"a network slot costs a hot create {by['hot'] - by['hot-usernet']:+.1f} ms at p50 "
              f"({by['hot']:.1f} ms in a slot vs {by['hot-usernet']:.1f} ms on user networking)")
    p99 = {r.mode: summary(r.ready_ms)["p99"] for r in results}
    if any(m in p99 for m in REFILL_MODES):
        print("hot ready p99 by refill priority: " + ", ".join(
            f"{REFILL_MODES[m]} {p99[m]:.1f} ms" for m in REFILL_MODES if m in p99))
    if "boot" in by and "hot" in by and by["hot"] > 0:
        print(f"a cold boot (no snapshot) is {by['boot'] / by['hot']:.0f}x slower than the hot pool at p50")


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.environ.get("TRENVX_CONFIG", "configs/example_config.toml"))
    ap.add_argument("--template", default=None, help="default: the config's default template")
    ap.add_argument("-n", type=int, default=200, help="sequential creates per mode (default 200)")
    ap.add_argument("--boot-n", type=int, default=5, help="sequential creates in the boot mode (default 5)")
    ap.add_argument("--bursts", default="10,50,100", help="burst sizes, comma-separated (default 10,50,100)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"subset of {','.join(MODES)}, or the refill priorities {','.join(REFILL_MODES)}")
    ap.add_argument("--gap-s", type=float, default=0.5, help="pause between sequential creates (default 0.5 s)")
    ap.add_argument("--hot-size", type=int, default=0, help="pool size of the hot/warm modes (default: largest burst)")
    ap.add_argument("--pool-timeout-s", type=float, default=300.0)
    ap.add_argument("--quick", action="store_true", help="CI: 3 creates per mode, bursts of 3, 1 boot")
    ap.add_argument("--json", default="", help="output file (default benchmarks/results/start-latency-<time>.json)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.boot_n, args.bursts, args.gap_s = 3, 1, "3", 0.2
    args.bursts = [int(b) for b in str(args.bursts).split(",") if b.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES) - set(REFILL_MODES))
    if unknown:
        ap.error(f"unknown modes {unknown}; choose from {', '.join([*MODES, *REFILL_MODES])}")
    base = load_config(args.config)
    args.template = args.template or base.default_template
    build = TemplateStore(DataRoot(base.data_root)).current(args.template)
    m = build.manifest.machine
    meta = {
        "template": args.template, "build_id": build.build_id, "vcpu": m.vcpu, "mem_mb": m.mem_mb,
        "accelerator": m.accelerator, "host": platform.node(), "cpus": os.cpu_count(),
        "kernel": platform.release(), "python": platform.python_version(), "n": args.n, "gap_s": args.gap_s,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    results: list[ModeResult] = []
    with tempfile.TemporaryDirectory(prefix="trenvx-bench-") as tmp:
        for mode in modes:
            results.append(await run_mode(mode, base, args, Path(tmp)))
    print_table(results, meta)
    out = Path(args.json) if args.json else RESULTS / f"start-latency-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "modes": [r.to_json() for r in results]}, indent=2))
    print(f"\nJSON: {out}")
    return 1 if any(r.failures or any(b["failures"] for b in r.bursts) for r in results) else 0


if __name__ == "__main__":
    sys.exit(run_cancellable(main))
