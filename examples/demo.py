"""The main job, timed: create a sandbox, run TrEnv-X's hello world in it, print the timings, kill it.

    python examples/demo.py [--addr 127.0.0.1] [--port 5000] [--template default-sandbox]

Run by ``scripts/start.sh demo`` against the backend it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time

import httpx

from sandbox_sdk.sandbox import Sandbox

HELLO = "python -c \"print('Hello World')\""


async def wait_for_pool(url: str, template: str, timeout_s: float) -> float | None:
    """Seconds until ``/metrics`` shows a ready pooled VM of ``template`` (hot, or warm when the pool
    keeps no hot ones); None if none came (the create then takes the slower path)."""
    pattern = re.compile(rf'trenvx_pool_(ready|target){{template="{re.escape(template)}",tier="(hot|warm)"}} (\S+)')
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=5) as api:
        while time.perf_counter() - t0 < timeout_s:
            try:
                text = (await api.get("/metrics")).text
            except httpx.HTTPError:
                text = ""
            n = {(m.group(1), m.group(2)): float(m.group(3)) for m in pattern.finditer(text)}
            want = "hot" if n.get(("target", "hot"), 0) > 0 else "warm"
            if n.get(("ready", want), 0) >= 1:
                return time.perf_counter() - t0
            await asyncio.sleep(0.25)
    return None


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--addr", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--template", default="default-sandbox")
    ap.add_argument("--pool-wait", type=float, default=60.0,
                    help="seconds to wait for the backend's pool to hold a ready VM (0: don't)")
    args = ap.parse_args()

    waited = await wait_for_pool(f"http://{args.addr}:{args.port}", args.template, args.pool_wait)
    if waited is not None:
        print(f"(the backend's pool had a ready VM after {waited:.1f} s)")

    t0 = time.perf_counter()
    sandbox = await Sandbox.create(template=args.template, target_addr=args.addr, port=args.port)
    t_create = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        p = await sandbox.process.start(HELLO)
        await p.wait()
        t_hello = time.perf_counter() - t1
        print(p.stdout)
        t2 = time.perf_counter()
        again = await sandbox.process.start(HELLO)
        await again.wait()
        t_again = time.perf_counter() - t2
        async with httpx.AsyncClient(base_url=f"http://{args.addr}:{args.port}") as api:
            info = (await api.get(f"/sandboxes/{sandbox.id}")).json()
    finally:
        await sandbox.close()

    extra = info.get("trenvx", {})
    stages = extra.get("startTimes") or extra.get("start_times") or {}
    print(f"sandbox {sandbox.id} (template {args.template}, {extra.get('vmm', 'qemu')}"
          f"/{extra.get('accelerator', '?')})")
    print(f"  create -> ready (SDK call)           {t_create * 1000:8.1f} ms  (from the {extra.get('startSource', '?')} path)")
    if stages:
        print("    restore stages on the server:    " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()) + " ms")
    print(f"  first  python -c print('Hello World') {t_hello * 1000:8.1f} ms")
    print(f"  second python -c print('Hello World') {t_again * 1000:8.1f} ms")
    print(f"  total                                {(time.perf_counter() - t0) * 1000:8.1f} ms (sandbox killed)")


if __name__ == "__main__":
    asyncio.run(main())
