"""Soak: create/exec/kill churn at a steady concurrency for a long time, watching what the server and
the host hold for growth (issue 18, item 3).

    python benchmarks/soak.py [--config configs/example_config.toml] [--template default-sandbox]
                              [--duration-s 1800] [--concurrency 6] [--interval-s 10] [--quick]

It starts its own backend on a data_root of its own (as ``benchmarks/load.py`` does: no pools
unless ``--hot``, so each create is a new VMM process, a new network slot and new files). For
``--duration-s``, ``--concurrency`` workers each loop: create a sandbox through the SDK (its own
client object), ``--rounds`` rounds of calls (echo, python3 -c, file write/read/list, all checked,
as in load.py), kill it.

Every ``--interval-s`` it samples:

- the server process: open fds, threads, RSS; its other (non-VMM) child processes;
- the data_root outside the linked templates/kernels/cache: files and bytes (logs apart, in
  ``log_bytes``: a log grows by design);
- network slots claimed by this data_root's owner (/run/trenvx/net/slots), VMM processes whose
  command line names the data_root, sandboxes the API lists;
- cgroups of this owner (``trenvx-<owner>`` and its ``vm-*`` groups, every controller);
- host-wide leftovers: network namespaces ``trenvx-N`` and host interfaces ``tvsN`` with no slot
  claim, nftables tables of this owner, cgroups named ``trenvx-*`` (every server's parents).

For each it reports start, end, max and a least-squares slope per hour (with its standard error)
over the samples after ``--warmup-s`` and over the second half of the run, and a verdict:
``flat`` (no growth: the slope is within 3 standard errors of zero, or the fitted growth over the
window is under the metric's tolerance or twice the residuals' spread), ``grows``/``shrinks`` (both fits agree),
``grew, then flat`` (the second half is flat: a bounded cache filling, e.g. the list of ended
sandboxes the server keeps); and each metric's correlation with the churn rate (sandboxes created
and killed per minute between samples: what follows the load is in flight, not leaked). After the
server stops, what was left behind is counted.

Table on stdout, JSON in benchmarks/results/ (``soak-<time>.json``). Other work on the host
(other servers, VM tests) shows in the host-wide columns, which is why they are counted against
this owner's claims where possible.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil

from _common import run_cancellable, write_results  # benchmarks/ is on sys.path when run as a script
from load import (
    DEFAULT_CONFIG,
    SHARED,
    Backend,
    Run,
    SandboxLost,
    Workload,
    create_admitted,
    error_summary,
    host_meta,
    latency_table,
    one_round,
    server_process,
    server_sample,
    slots_of,
    timed,
    vmm_count,
)

from trenvx.network.slot import CLAIMS_DIR, HOST_IF_PREFIX, NETNS_PREFIX

MiB = 1 << 20
TOLERANCE = {
    "server_fds": 4, "server_threads": 2, "server_rss_mib": 8.0, "server_children": 1,
    "data_files": 4, "data_mib": 4.0, "network_slots": 1, "vmm_processes": 1, "sandboxes_listed": 1,
    "orphan_netns": 1, "orphan_host_ifs": 1, "owner_nft_tables": 1, "owner_cgroups": 3, "host_trenvx_cgroups": 3,
}
"""Growth over a fit's window below which a metric counts as flat whatever its slope: a few fds
or MiB, about what one sandbox more or less alive at a sample moves."""
METRICS = tuple(TOLERANCE)


# -- samples ---------------------------------------------------------------------------------------


def data_root_usage(root: Path) -> dict[str, float]:
    """Files and bytes under ``root`` outside the linked shared parts; logs (``*.log``) apart."""
    files = 0
    size = 0
    logs = 0
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d not in SHARED]
        for name in filenames:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                if name.endswith(".log"):
                    logs += st.st_size
                    continue
                files += 1
                size += st.st_blocks * 512  # what the disk holds: sparse memory files count as written
    return {"data_files": files, "data_mib": size / MiB, "log_bytes": logs}


def claimed_indices() -> set[int]:
    with contextlib.suppress(OSError):
        return {int(p.name) for p in CLAIMS_DIR.iterdir() if p.name.isdigit()}
    return set()


def netns_names() -> list[str]:
    with contextlib.suppress(OSError):
        return os.listdir("/run/netns")
    return []


def orphans(claims: set[int]) -> dict[str, int]:
    """Host-wide network namespaces and host interfaces of slots that no claim names."""
    ns = [n for n in netns_names() if n.startswith(NETNS_PREFIX) and n[len(NETNS_PREFIX):].isdigit()]
    ifs = []
    with contextlib.suppress(OSError):
        ifs = [n for n in os.listdir("/sys/class/net") if re.fullmatch(rf"{HOST_IF_PREFIX}\d+", n)]
    return {"orphan_netns": sum(1 for n in ns if int(n[len(NETNS_PREFIX):]) not in claims),
            "orphan_host_ifs": sum(1 for n in ifs if int(n[len(HOST_IF_PREFIX):]) not in claims),
            "all_netns": len(ns)}


def nft_tables(owner: str) -> int:
    """This owner's nftables tables (``trenvx_<owner>_<pid>``) in the host's namespace."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=10)
        return sum(1 for line in r.stdout.splitlines() if f"trenvx_{owner}_" in line)
    return 0


def cgroups(owner: str) -> dict[str, int]:
    """Cgroups under /sys/fs/cgroup (v1 or v2, every controller): this owner's (its parent
    ``trenvx-<owner>`` and the ``vm-*`` groups in it, one per VMM per controller) and, host-wide,
    directories named ``trenvx-*`` (the parents of every server, this one's included)."""
    mine = host = 0
    parent = f"trenvx-{owner}"
    for dirpath, dirnames, _ in os.walk("/sys/fs/cgroup"):
        if os.path.basename(dirpath) == parent:
            mine += 1 + sum(1 for d in dirnames if d.startswith("vm-"))
        host += sum(1 for d in dirnames if d.startswith("trenvx-"))
        if dirpath.count("/") > 7 or os.path.basename(dirpath).startswith("trenvx-"):
            dirnames[:] = []
    return {"owner_cgroups": mine, "host_trenvx_cgroups": host}


def server_children(backend: Backend) -> int:
    """The server's descendants that are not VMMs (helpers that should come and go)."""
    p = server_process(backend.server)
    if p is None:
        return 0
    with contextlib.suppress(psutil.Error):
        return sum(1 for c in p.children(recursive=True)
                   if not any(v in (c.name() or "") for v in ("qemu", "firecracker", "cloud-hyperv")))
    return 0


def sample(backend: Backend, listed: int) -> dict[str, float]:
    """One sample of every metric (blocking: run it in a thread)."""
    out: dict[str, float] = {"sandboxes_listed": listed, **server_sample(backend)}
    out["server_children"] = server_children(backend)
    out.update(data_root_usage(backend.data_root))
    out["network_slots"] = slots_of(backend.owner)
    out["vmm_processes"] = vmm_count(backend.data_root)
    out.update(orphans(claimed_indices()))
    out["owner_nft_tables"] = nft_tables(backend.owner)
    out.update(cgroups(backend.owner))
    return out


# -- fits ------------------------------------------------------------------------------------------


def fit(ts: list[float], ys: list[float]) -> dict[str, float]:
    """Least squares ``y = a + b t``: slope per hour, its standard error, the residuals' std."""
    n = len(ts)
    if n < 3:
        return {"n": n, "slope_per_h": float("nan"), "stderr_per_h": float("nan"), "resid_std": float("nan"),
                "window_h": 0.0}
    mt, my = sum(ts) / n, sum(ys) / n
    sxx = sum((t - mt) ** 2 for t in ts)
    if sxx == 0:
        return {"n": n, "slope_per_h": float("nan"), "stderr_per_h": float("nan"), "resid_std": float("nan"),
                "window_h": 0.0}
    b = sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / sxx
    a = my - b * mt
    ss = sum((y - a - b * t) ** 2 for t, y in zip(ts, ys))
    resid = math.sqrt(ss / (n - 2))
    se = resid / math.sqrt(sxx)
    return {"n": n, "slope_per_h": b * 3600, "stderr_per_h": se * 3600, "resid_std": resid,
            "window_h": (max(ts) - min(ts)) / 3600}


def direction(f: dict[str, float], tolerance: float) -> int:
    """+1 / -1 when the fit shows growth / shrinkage beyond noise and tolerance, else 0: the slope
    more than 3 standard errors from zero, and the growth it fits over the window more than the
    metric's tolerance and twice the residuals' spread (samples 10 s apart are not independent:
    how many sandboxes are alive at a sample carries over, so the standard error alone flatters)."""
    b, se = f["slope_per_h"], f["stderr_per_h"]
    if not (b == b) or f["n"] < 3:
        return 0
    if abs(b) <= 3 * se or abs(b) * f["window_h"] < max(tolerance, 2 * f["resid_std"]):
        return 0
    return 1 if b > 0 else -1


def verdict(whole: dict[str, float], second_half: dict[str, float], tolerance: float) -> str:
    d1, d2 = direction(whole, tolerance), direction(second_half, tolerance)
    if d1 == 0 and d2 == 0:
        return "flat"
    if d2 == 0:
        return "grew, then flat" if d1 > 0 else "shrank, then flat"
    if d1 == d2 or d1 == 0:
        return "grows" if d2 > 0 else "shrinks"
    return "noisy"


def correlation(xs: list[float], ys: list[float]) -> float:
    """Pearson's r of two series (NaN when either is constant or too short)."""
    n = len(xs)
    if n < 3:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def churn_rates(samples: list[dict[str, float]]) -> list[float]:
    """Sandboxes created and killed per minute between each sample and the one before it."""
    out = [0.0]
    for a, b in zip(samples, samples[1:]):
        dt = b["t"] - a["t"]
        out.append(60 * (b.get("cycles", 0) - a.get("cycles", 0)) / dt if dt > 0 else 0.0)
    return out


def analyse(samples: list[dict[str, float]], warmup_s: float) -> dict[str, dict[str, Any]]:
    """Per metric: start/end/max, the fits after the warm-up and over the second half, the verdict,
    and its correlation with the churn rate (what moves with the load is not what leaks)."""
    out: dict[str, dict[str, Any]] = {}
    end_t = samples[-1]["t"] if samples else 0.0
    rates = churn_rates(samples)
    for key in METRICS:
        pts = [(s["t"], float(s[key])) for s in samples if key in s]
        if not pts:
            continue
        after = [(t, y) for t, y in pts if t >= warmup_s] or pts
        half = [(t, y) for t, y in pts if t >= end_t / 2] or pts
        whole = fit([t for t, _ in after], [y for _, y in after])
        second = fit([t for t, _ in half], [y for _, y in half])
        out[key] = {"start": pts[0][1], "end": pts[-1][1], "max": max(y for _, y in pts),
                    "mean_after_warmup": sum(y for _, y in after) / len(after),
                    "fit_after_warmup": whole, "fit_second_half": second, "tolerance": TOLERANCE[key],
                    "verdict": verdict(whole, second, TOLERANCE[key]),
                    "r_with_churn_rate": correlation([r for r, s in zip(rates, samples) if key in s and s["t"] >= warmup_s],
                                                     [float(s[key]) for s in samples if key in s and s["t"] >= warmup_s])}
    return out


# -- the run ---------------------------------------------------------------------------------------


async def worker(w: Workload, run: Run, end: float, rounds: int, cycles: list[int], ids: set[str]) -> None:
    """Create, ``rounds`` rounds of calls, kill; until ``end`` (monotonic)."""
    while time.monotonic() < end:
        try:
            sbx = await create_admitted(w, run, timeout_s=900)
        except Exception:
            await asyncio.sleep(1.0)
            continue
        ids.add(sbx.sandbox_id)
        run.alive += 1
        me = uuid.uuid4().hex[:8]
        try:
            for i in range(rounds):
                await one_round(w, run, sbx, me, i)
        except SandboxLost:
            pass  # counted in run.lost; its failed call is an error
        finally:
            with contextlib.suppress(Exception):
                await timed(run, "kill", sbx.kill())
            run.alive -= 1
            cycles[0] += 1


async def listed(url: str) -> int:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            body = (await c.get("/sandboxes")).json()
            return len(body) if isinstance(body, list) else -1
    return -1


async def soak(backend: Backend, w: Workload, args: argparse.Namespace) -> dict[str, Any]:
    run = Run()
    run.all_created_at = 0.0
    samples: list[dict[str, float]] = []
    cycles = [0]
    ids: set[str] = set()
    end = time.monotonic() + args.duration_s
    workers = [asyncio.create_task(worker(w, run, end, args.rounds, cycles, ids)) for _ in range(args.concurrency)]
    last_print = 0.0
    try:
        while time.monotonic() < end:
            s = await asyncio.to_thread(sample, backend, await listed(backend.url))
            s.update({"t": round(run.now(), 1), "alive": run.alive, "cycles": cycles[0],
                      "errors": sum(1 for c in run.calls if c.error)})
            samples.append(s)
            if run.now() - last_print >= max(60.0, args.interval_s):
                last_print = run.now()
                print(f"t={s['t']:>6.0f}s cycles {cycles[0]} errors {s['errors']} fds {s.get('server_fds')} "
                      f"threads {s.get('server_threads')} rss {s.get('server_rss_mib', 0):.0f} MiB "
                      f"files {s['data_files']} slots {s['network_slots']} vmms {s['vmm_processes']}", flush=True)
            await asyncio.sleep(max(0.0, min(args.interval_s, end - time.monotonic())))
        await asyncio.gather(*workers)
    finally:
        for t in workers:
            t.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return {"run": run, "samples": samples, "cycles": cycles[0], "ids": ids}


def print_report(meta: dict[str, Any], data: dict[str, Any]) -> None:
    e = data["errors"]
    print(f"\nsoak: {meta['duration_s'] / 60:.1f} min of create/exec/kill churn, {meta['concurrency']} at once, "
          f"template {meta['template']} ({meta['accelerator'].upper()}), {meta['cpus']} cores; {data['cycles']} sandboxes "
          f"created and killed; calls {e['calls']}, errors {e['errors']} (rate {100 * e['error_rate']:.3f}%); "
          f"{len(data['timeline'])} samples every {meta['interval_s']:g} s, fits after {meta['warmup_s']:g} s")
    for k, v in e["by_class"].items():
        print(f"  error {k}: {v}")
    head = (f"{'metric':18} {'start':>9} {'end':>9} {'max':>9} {'slope/h':>10} {'+-':>8} {'2nd half/h':>11} "
            f"{'r(churn)':>8}  verdict")
    print(head)
    print("-" * len(head))
    for key, m in data["metrics"].items():
        a, b = m["fit_after_warmup"], m["fit_second_half"]
        print(f"{key:18} {m['start']:>9.1f} {m['end']:>9.1f} {m['max']:>9.1f} {a['slope_per_h']:>10.2f} "
              f"{a['stderr_per_h']:>8.2f} {b['slope_per_h']:>11.2f} {m.get('r_with_churn_rate', float('nan')):>8.2f}  "
              f"{m['verdict']}")
    lat = data["latency_ms"]
    print("latency (ms): " + ", ".join(f"{k} p50 {v['p50']:.0f} p99 {v['p99']:.0f}" for k, v in lat.items()
                                       if k in ("create", "command", "file", "kill")))
    print(f"log bytes: {data['log_bytes_start']} -> {data['log_bytes_end']}; left after the server stopped: {data['left_behind']}")


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.environ.get("TRENVX_CONFIG", DEFAULT_CONFIG))
    ap.add_argument("--template", default="default-sandbox")
    ap.add_argument("--duration-s", type=float, default=1800.0)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of calls per sandbox before it is killed")
    ap.add_argument("--think-s", type=float, default=0.2)
    ap.add_argument("--python-every", type=int, default=2)
    ap.add_argument("--interval-s", type=float, default=10.0)
    ap.add_argument("--warmup-s", type=float, default=300.0, help="samples before this are not fitted")
    ap.add_argument("--sdk", choices=("trenvx", "e2b"), default="trenvx")
    ap.add_argument("--hot", type=int, default=0, help="a hot pool of this many (default: none, every create cold)")
    ap.add_argument("--quick", action="store_true", help="CI: 40 s, 3 at once, a sample every 2 s, 8 s warm-up")
    ap.add_argument("--json", default="")
    ap.add_argument("--print", dest="print_json", default="", metavar="JSON",
                    help="print an earlier run's table, its verdicts computed again from its samples")
    args = ap.parse_args()
    if args.print_json:
        old = json.loads(Path(args.print_json).read_text())
        old["metrics"] = analyse(old["timeline"], old["meta"]["warmup_s"])
        print_report(old["meta"], old)
        return 0
    if args.quick:
        args.duration_s, args.concurrency, args.interval_s, args.warmup_s = 40.0, 3, 2.0, 8.0
    if args.concurrency < 1 or args.duration_s <= 0 or args.interval_s <= 0:
        ap.error("--concurrency must be at least 1, --duration-s and --interval-s positive")
    from load import own_backend

    try:
        backend = own_backend(args.config, args.template, "soak", max_sandboxes=args.concurrency + 2, hot=args.hot)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    meta = {**host_meta(backend), "duration_s": args.duration_s, "concurrency": args.concurrency, "rounds": args.rounds,
            "interval_s": args.interval_s, "warmup_s": args.warmup_s, "sdk": args.sdk, "hot_pool": args.hot,
            "data_root": str(backend.data_root), "owner": backend.owner}
    w = Workload(sdk=args.sdk, template=args.template, url=backend.url, think_s=args.think_s,
                 python_every=args.python_every, admit_s=120.0)
    netns_before = orphans(claimed_indices())
    try:
        await backend.server.start()
        print(f"== soak: {args.duration_s:.0f} s, {args.concurrency} at once, data_root {backend.data_root}", flush=True)
        result = await soak(backend, w, args)
        final = await asyncio.to_thread(sample, backend, await listed(backend.url))
    except BaseException:
        await backend.server.stop()
        if not backend.cleanup():
            print(f"sandbox directories were left in {backend.data_root}", file=sys.stderr)
        raise
    await backend.server.stop()
    run: Run = result["run"]
    samples = result["samples"]
    final["t"] = round(run.now(), 1)
    claims = claimed_indices()
    left = {"sandbox_dirs": len(backend.sandbox_dirs()), "network_slots": slots_of(backend.owner),
            "vmm_processes": vmm_count(backend.data_root), "owner_nft_tables": nft_tables(backend.owner),
            "owner_cgroups": cgroups(backend.owner)["owner_cgroups"],
            "orphan_netns": orphans(claims)["orphan_netns"] - netns_before["orphan_netns"],
            "orphan_host_ifs": orphans(claims)["orphan_host_ifs"] - netns_before["orphan_host_ifs"]}
    data = {
        "cycles": result["cycles"], "errors": error_summary(run.calls), "error_samples": run.error_samples,
        "refusals": dict(run.refusals), "sandboxes_lost": len(run.lost), "latency_ms": latency_table(run.calls),
        "metrics": analyse(samples, args.warmup_s),
        "log_bytes_start": samples[0]["log_bytes"] if samples else 0,
        "log_bytes_end": final["log_bytes"], "final_sample_before_stop": final,
        "left_behind": left, "timeline": samples,
    }
    print_report(meta, data)
    if not backend.cleanup():
        print(f"sandbox directories were left in {backend.data_root}")
    path = write_results("soak", {"benchmark": "soak", "meta": meta, **data}, args.json)
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cancellable(main))
