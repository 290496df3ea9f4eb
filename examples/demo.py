"""The main job, timed: create a sandbox, run TrEnv-X's hello world in it, print the timings, kill it.

    python examples/demo.py [--addr 127.0.0.1] [--port 5000] [--template default-sandbox]

Run by ``scripts/start.sh demo`` against the backend it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx

from sandbox_sdk.sandbox import Sandbox

HELLO = "python -c \"print('Hello World')\""


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--addr", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--template", default="default-sandbox")
    args = ap.parse_args()

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
    print(f"  create -> ready (SDK call)           {t_create * 1000:8.1f} ms")
    if stages:
        print("    restore stages on the server:    " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()) + " ms")
    print(f"  first  python -c print('Hello World') {t_hello * 1000:8.1f} ms")
    print(f"  second python -c print('Hello World') {t_again * 1000:8.1f} ms")
    print(f"  total                                {(time.perf_counter() - t0) * 1000:8.1f} ms (sandbox killed)")


if __name__ == "__main__":
    asyncio.run(main())
