"""Restore latency of the VM core, below the server: fresh VMM process vs pre-started one.

    python benchmarks/restore.py --config configs/example_config.toml [--template NAME] [-n 50]

For each mode it restores N sandboxes one after another and reports p50/p95/p99/max of
restore -> agent ready (identity given, agent answered), the first ``Hello World`` after the
restore, the stage breakdown, and the average PSS/RSS of idle sandboxes running side by side. Table on stdout, JSON in
benchmarks/results/restore-<time>.json. Everything it starts is killed and removed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from _common import pct  # benchmarks/ is on sys.path when run as a script
from trenvx.config import load_config
from trenvx.layout import DataRoot
from trenvx.sandbox.restore import SnapshotRestore, new_sandbox_id
from trenvx.template.store import TemplateStore
from trenvx.vmm.process import memory_of

HELLO = "python3 -c \"print('Hello World')\""


async def run_mode(restorer: SnapshotRestore, build: Any, mode: str, n: int) -> dict[str, Any]:
    ready: list[float] = []
    hello: list[float] = []
    stages: dict[str, list[float]] = {}
    for _ in range(n):
        sid = new_sandbox_id()
        prepared = None
        if mode == "prestarted":
            prepared = await restorer.prepare(build, sid)
            await asyncio.sleep(0.05)  # as in a pool: the process has been waiting a while
        t0 = time.perf_counter()
        r = await restorer.restore(build, sandbox_id=sid, prepared=prepared)
        t_ready = time.perf_counter() - t0
        try:
            t1 = time.perf_counter()
            res = await r.agent.run(HELLO)
            t_hello = time.perf_counter() - t1
            assert res.stdout == b"Hello World\n", res
        finally:
            await restorer.destroy(r)
        ready.append(t_ready * 1000)
        hello.append(t_hello * 1000)
        for k, v in r.times.items():
            stages.setdefault(k, []).append(v * 1000)
    return {
        "mode": mode, "n": n,
        "ready_ms": {"p50": pct(ready, 50), "p95": pct(ready, 95), "p99": pct(ready, 99), "max": max(ready)},
        "hello_ms": {"p50": pct(hello, 50), "p95": pct(hello, 95), "max": max(hello)},
        "stages_ms_p50": {k: pct(v, 50) for k, v in stages.items()},
    }


async def idle_memory(restorer: SnapshotRestore, build: Any, settle_s: float, count: int) -> dict[str, float]:
    """Average PSS/RSS of ``count`` idle sandboxes of one template (PSS splits the shared pages)."""
    sandboxes = [await restorer.restore(build) for _ in range(count)]
    try:
        for r in sandboxes:
            await r.agent.run(HELLO)
        await asyncio.sleep(settle_s)
        mem = [memory_of(r.vm.pid) for r in sandboxes]
        return {
            "sandboxes": count,
            "rss_mib": sum(m[0] for m in mem) / count / 2**20,
            "pss_mib": sum(m[1] for m in mem) / count / 2**20,
        }
    finally:
        await asyncio.gather(*(restorer.destroy(r) for r in sandboxes))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/example_config.toml")
    ap.add_argument("--template", default=None)
    ap.add_argument("-n", type=int, default=50)
    ap.add_argument("--settle", type=float, default=5.0, help="seconds an idle sandbox waits before its PSS is read")
    ap.add_argument("--idle", type=int, default=10, help="idle sandboxes whose average PSS is reported")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    cfg = load_config(args.config)
    dr = DataRoot(cfg.data_root).ensure()
    name = args.template or cfg.default_template
    build = TemplateStore(dr).current(name)
    restorer = SnapshotRestore(cfg, dr)
    results = [await run_mode(restorer, build, mode, args.n) for mode in ("fresh", "prestarted")]
    mem = await idle_memory(restorer, build, args.settle, args.idle)
    report = {
        "template": name, "build": build.build_id, "accelerator": build.manifest.machine.accelerator,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "build_stage_seconds": build.manifest.stage_seconds,
        "modes": results, "idle_sandbox": mem,
    }
    print(f"\nrestore latency, template {name} ({build.manifest.machine.accelerator}, {report['machine']['cpus']} cpus), n={args.n}")
    print(f"{'mode':<12}{'ready p50':>10}{'p95':>8}{'p99':>8}{'max':>8}{'hello p50':>11}{'p95':>8}   stages p50 (ms)")
    for r in results:
        rd, h = r["ready_ms"], r["hello_ms"]
        st = " ".join(f"{k}={v:.1f}" for k, v in r["stages_ms_p50"].items())
        print(f"{r['mode']:<12}{rd['p50']:>10.1f}{rd['p95']:>8.1f}{rd['p99']:>8.1f}{rd['max']:>8.1f}{h['p50']:>11.1f}{h['p95']:>8.1f}   {st}")
    print(f"idle sandboxes ({mem['sandboxes']} at once, {args.settle:.0f}s after a command): "
          f"PSS {mem['pss_mib']:.1f} MiB, RSS {mem['rss_mib']:.1f} MiB each")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"restore-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"JSON: {path}")


if __name__ == "__main__":
    asyncio.run(main())
