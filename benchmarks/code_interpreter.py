"""The code interpreter's first answer, with the kernel already running in the snapshot against a
kernel started after the restore, side by side in one run (issue 15).

    python benchmarks/code_interpreter.py [--config configs/example_config.toml] [-n 50] [--idle 5]
                                          [--baseline-every 5] [--hot 20]

One backend (``trenvx serve``, no pools: every create is a cold restore, a new VMM process), driven
through E2B's unmodified ``e2b_code_interpreter`` package. For each of ``-n`` rounds, a fresh
sandbox of ``code-interpreter`` per measurement:

- **trenvx** ``1+1``: create -> the first ``run_code("1+1")`` result (the kernel in the snapshot);
- **trenvx** chart: create -> the first matplotlib PNG (matplotlib imported in the snapshot too);
- **command**: create -> ``commands.run("true")`` answered: the issue's bar is the first result no
  later than this plus 100 ms;
- **baseline** ``1+1`` and chart: create -> a new context (a kernel started after the restore, as a
  platform without the kernel in its snapshot pays) -> its first result / PNG; in every
  ``--baseline-every``-th round (a kernel's start costs ~20 s of guest code under TCG, and its
  spread is small next to its size).

Then ``--idle`` sandboxes left idle for 10 s: host memory (PSS of each VMM process) per sandbox;
then ``--hot`` rounds on a backend with a hot pool of one code-interpreter VM (trenvx's default
setup keeps pools): each create waits for the pool to refill, untimed, and takes a pooled VM.
A table on stdout, JSON in benchmarks/results/. Every figure names the accelerator (TCG here:
guest code is 10-50x slower than under KVM, and a new kernel's imports are guest code).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from typing import Any

import httpx
import tomli_w

from _common import config_as_toml_data, pct, run_cancellable, solo_backend_config, summarize_rounds, summary, write_results  # benchmarks/ is on sys.path when run as a script
from start_latency import Server, solo_backend

from trenvx.config import PoolConfig

TEMPLATE = "code-interpreter"
MiB = 1 << 20
CHART = ("import matplotlib.pyplot as plt\nplt.figure(figsize=(4, 3), dpi=100)\n"
         "plt.plot([1, 2, 3], [1, 4, 9])\nplt.show()")


def paired_gap(rounds: list[dict[str, float]], q: float) -> float:
    """The q-th percentile of (first result - command) within each round, in ms: the two creates of
    a round run back to back, so host noise (other work on the 2 cores) hits both alike."""
    return pct([(r["trenvx_result"] - r["command"]) * 1000 for r in rounds], q)


def measure_round(before_create: Any = None, baseline: bool = True) -> dict[str, float]:
    """One of each measurement, each on a sandbox of its own (sync: the SDK is the user's);
    ``before_create`` runs before each (untimed: waiting for the pool to refill)."""
    from e2b_code_interpreter import Sandbox

    out: dict[str, float] = {}

    def timed(name: str, body: Any) -> None:
        if before_create is not None:
            before_create()
        t0 = time.perf_counter()
        sbx = Sandbox.create(TEMPLATE, timeout=300)
        try:
            body(sbx)
            out[name] = time.perf_counter() - t0
        finally:
            sbx.kill()

    def first_result(sbx: Any) -> None:
        if sbx.run_code("1+1").text != "2":
            raise RuntimeError("1+1 did not answer 2")

    def first_png(sbx: Any, context: Any = None) -> None:
        execution = sbx.run_code(CHART, context=context)
        if execution.error is not None or not any(r.png for r in execution.results):
            raise RuntimeError(f"no PNG: {execution.error or execution.results}")

    def command(sbx: Any) -> None:
        sbx.commands.run("true")

    def baseline_result(sbx: Any) -> None:
        ctx = sbx.create_code_context()
        if sbx.run_code("1+1", context=ctx).text != "2":
            raise RuntimeError("1+1 in a new context did not answer 2")

    def baseline_png(sbx: Any) -> None:
        first_png(sbx, sbx.create_code_context())

    timed("trenvx_result", first_result)
    timed("trenvx_png", first_png)
    timed("command", command)
    if baseline:
        timed("baseline_result", baseline_result)
        timed("baseline_png", baseline_png)
    return out


async def idle_memory(url: str, n: int) -> dict[str, float]:
    from e2b_code_interpreter import Sandbox

    boxes = [await asyncio.to_thread(Sandbox.create, TEMPLATE, timeout=300) for _ in range(n)]
    try:
        for b in boxes:
            await asyncio.to_thread(b.run_code, "1+1")  # touched once, as a user would
        await asyncio.sleep(10)
        pss = []
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            for b in boxes:
                info = (await c.get(f"/sandboxes/{b.sandbox_id}")).json().get("trenvx") or {}
                pss.append(float(info.get("pssBytes") or 0) / MiB)
        return {"n": n, "pss_mib_mean": sum(pss) / max(1, len(pss)), "pss_mib": pss}
    finally:
        for b in boxes:
            await asyncio.to_thread(b.kill)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.environ.get("TRENVX_CONFIG", "configs/example_config.toml"))
    ap.add_argument("-n", type=int, default=50, help="rounds (default 50)")
    ap.add_argument("--idle", type=int, default=5, help="idle sandboxes for the memory figure (default 5)")
    ap.add_argument("--baseline-every", type=int, default=5, help="the baseline in every K-th round (default 5)")
    ap.add_argument("--hot", type=int, default=20, help="then rounds with a hot pool of one (0: none); the "
                    "baseline is not repeated there")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    try:
        server, build, base = solo_backend(args.config, TEMPLATE, "ci-bench")
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    accel = build.manifest.machine.accelerator
    port = server.port
    work = server.config_path.parent
    rounds: list[dict[str, float]] = []
    hot_rounds: list[dict[str, float]] = []
    try:
        await server.start()
        for i in range(args.n):
            rounds.append(await asyncio.to_thread(measure_round, None, i % max(1, args.baseline_every) == 0))
            print(f"round {i + 1}/{args.n}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in rounds[-1].items()),
                  file=sys.stderr)
        memory = await idle_memory(server.url, args.idle) if args.idle else {}
    finally:
        await server.stop()
    if args.hot:
        hot = solo_backend_config(base, TEMPLATE, port, PoolConfig(templates=[TEMPLATE], warm_min=0, warm_max=0,
                                                                   hot_min=1, hot_max=1,
                                                                   hot_warmup_cmd=base.pool.hot_warmup_cmd))
        (work / "hot.toml").write_text(tomli_w.dumps(config_as_toml_data(hot)))
        server = Server(work / "hot.toml", port, work / "server-hot.log")
        loop = asyncio.get_running_loop()

        def pool_full() -> None:
            state = asyncio.run_coroutine_threadsafe(server.wait_pool(TEMPLATE, 300), loop).result()
            if state["ready_hot"] < 1:
                raise RuntimeError(f"the hot pool did not refill within 300 s: {state}")

        try:
            await server.start()
            for i in range(args.hot):
                hot_rounds.append(await asyncio.to_thread(measure_round, pool_full, False))
                print(f"hot round {i + 1}/{args.hot}: " + ", ".join(f"{k} {v * 1000:.0f} ms"
                                                                   for k, v in hot_rounds[-1].items()), file=sys.stderr)
        finally:
            await server.stop()

    cols = summarize_rounds(rounds)
    print(f"\ncode interpreter: template {TEMPLATE} ({build.manifest.machine.mem_mb} MiB guest), accelerator "
          f"{accel.upper()}, {os.cpu_count()} cores, {args.n} rounds, cold creates (no pools)")
    print(f"{'create ->':<40} {'n':>4} {'p50':>8} {'p99':>8}")
    labels = {
        "trenvx_result": "first 1+1 result (kernel in the snapshot)",
        "baseline_result": "first 1+1 result (kernel after restore)",
        "trenvx_png": "first PNG (kernel in the snapshot)",
        "baseline_png": "first PNG (kernel after restore)",
        "command": "commands.run('true') answered",
    }
    for key, label in labels.items():
        if key in cols:
            print(f"{label:<40} {cols[key]['n']:>4} {cols[key]['p50'] * 1000:>6.0f}ms {cols[key]['p99'] * 1000:>6.0f}ms")
    if cols:
        gap = (cols["trenvx_result"]["p50"] - cols["command"]["p50"]) * 1000
        print(f"first result - command round trip (p50): {gap:+.0f} ms (bar: <= +100 ms); "
              f"per round, paired: p50 {paired_gap(rounds, 50):+.0f} ms, p90 {paired_gap(rounds, 90):+.0f} ms")
    hot_cols = {k: summary([r[k] for r in hot_rounds]) for k in hot_rounds[0]} if hot_rounds else {}
    if hot_cols:
        print(f"with a hot pool ({args.hot} rounds; each create took a pooled VM, warmed with a silent cell):")
        for key in ("trenvx_result", "trenvx_png", "command"):
            print(f"  {labels[key]:<38} {hot_cols[key]['n']:>4} {hot_cols[key]['p50'] * 1000:>6.0f}ms "
                  f"{hot_cols[key]['p99'] * 1000:>6.0f}ms")
        gap = (hot_cols["trenvx_result"]["p50"] - hot_cols["command"]["p50"]) * 1000
        print(f"  first result - command round trip (p50): {gap:+.0f} ms (bar: <= +100 ms); "
              f"per round, paired: p50 {paired_gap(hot_rounds, 50):+.0f} ms, p90 {paired_gap(hot_rounds, 90):+.0f} ms")
    if memory:
        print(f"idle code-interpreter sandbox: {memory['pss_mib_mean']:.1f} MiB PSS each ({memory['n']} idle, 10 s)")
    out = {"benchmark": "code_interpreter", "template": TEMPLATE, "accelerator": accel, "host": platform.node(),
           "cores": os.cpu_count(), "rounds": rounds, "summary": cols, "hot_rounds": hot_rounds, "hot_summary": hot_cols,
           "paired_gap_ms": {"cold_p50": paired_gap(rounds, 50) if rounds else None,
                             "hot_p50": paired_gap(hot_rounds, 50) if hot_rounds else None},
           "idle_memory": memory,
           "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = write_results("code-interpreter", out, args.json)
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cancellable(main))
