"""What a network slot costs: time to make one (the slot pool's refill rate), time to apply egress
rules to one (on the create path when a create carries rules), time to remove one, and memory.

    python benchmarks/network_slots.py [--config configs/example_config.toml] [-n 50] [--repeat 3]

Each round makes ``-n`` slots one after another through :class:`trenvx.network.slot.HostNetwork`
(namespace, veth pair, tap, addresses, nftables ruleset, DNS and egress-proxy sockets), loads a
rule set into each (``denyOut 0.0.0.0/0`` + an allowed CIDR + a domain), then removes them all. Memory
is the host's MemAvailable drop and the kernel's Slab growth with all slots present, per slot, and
this process's RSS growth (the sockets and asyncio servers of the slots' DNS and egress proxy).
Table on stdout, JSON in benchmarks/results/. Needs root; makes no VM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path

import psutil

from _common import pct, run_cancellable  # benchmarks/ is on sys.path when run as a script

from trenvx.config import load_config
from trenvx.network.mode import netns_unavailable
from trenvx.network.policy import EgressPolicy
from trenvx.network.slot import HostNetwork

RESULTS = Path(__file__).resolve().parent / "results"
RULES = EgressPolicy.from_e2b(allow_out=["198.51.100.7", "example.com"], deny_out=["0.0.0.0/0"])


def meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0]) * 1024
    return out


async def one_round(cfg, n: int) -> dict[str, float | list[float]]:  # noqa: ANN001
    net = HostNetwork(cfg.network.model_copy(update={"slot_pool": 0}), cfg.data_root, owner=f"bench_{os.getpid()}")
    await net.start(sweep=False)
    me = psutil.Process()
    before, rss0 = meminfo(), me.memory_info().rss
    make, rules, remove = [], [], []
    slots = []
    try:
        t_all = time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            slots.append(await net.acquire())
            make.append(time.perf_counter() - t)
        made_in = time.perf_counter() - t_all
        for s in slots:
            t = time.perf_counter()
            await s.apply(RULES)
            rules.append(time.perf_counter() - t)
        await asyncio.sleep(0.5)
        after, rss1 = meminfo(), me.memory_info().rss
    finally:
        for s in slots:
            t = time.perf_counter()
            await net.release(s)
            remove.append(time.perf_counter() - t)
        await net.close()
    return {
        "make_s": make, "rules_s": rules, "remove_s": remove, "slots_per_s": n / made_in,
        "memavailable_drop_kib_per_slot": (before["MemAvailable"] - after["MemAvailable"]) / n / 1024,
        "slab_kib_per_slot": (after["Slab"] - before["Slab"]) / n / 1024,
        "server_rss_kib_per_slot": (rss1 - rss0) / n / 1024,
    }


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.environ.get("TRENVX_CONFIG", "configs/example_config.toml"))
    ap.add_argument("-n", type=int, default=50, help="slots per round (default 50)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if why := netns_unavailable():
        print(f"network slots are not available here: {why}")
        return 2
    cfg = load_config(args.config)
    rounds = [await one_round(cfg, args.n) for _ in range(args.repeat)]
    ms = lambda key: [x * 1000 for r in rounds for x in r[key]]  # noqa: E731
    print(f"network slots: {args.n} per round x {args.repeat} rounds ({platform.node()}, {os.cpu_count()} cores, "
          f"kernel {platform.release()})")
    print(f"{'step':26} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for label, key in (("make a slot", "make_s"), ("load egress rules", "rules_s"), ("remove a slot", "remove_s")):
        xs = ms(key)
        print(f"{label:26} {pct(xs, 50):8.1f} {pct(xs, 95):8.1f} {pct(xs, 99):8.1f} {max(xs):8.1f}")
    rate = [r["slots_per_s"] for r in rounds]
    print(f"refill rate (one at a time): {pct(rate, 50):.1f} slots/s (rounds: {', '.join(f'{x:.1f}' for x in rate)})")
    for key, label in (("memavailable_drop_kib_per_slot", "host MemAvailable drop"), ("slab_kib_per_slot", "kernel slab"),
                       ("server_rss_kib_per_slot", "server RSS")):
        xs = [float(r[key]) for r in rounds]  # type: ignore[arg-type]
        print(f"memory per slot, {label}: {pct(xs, 50):.0f} KiB (rounds: {', '.join(f'{x:.0f}' for x in xs)})")
    out = Path(args.json) if args.json else RESULTS / f"network-slots-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n": args.n, "repeat": args.repeat, "rounds": rounds}, indent=2))
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cancellable(main))
