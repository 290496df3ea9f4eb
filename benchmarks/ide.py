"""The web IDE's first page, with the IDE server already running in the snapshot, against an IDE
server started after the restore, side by side in one run (issue 16).

    python benchmarks/ide.py [--config configs/example_config.toml] [-n 20] [--idle 3]

One backend (``trenvx serve``, no pools: every create is a cold restore, a new VMM process). For
each of ``-n`` rounds, a fresh ``claude-code`` sandbox per measurement, opened in Debian's
``chromium`` (headless, driven by Playwright with ``executable_path``: no browser download):

- **trenvx**: create -> the VS Code workbench visible (``.monaco-workbench``) at the sandbox's
  port 8080, where code-server runs since before the snapshot;
- **baseline**: create -> a second code-server started in the sandbox (port 8081, as the
  template's: same binary, same settings) -> its workbench visible: what a platform pays that
  starts the IDE after the restore.

Then ``--idle`` sandboxes with the IDE open once and left idle for 10 s: host memory (PSS of each
VMM process) per sandbox. A table on stdout, JSON in benchmarks/results/. Every figure names the
accelerator (TCG here: guest code is 10-50x slower than under KVM, and code-server is Node).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from _common import run_cancellable, summarize_rounds, write_results  # benchmarks/ is on sys.path when run as a script
from start_latency import solo_backend


TEMPLATE = "claude-code"
IDE_PORT = 8080
BASELINE_PORT = 8081
WORKSPACE = "/home/user/workspace"
CHROMIUM = os.environ.get("TRENVX_CHROMIUM", "/usr/bin/chromium")
MiB = 1 << 20
WORKBENCH_TIMEOUT_MS = 300_000
BASELINE_CMD = (
    f"nohup code-server --bind-addr 0.0.0.0:{BASELINE_PORT} --auth none --disable-telemetry "
    f"--disable-update-check {WORKSPACE} > /tmp/code-server-{BASELINE_PORT}.log 2>&1 &"
)


def ide_url(sbx: Any, port: int) -> str:
    return f"http://{sbx.get_host(port)}/?folder={WORKSPACE}"


def workbench_visible(browser: Any, url: str) -> None:
    """Open ``url`` in a fresh browser context and wait for VS Code's workbench. Until code-server
    listens the proxy answers 502: the page is loaded again until it does."""
    context = browser.new_context()
    try:
        page = context.new_page()
        deadline = time.monotonic() + WORKBENCH_TIMEOUT_MS / 1000
        while True:
            response = page.goto(url, wait_until="commit", timeout=WORKBENCH_TIMEOUT_MS)
            if response is not None and response.status < 500:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} answered {response.status if response else 'nothing'} until the deadline")
            time.sleep(0.1)
        page.wait_for_selector(".monaco-workbench", state="visible", timeout=WORKBENCH_TIMEOUT_MS)
    finally:
        context.close()


def measure_round(browser: Any, baseline: bool) -> dict[str, float]:
    from e2b import Sandbox

    out: dict[str, float] = {}
    t0 = time.perf_counter()
    sbx = Sandbox.create(TEMPLATE, timeout=600)
    try:
        workbench_visible(browser, ide_url(sbx, IDE_PORT))
        out["trenvx"] = time.perf_counter() - t0
    finally:
        sbx.kill()
    if baseline:
        t0 = time.perf_counter()
        sbx = Sandbox.create(TEMPLATE, timeout=600)
        try:
            sbx.commands.run(BASELINE_CMD, user="user", timeout=60)
            workbench_visible(browser, ide_url(sbx, BASELINE_PORT))
            out["baseline"] = time.perf_counter() - t0
        finally:
            sbx.kill()
    return out


def idle_memory(browser: Any, url: str, n: int) -> dict[str, Any]:
    from e2b import Sandbox

    boxes = [Sandbox.create(TEMPLATE, timeout=600) for _ in range(n)]
    try:
        for b in boxes:
            workbench_visible(browser, ide_url(b, IDE_PORT))  # opened once, as a user would
        time.sleep(10)
        pss = []
        with httpx.Client(base_url=url, timeout=30) as c:
            for b in boxes:
                info = c.get(f"/sandboxes/{b.sandbox_id}").json().get("trenvx") or {}
                pss.append(float(info.get("pssBytes") or 0) / MiB)
        return {"n": n, "pss_mib_mean": sum(pss) / max(1, len(pss)), "pss_mib": pss}
    finally:
        for b in boxes:
            b.kill()


def run_rounds(args: argparse.Namespace, url: str) -> tuple[list[dict[str, float]], dict[str, Any]]:
    from playwright.sync_api import sync_playwright

    rounds: list[dict[str, float]] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            for i in range(args.n):
                rounds.append(measure_round(browser, i % max(1, args.baseline_every) == 0))
                print(f"round {i + 1}/{args.n}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in rounds[-1].items()),
                      file=sys.stderr)
            memory = idle_memory(browser, url, args.idle) if args.idle else {}
        finally:
            browser.close()
    return rounds, memory


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.environ.get("TRENVX_CONFIG", "configs/example_config.toml"))
    ap.add_argument("-n", type=int, default=20, help="rounds (default 20)")
    ap.add_argument("--baseline-every", type=int, default=1, help="the baseline in every K-th round (default 1)")
    ap.add_argument("--idle", type=int, default=3, help="idle sandboxes for the memory figure (default 3)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} not found: install Debian's chromium (scripts/start.sh setup does) or set "
              "TRENVX_CHROMIUM", file=sys.stderr)
        return 2
    try:
        server, build, base = solo_backend(args.config, TEMPLATE, "ide-bench")
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    accel = build.manifest.machine.accelerator
    port = server.port
    os.environ["E2B_DOMAIN"] = f"localhost:{port}"
    try:
        await server.start()
        rounds, memory = await asyncio.to_thread(run_rounds, args, server.url)
    finally:
        await server.stop()

    cols = summarize_rounds(rounds)
    print(f"\nweb IDE: template {TEMPLATE} ({build.manifest.machine.vcpu} vCPU, {build.manifest.machine.mem_mb} MiB "
          f"guest), accelerator {accel.upper()}, {os.cpu_count()} cores, {args.n} rounds, cold creates (no pools)")
    print(f"{'create -> workbench visible in chromium':<46} {'n':>4} {'p50':>8} {'p99':>8}")
    labels = {"trenvx": "IDE server in the snapshot", "baseline": "IDE server started after the restore"}
    for key, label in labels.items():
        if key in cols:
            print(f"{label:<46} {cols[key]['n']:>4} {cols[key]['p50']:>7.2f}s {cols[key]['p99']:>7.2f}s")
    if memory:
        print(f"idle claude-code sandbox (IDE opened once): {memory['pss_mib_mean']:.1f} MiB PSS each "
              f"({memory['n']} idle, 10 s)")
    out = {"benchmark": "ide", "template": TEMPLATE, "accelerator": accel, "host": platform.node(),
           "cores": os.cpu_count(), "rounds": rounds, "summary": cols, "idle_memory": memory,
           "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = write_results("ide", out, args.json)
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cancellable(main))
