"""Density: host memory per sandbox with trenvx's sharing against an E2B-style baseline, in one run.

    python benchmarks/density.py [--config configs/example_config.toml] [--template code-interpreter]
                                 [--counts 10,50,100] [--max-idle 400] [--quick]

For each N in ``--counts`` and each mode it starts N sandboxes of the template (through the
sandbox manager, pools off so that only sandboxes are measured), runs the same small agent
workload in each (import numpy and pandas, build a DataFrame, compute, write a file), lets them
idle ``--settle-s`` seconds, and reports host memory per sandbox three ways:

- **PSS**: the sum of the VMM processes' proportional set size (shared pages split between users);
- **page cache**: what the template's files (memory file, root image) hold in the host page cache,
  divided by N (shared by all sandboxes of the template);
- **MemAvailable**: the drop of the host's MemAvailable from before the first create, divided by N.

Modes: ``trenvx`` (guest RAM mapped copy-on-write from the template's memory file; with
``overlay = true`` the root image on virtio-pmem with DAX, shared by all, under a per-sandbox
writable layer) and ``e2b`` (E2B-style: guest RAM copied into private memory from a full snapshot,
as Firecracker restores without a shared file; root disk on virtio-blk with the guest page cache
and a qcow2 overlay). When the template is in overlay mode, the baseline uses the same template
with ``overlay = false`` (``<name>-blk``, built here if it is not up to date).
A mode/N whose private RAM cannot fit in this host's memory is skipped and said so.

``--max-idle`` then finds how many idle sandboxes (trenvx mode) this host holds before
MemAvailable falls under 10% while creates still succeed.

Table on stdout, JSON in benchmarks/results/. Everything started is killed and removed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from _common import run_cancellable  # benchmarks/ is on sys.path when run as a script

from trenvx.config import Config, PoolConfig, StartMode, load_config
from trenvx.layout import DataRoot
from trenvx.sandbox.limits import Admission, Limits
from trenvx.sandbox.manager import Sandbox, SandboxManager
from trenvx.template.store import TemplateStore
from trenvx.vmm.process import GUEST_RAM, TCG_CODE, memory_of, memory_parts_of

MiB = 2**20
WORKLOAD = (
    "python3 -c \"import numpy, pandas; df = pandas.DataFrame(numpy.random.rand(2000, 8), columns=list('abcdefgh')); "
    "df['s'] = df.sum(axis=1); r = df.describe(); df.to_csv('/tmp/out.csv'); print(len(r))\""
)
RESULTS = Path(__file__).resolve().parent / "results"


KSM = Path("/sys/kernel/mm/ksm")


def ksm_set(**values: int) -> dict[str, int]:
    """Write KSM knobs; the previous values (to put back)."""
    old = {}
    for k, v in values.items():
        old[k] = int((KSM / k).read_text())
        (KSM / k).write_text(str(v))
    return old


def ksmd_cpu_s() -> float:
    for p in psutil.process_iter(["name"]):
        if p.info["name"] == "ksmd":
            t = p.cpu_times()
            return t.user + t.system
    return 0.0


def mode_config(base: Config, mode: str) -> Config:
    start = StartMode.snapshot_private if mode == "e2b" else StartMode.snapshot  # trenvx, +ksm, +reclaim
    orch = base.orchestrator.model_copy(update={
        "start_mode": start, "max_sandboxes": 5000, "max_sandboxes_per_template": 5000, "default_timeout_s": 3600,
    })
    no_pool = PoolConfig(warm_min=0, warm_max=0, hot_min=0, hot_max=0)
    return base.model_copy(update={"orchestrator": orch, "pool": no_pool})


async def baseline_template(base: Config, template: str) -> tuple[Config, str]:
    """The E2B-style baseline's template: ``template`` itself, or when it is in overlay mode the same
    template with its root on virtio-blk (``<name>-blk``), built now unless up to date."""
    tpl = base.get_template(template)
    if not TemplateStore(DataRoot(base.data_root)).current(template).overlay:
        return base, template
    name = f"{template}-blk"
    cfg = base.model_copy(update={"template": {**base.template, name: tpl.model_copy(update={"name": name, "overlay": False})}})
    from trenvx.template.builder import TemplateBuilder

    print(f"== baseline template {name} (the root on virtio-blk)", flush=True)
    await TemplateBuilder(cfg).build(name)
    return cfg, name


def page_cache_bytes(paths: list[Path]) -> int:
    """Bytes of ``paths`` resident in the host page cache (util-linux ``fincore``)."""
    files = [str(p) for p in paths if p.exists()]
    if not files:
        return 0
    r = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *files],
                       capture_output=True, text=True, timeout=30)
    return sum(int(x) for x in r.stdout.split() if x.isdigit())


async def start_many(m: SandboxManager, template: str, n: int, parallel: int) -> list[Sandbox]:
    sem = asyncio.Semaphore(parallel)
    out: list[Sandbox] = []

    async def one() -> None:
        async with sem:
            out.append(await m.create(template, timeout_s=3600))

    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} creates failed, first: {errors[0]!r}")
    return out


async def measure(base: Config, template: str, mode: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    cfg = mode_config(base, mode)
    dr = DataRoot(cfg.data_root)
    build = TemplateStore(dr).current(template)
    files = build.files()
    if mode == "e2b":  # its guest RAM comes from the full snapshot file (made on first use)
        full = dr.cache / "full-snapshots" / f"{build.manifest.name}-{build.build_id}" / "vmstate-full"
        files = [full, build.rootfs]
    admission = Admission(Limits(5000, 5000, 0))  # the benchmark measures; it does not refuse
    avail0 = psutil.virtual_memory().available
    t0 = time.perf_counter()
    async with SandboxManager(cfg, admission=admission, pools=False) as m:
        sandboxes = await start_many(m, template, n, args.parallel)
        try:
            sem = asyncio.Semaphore(args.parallel)

            async def work(sb: Sandbox) -> None:
                async with sem:
                    r = await sb.run(args.workload, timeout=600)
                    if r.exit_code != 0:
                        raise RuntimeError(f"workload failed in {sb.id}: {r.stderr[-300:]!r}")

            if not args.idle_only:
                await asyncio.gather(*(work(sb) for sb in sandboxes))
            ksm: dict[str, Any] = {}
            if mode == "trenvx+ksm":
                old = ksm_set(pages_to_scan=4000, sleep_millisecs=20, run=1)
                cpu0, t_ksm = ksmd_cpu_s(), time.perf_counter()
                try:
                    await asyncio.sleep(args.ksm_s)
                    ksm = {"pages_sharing": int((KSM / "pages_sharing").read_text()),
                           "ksmd_cpu_share": (ksmd_cpu_s() - cpu0) / (time.perf_counter() - t_ksm),
                           "seconds": args.ksm_s}
                finally:
                    ksm_set(run=0, **{k: v for k, v in old.items() if k != "run"})
            reclaimed: dict[str, Any] = {}
            if mode == "trenvx+reclaim":  # the server's reclaim of idle sandboxes, on every one
                await asyncio.sleep(args.settle_s)
                t_r = time.perf_counter()

                async def reclaim_one(sb: Sandbox) -> int:
                    async with sem:
                        return (await m.reclaim(sb.id)).freed

                freed = sum(await asyncio.gather(*(reclaim_one(sb) for sb in sandboxes)))
                reclaimed = {"freed_mib_per_sandbox": freed / n / MiB, "seconds": time.perf_counter() - t_r}
            else:
                await asyncio.sleep(args.settle_s)
            mem = [memory_of(sb.pid) for sb in sandboxes]
            named = {build.snapshot.memory_file: GUEST_RAM, build.rootfs: "root image"}
            parts: dict[str, float] = {}
            for sb in sandboxes:
                for part, b in memory_parts_of(sb.pid, named, build.machine.mem_mb * MiB).items():
                    parts[part] = parts.get(part, 0.0) + b / n / MiB
            avail1 = psutil.virtual_memory().available
            cache = page_cache_bytes(files)
        finally:
            await asyncio.gather(*(m.kill(sb.id) for sb in sandboxes), return_exceptions=True)
    pss = sum(p for _, p in mem) / n / MiB
    return {
        "mode": mode, "n": n, "seconds": round(time.perf_counter() - t0, 1),
        "pss_mib": pss, "rss_mib": sum(r for r, _ in mem) / n / MiB, "tcg_code_mib": parts.get(TCG_CODE, 0.0),
        "page_cache_mib": cache / n / MiB, "pss_plus_cache_mib": pss + cache / n / MiB,
        "memavailable_drop_mib": (avail0 - avail1) / n / MiB, "pss_parts_mib": parts,
        **({"ksm": ksm} if ksm else {}),
        **({"reclaim": reclaimed} if reclaimed else {}),
    }


async def max_idle(base: Config, template: str, args: argparse.Namespace) -> dict[str, Any]:
    """Create idle sandboxes until MemAvailable < 10% of RAM (or --max-idle, or a create fails)."""
    cfg = mode_config(base, "trenvx")
    total = psutil.virtual_memory().total
    admission = Admission(Limits(5000, 5000, 0))
    sandboxes: list[Sandbox] = []
    stop_reason = f"reached --max-idle {args.max_idle}"
    t0 = time.perf_counter()
    last_create_ms = 0.0
    async with SandboxManager(cfg, admission=admission, pools=False) as m:
        try:
            while len(sandboxes) < args.max_idle:
                if psutil.virtual_memory().available < 0.10 * total:
                    stop_reason = "MemAvailable fell under 10%"
                    break
                batch = min(args.parallel, args.max_idle - len(sandboxes))
                t = time.perf_counter()
                try:
                    sandboxes += await start_many(m, template, batch, batch)
                except RuntimeError as e:
                    stop_reason = f"a create failed: {e}"
                    break
                last_create_ms = (time.perf_counter() - t) * 1000
                if last_create_ms > args.max_batch_s * 1000:
                    stop_reason = (f"creates became too slow: a batch of {batch} took {last_create_ms / 1000:.0f} s "
                                   f"(> --max-batch-s {args.max_batch_s:.0f}); the host's CPUs are the limit")
                    break
                if len(sandboxes) % 50 < batch:
                    print(f"   {len(sandboxes)} idle sandboxes, MemAvailable "
                          f"{psutil.virtual_memory().available / MiB:.0f} MiB", flush=True)
            probe = await m.create(template)  # a create is still answered at this density
            ok = (await probe.run("echo ok")).stdout == b"ok\n"
            await m.kill(probe.id)
            mem = [memory_of(sb.pid) for sb in sandboxes]
            held = len(sandboxes)
        finally:
            await asyncio.gather(*(m.kill(sb.id) for sb in sandboxes), return_exceptions=True)
    return {
        "idle_sandboxes": held, "stop_reason": stop_reason, "create_still_answered": ok,
        "last_batch_ms": last_create_ms, "pss_mib_avg": sum(p for _, p in mem) / max(held, 1) / MiB,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def print_table(rows: list[dict[str, Any]], meta: dict[str, Any], idle: dict[str, Any] | None) -> None:
    root = "virtio-pmem + DAX root under a writable layer" if meta["overlay"] else "virtio-blk root"
    print(f"\ndensity, {meta['template']} ({meta['mem_mb']} MiB guest, trenvx: {root}) on {meta['host']}: {meta['cpus']} CPUs, "
          f"{meta['ram_gib']:.0f} GiB, accelerator {meta['accelerator']}; workload, then idle: {meta['workload']}")
    head = f"{'N':>4} {'mode':14} {'PSS':>8} {'+cache':>8} {'MemAvail':>9} {'RSS':>8} {'TCG code':>9}   (MiB per sandbox)"
    print(head)
    print("-" * len(head))
    by = {(r["n"], r["mode"]): r for r in rows if "pss_mib" in r}
    for r in rows:
        if "skipped" in r:
            print(f"{r['n']:>4} {r['mode']:14} skipped: {r['skipped']}")
            continue
        print(f"{r['n']:>4} {r['mode']:14} {r['pss_mib']:>8.1f} {r['pss_plus_cache_mib']:>8.1f} "
              f"{r['memavailable_drop_mib']:>9.1f} {r['rss_mib']:>8.1f} {r.get('tcg_code_mib', 0):>9.1f}")
    for n in sorted({n for n, _ in by}):
        for name in ("trenvx", "trenvx+ksm", "trenvx+reclaim"):
            a, b = by.get((n, name)), by.get((n, "e2b"))
            if not (a and b):
                continue
            red = 100 * (1 - a["pss_plus_cache_mib"] / b["pss_plus_cache_mib"])
            red_avail = 100 * (1 - a["memavailable_drop_mib"] / b["memavailable_drop_mib"]) if b["memavailable_drop_mib"] > 0 else float("nan")
            print(f"N={n}: {name} uses {red:.0f}% less memory per sandbox than E2B-style (PSS + page cache), "
                  f"{red_avail:.0f}% less by MemAvailable")
            if a.get("tcg_code_mib") and b.get("tcg_code_mib"):
                kvm = 100 * (1 - (a["pss_mib"] - a["tcg_code_mib"]) / (b["pss_mib"] - b["tcg_code_mib"]))
                print(f"      without TCG's translated code (what a KVM host does not pay): {kvm:.0f}% less by PSS "
                      f"({a['pss_mib'] - a['tcg_code_mib']:.1f} vs {b['pss_mib'] - b['tcg_code_mib']:.1f} MiB)")
    parts = sorted({p for r in rows for p in r.get("pss_parts_mib", {})},
                   key=lambda p: -max(r.get("pss_parts_mib", {}).get(p, 0) for r in rows))
    if parts:
        print("\nwhere the PSS goes (MiB per sandbox):")
        print(f"{'N':>4} {'mode':14} " + " ".join(f"{p:>12}" for p in parts))
        for r in rows:
            if "pss_parts_mib" in r:
                print(f"{r['n']:>4} {r['mode']:14} "
                      + " ".join(f"{r['pss_parts_mib'].get(p, 0.0):>12.1f}" for p in parts))
    for r in rows:
        if "reclaim" in r:
            print(f"N={r['n']} reclaim: {r['reclaim']['freed_mib_per_sandbox']:.1f} MiB given back per sandbox "
                  f"({r['reclaim']['seconds']:.0f} s for all)")
        if "ksm" in r:
            k = r["ksm"]
            print(f"N={r['n']} KSM: {k['pages_sharing'] * 4 / 1024:.0f} MiB deduplicated after {k['seconds']:.0f} s, "
                  f"ksmd used {100 * k['ksmd_cpu_share']:.0f}% of a core")
    if idle:
        print(f"\nidle sandboxes held: {idle['idle_sandboxes']} ({idle['stop_reason']}); a create still answered: "
              f"{idle['create_still_answered']}; PSS {idle['pss_mib_avg']:.1f} MiB each")


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.environ.get("TRENVX_CONFIG", "configs/example_config.toml"))
    ap.add_argument("--template", default="code-interpreter")
    ap.add_argument("--counts", default="10,50,100")
    ap.add_argument("--modes", default="trenvx,e2b", help="trenvx, e2b, trenvx+ksm (KSM on while measured), "
                    "trenvx+reclaim (every sandbox reclaimed after the workload, as the server does to idle ones)")
    ap.add_argument("--ksm-s", type=float, default=60.0, help="how long KSM scans in the trenvx+ksm mode")
    ap.add_argument("--parallel", type=int, default=4, help="creates/workloads at once (default 4)")
    ap.add_argument("--settle-s", type=float, default=10.0)
    ap.add_argument("--max-idle", type=int, default=0, help="find how many idle sandboxes fit, up to this many")
    ap.add_argument("--max-batch-s", type=float, default=60.0,
                    help="max-idle search stops when a batch of --parallel creates takes longer (default 60 s)")
    ap.add_argument("--idle-only", action="store_true", help="no workload: measure idle sandboxes")
    ap.add_argument("--workload", default=WORKLOAD, help="command run in every sandbox (default: numpy + pandas)")
    ap.add_argument("--quick", action="store_true", help="CI: N=3, no max-idle search")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.quick:
        args.counts, args.settle_s, args.max_idle = "3", 2.0, 0
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    base = load_config(args.config)
    build = TemplateStore(DataRoot(base.data_root)).current(args.template)
    mem_mb = build.machine.mem_mb
    vm = psutil.virtual_memory()
    meta = {"template": args.template, "build_id": build.build_id, "mem_mb": mem_mb,
            "accelerator": build.machine.accelerator, "overlay": build.overlay, "host": platform.node(), "cpus": os.cpu_count(),
            "ram_gib": vm.total / 2**30, "kernel": platform.release(), "workload": "(none: idle only)" if args.idle_only else args.workload,
            "settle_s": args.settle_s, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    rows: list[dict[str, Any]] = []
    baseline: tuple[Config, str] | None = None
    for n in counts:
        for mode in [x.strip() for x in args.modes.split(",") if x.strip()]:
            measured = [r["memavailable_drop_mib"] for r in rows if r.get("mode") == mode and "pss_mib" in r]
            per_sandbox_mib = 1.2 * max(measured) if measured else mem_mb  # private copies: the non-zero pages
            if mode == "e2b" and n * per_sandbox_mib * MiB > 0.85 * psutil.virtual_memory().available:
                rows.append({"mode": mode, "n": n, "skipped": f"{n} private copies of ~{per_sandbox_mib:.0f} MiB do not "
                             f"fit in {psutil.virtual_memory().available / 2**30:.1f} GiB available"})
                print(f"== {mode} N={n}: skipped (does not fit)", flush=True)
                continue
            print(f"== {mode} N={n}", flush=True)
            if mode == "e2b":
                if baseline is None:
                    baseline = await baseline_template(base, args.template)
                rows.append(await measure(baseline[0], baseline[1], mode, n, args))
            else:
                rows.append(await measure(base, args.template, mode, n, args))
            r = rows[-1]
            print(f"   PSS {r['pss_mib']:.1f} MiB, +cache {r['pss_plus_cache_mib']:.1f}, "
                  f"MemAvailable -{r['memavailable_drop_mib']:.1f} MiB per sandbox ({r['seconds']} s)", flush=True)
    idle = None
    if args.max_idle:
        print(f"== max idle (up to {args.max_idle})", flush=True)
        idle = await max_idle(base, args.template, args)
    print_table(rows, meta, idle)
    out = Path(args.json) if args.json else RESULTS / f"density-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "max_idle": idle}, indent=2))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cancellable(main))
