"""The cluster's control plane alone (issue 17): creates per second through the API, placement and
routing latency, etcd traffic per create, the idle load of N nodes, and a list at 10,000 sandboxes,
with up to 100 nodes and no VM at all, on one machine.

    python benchmarks/cluster.py [--nodes 3,10,30,100] [--sandboxes 1000,10000] [--real 4]
                                 [--concurrency 16] [--json FILE]
    python benchmarks/cluster.py --short          # 3 real + 10 simulated nodes, 300 sandboxes, < 60 s

**What is real.** etcd: a real 3-member cluster on loopback (``LocalEtcdCluster``; a fresh one for
each node count). Every node is the real trenvx node, ``create_app`` with its ClusterRouter,
ClusterNode, EtcdClient (etcd's JSON gateway) and SandboxManager, its reaper, metrics sampler,
lease renewal and refresh loops, served by uvicorn; everything between the client, the nodes and
etcd is real HTTP on loopback. **What is a stand-in.** The VMM under the manager
(``benchmarks/cluster_standin.py``): a create "restores" at once (a directory, no process, no
network, no guest), and every sandbox port leads to one tiny HTTP responder per process.
**What is simulated.** ``--real`` nodes (the front nodes the client talks to, and owners like any
other) are each their own process, as ``trenvx serve`` is; the remaining nodes of a count are
*simulated*: the same full node, but served many to a process (up to ``--sim-per-process``, one
event loop, one port per node), so they share that process's CPU. Each simulated node still has
its own lease, node record, EtcdClient, watch and loops, and its sandboxes' entries, all written
by the real code; a simulated host starved of CPU runs its loops late (each checkpoint reports the
nodes still registered and any lease that expired).
This machine runs etcd, every node and the client on the same cores: rates are what one small
machine sustains for everything at once, so the CPU each part spent per create is reported too.

For each node count N, sandboxes are created through the front nodes (POST /sandboxes, placed
over all N nodes, ``--concurrency`` at a time) up to each count of ``--sandboxes``; at each count:

- **creates**: creates/s (over the batch, and in ``--windows`` consecutive windows), latency as the
  client sees it, the stand-in's own time (the owner's route: ``X-Bench-Standin-Us``), and
  *outside* = latency - stand-in (placement, the hop to the owner, writing the entry, HTTP); then
  ``--sequential`` creates one at a time (latency with no queueing);
- **placement**: what the front node spends choosing, per create: its store check
  (``check_store``: one etcd read, where the node has it) + ``live_nodes()`` (its copy of the node
  records, read from etcd when it has to) + ``candidates()``, timed around those calls inside the
  node process (wrappers installed by the stand-in host; nothing in src/ changed), and how many
  creates had to read the records from etcd;
- **entry write**: the owner's ``sync`` that writes the new sandbox's entry before the answer leaves;
- **etcd traffic per create**: requests and bytes from every node's ``EtcdClient.stats`` over the
  batch, divided by its creates, per gateway call (puts: the entries and node records written), and
  the bytes of the streams (the nodes' watches: each entry or record written reaches all N nodes);
  the nodes' time-driven traffic (renewals, refreshes) falls in the batch too (in the JSON, an
  estimate net of the idle rate, which is only that: those loops slow down under load);
- **idle**: etcd requests and bytes per second of the N nodes doing nothing (lease renewals,
  record and entry refreshes, node-list reads or watches), per call, per node (real and simulated);
- **routing**: GET /sandboxes/{id} through a front node that does not own the sandbox (first
  request: owner looked up in etcd; again: remembered) vs through its owner, and a proxied request
  (``E2b-Sandbox-Id``/``-Port`` headers) both ways; the answer must come from the owner;
- **list**: GET /v2/sandboxes?limit=100 through a front node.

A no-cluster baseline (one node, no etcd, same stand-in) comes first: its create and GET latency.
Table on stdout, JSON in benchmarks/results/cluster-<time>.json (or ``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from _common import run_cancellable, summary, write_results  # benchmarks/ is on sys.path when run as a script

from trenvx.cluster.etcd import EtcdClient
from trenvx.cluster.etcd_local import ETCD_BIN, LocalEtcdCluster

STANDIN = Path(__file__).resolve().parent / "cluster_standin.py"
TEMPLATE = "standin"
CREATE_BODY = {"templateID": TEMPLATE, "timeout": 3600}
LEASE_EXPIRED = "expired (etcd was out of reach"
"""What a node logs when it finds its lease gone (ClusterNode._renew_loop) and registers again."""
PORT = "8080"
"""The sandbox port of the proxied request (every stand-in port answers ``ok``)."""
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the benchmark's main thread dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def ms(s: dict[str, float]) -> dict[str, float]:
    """A :func:`summary` in seconds, in milliseconds."""
    return {k: (v * 1000 if k != "n" else v) for k, v in s.items()}


def sms(xs: list[float]) -> dict[str, float]:
    return ms(summary(xs))


# -- node hosts --------------------------------------------------------------------------------

@dataclass
class Host:
    """One node-host process (benchmarks/cluster_standin.py): ``kind`` real (one node), simulated
    (many) or solo (one node, no cluster)."""

    kind: str
    proc: subprocess.Popen[bytes]
    log: Path
    ready_file: Path
    data_roots: list[Path]
    ready: dict[str, Any] = field(default_factory=dict)

    @property
    def control(self) -> str:
        return f"http://127.0.0.1:{self.ready['control_port']}"

    @property
    def urls(self) -> dict[str, str]:
        return {name: f"http://127.0.0.1:{port}" for name, port in self.ready["nodes"].items()}

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(no log)"


def start_host(work: Path, kind: str, names: list[str], etcd_url: str, prefix: str, args: argparse.Namespace) -> Host:
    """Start a node host serving ``names`` (returns at once; :func:`wait_ready` waits for it)."""
    tag = names[0] if len(names) == 1 else f"{kind}-{names[0]}-{names[-1]}"
    d = work / tag
    d.mkdir(parents=True)
    roots = [d / n for n in names]
    spec = {"etcd": etcd_url, "prefix": prefix, "lease_ttl_s": args.lease_ttl, "candidates": args.candidates,
            "max_sandboxes": args.max_sandboxes, "ready_file": str(d / "ready.json"),
            "nodes": [{"name": n, "data_root": str(r)} for n, r in zip(names, roots)]}
    (d / "spec.json").write_text(json.dumps(spec))
    log = d / "host.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(STANDIN), str(d / "spec.json")], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent, close_fds=True)
    return Host(kind, proc, log, d / "ready.json", roots)


async def wait_ready(hosts: list[Host], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for h in hosts:
        while not h.ready_file.exists():
            if h.proc.poll() is not None:
                raise RuntimeError(f"node host {h.log.parent.name} exited ({h.proc.returncode}); {h.log} ends:\n"
                                   f"{h.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"node host {h.log.parent.name} not ready after {timeout_s:.0f} s; {h.log} ends:\n"
                                   f"{h.log_tail()}")
            await asyncio.sleep(0.1)
        h.ready = json.loads(h.ready_file.read_text())


def stop_hosts(hosts: list[Host]) -> None:
    """SIGTERM (each node revokes its lease and the process exits), SIGKILL after 15 s; reaped,
    data roots removed."""
    for h in hosts:
        if h.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                h.proc.send_signal(signal.SIGTERM)
    for h in hosts:
        try:
            h.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                h.proc.kill()
            h.proc.wait(timeout=15)
        for r in h.data_roots:
            shutil.rmtree(r, ignore_errors=True)


# -- measurements --------------------------------------------------------------------------------

@dataclass
class Snapshot:
    """The nodes' etcd traffic (summed), their timings, and CPU seconds per part, at one moment."""

    t: float
    requests: int
    sent: int
    received: int
    by_call: dict[str, int]
    bytes_by_call: dict[str, int]
    node_traffic: dict[str, tuple[str, int, int]]
    """Node -> (its host's kind, etcd requests, bytes)."""
    sandboxes: dict[str, int]
    timings: dict[str, list[Any]]
    cpu: dict[str, float]


class Cpu:
    """CPU seconds (user + system) of the benchmark's parts: etcd, real nodes, simulated nodes, client."""

    def __init__(self) -> None:
        self.parts: dict[str, list[psutil.Process]] = {}

    def add(self, part: str, pid: int | None) -> None:
        if pid:
            with contextlib.suppress(psutil.Error):
                self.parts.setdefault(part, []).append(psutil.Process(pid))

    def read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for part, procs in self.parts.items():
            total = 0.0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
            out[part] = total
        return out


async def snapshot(client: httpx.AsyncClient, hosts: list[Host], cpu: Cpu, drain: bool = False) -> Snapshot:
    answers = await asyncio.gather(*(client.request("POST" if drain else "GET",
                                                    h.control + ("/drain" if drain else "/stats")) for h in hosts))
    snap = Snapshot(time.perf_counter(), 0, 0, 0, {}, {}, {}, {}, {"placement": [], "standin": [], "entry_write": []},
                    cpu.read())
    for h, r in zip(hosts, answers):
        r.raise_for_status()
        data = r.json()
        for name, n in data["nodes"].items():
            snap.sandboxes[name] = n["sandboxes"]
            e = n.get("etcd")
            if e:
                snap.node_traffic[name] = (h.kind, e["requests"], e["bytes_sent"] + e["bytes_received"])
                snap.requests += e["requests"]
                snap.sent += e["bytes_sent"]
                snap.received += e["bytes_received"]
                for k, v in e["by_call"].items():
                    snap.by_call[k] = snap.by_call.get(k, 0) + v
                for k, (sent, received) in e.get("bytes_by_call", {}).items():
                    snap.bytes_by_call[k] = snap.bytes_by_call.get(k, 0) + sent + received
        for k, v in data["timings"].items():
            if k == "placement" and h.kind != "real":
                continue  # only the front nodes place
            snap.timings[k].extend(v)
    return snap


STREAMS = "streams (watch, keepalive)"
"""The bytes of the streamed calls: every node's watch of the sandbox entries (each entry written
reaches every node) and lease keepalives; the rest of the total is the unary calls'."""


def traffic(a: Snapshot, b: Snapshot) -> dict[str, Any]:
    total = b.sent - a.sent + b.received - a.received
    by_bytes = {k: v - a.bytes_by_call.get(k, 0) for k, v in sorted(b.bytes_by_call.items())
                if v - a.bytes_by_call.get(k, 0)}
    by_bytes[STREAMS] = total - sum(by_bytes.values())
    return {"requests": b.requests - a.requests, "bytes_sent": b.sent - a.sent,
            "bytes_received": b.received - a.received,
            "by_call": {k: v - a.by_call.get(k, 0) for k, v in sorted(b.by_call.items()) if v - a.by_call.get(k, 0)},
            "bytes_by_call": by_bytes}


def cpu_delta(a: Snapshot, b: Snapshot) -> dict[str, float]:
    return {k: round(b.cpu.get(k, 0.0) - a.cpu.get(k, 0.0), 3) for k in b.cpu}


@dataclass
class Created:
    ok: bool
    status: int
    latency: float
    standin: float
    node: str
    sid: str
    done: float
    error: str = ""


async def create_one(client: httpx.AsyncClient, front: str) -> Created:
    t0 = time.perf_counter()
    try:
        r = await client.post(front + "/sandboxes", json=CREATE_BODY)
    except httpx.HTTPError as e:
        return Created(False, 0, time.perf_counter() - t0, float("nan"), "", "", time.perf_counter(),
                       f"{type(e).__name__}: {e}")
    dt_s = time.perf_counter() - t0
    ok = r.status_code == 201
    standin = int(r.headers.get("x-bench-standin-us", "-1")) / 1e6
    return Created(ok, r.status_code, dt_s, standin if standin >= 0 else float("nan"), r.headers.get("x-bench-node", ""),
                   r.json().get("sandboxID", "") if ok else "", time.perf_counter(), "" if ok else r.text[:300])


async def create_many(client: httpx.AsyncClient, fronts: list[str], count: int, concurrency: int,
                      budget_s: float) -> tuple[list[Created], float, bool]:
    """``count`` creates, ``concurrency`` at a time, round robin over ``fronts``; stops starting
    new ones after ``budget_s``. (results in completion order, seconds, whether it stopped early)."""
    results: list[Created] = []
    next_i = 0
    t0 = time.perf_counter()
    deadline = t0 + budget_s

    async def worker() -> None:
        nonlocal next_i
        while next_i < count and time.perf_counter() < deadline:
            i = next_i
            next_i += 1
            results.append(await create_one(client, fronts[i % len(fronts)]))

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, count)))))
    return results, time.perf_counter() - t0, next_i < count


def rate_windows(results: list[Created], started: float, windows: int) -> list[float]:
    """Creates/s in ``windows`` consecutive slices of the batch (by completion)."""
    ok = sorted(r.done for r in results if r.ok)
    if not ok:
        return []
    size = max(1, len(ok) // max(1, windows))
    out, prev = [], started
    for i in range(size - 1, len(ok), size):
        span = ok[i] - prev
        out.append(size / span if span > 0 else float("nan"))
        prev = ok[i]
    return out


def create_stats(results: list[Created]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = f"{r.status} {r.error[:120]}"
            errors[key] = errors.get(key, 0) + 1
    return {"ok": len(ok), "failed": len(results) - len(ok), "errors": errors,
            "latency_ms": sms([r.latency for r in ok]),
            "standin_ms": sms([r.standin for r in ok if r.standin == r.standin]),
            "outside_ms": sms([r.latency - r.standin for r in ok if r.standin == r.standin])}


async def timed_get(client: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None
                    ) -> tuple[float, httpx.Response | None]:
    t0 = time.perf_counter()
    try:
        r = await client.get(url, headers=headers)
    except httpx.HTTPError:
        return time.perf_counter() - t0, None
    return time.perf_counter() - t0, r


async def routing(client: httpx.AsyncClient, created: list[tuple[str, str]], urls: dict[str, str],
                  fronts: list[str], samples: int, rng: random.Random) -> dict[str, Any]:
    """GET and a proxied request of sampled sandboxes through a front node that does not own
    them (first and second time) and through their owner; wrong answers counted."""
    got: dict[str, list[float]] = {k: [] for k in ("get_owner", "get_other_first", "get_other_again",
                                                 "proxy_owner", "proxy_other")}
    hop: list[float] = []
    proxy_hop: list[float] = []
    wrong: dict[str, int] = {}
    picked = rng.sample(created, min(samples, len(created)))
    for sid, owner in picked:
        others = [f for f in fronts if f != owner]
        if not others:
            continue
        other = rng.choice(others)
        proxy_headers = {"e2b-sandbox-id": sid, "e2b-sandbox-port": PORT}
        plan = [("get_other_first", other, None), ("get_other_again", other, None), ("get_owner", owner, None),
                ("proxy_other", other, proxy_headers), ("proxy_owner", owner, proxy_headers)]
        this: dict[str, float] = {}
        for kind, node, headers in plan:
            url = urls[node] + (f"/sandboxes/{sid}" if headers is None else "/hello")
            took, r = await timed_get(client, url, headers)
            if r is None or r.status_code != 200:
                wrong[kind] = wrong.get(kind, 0) + 1
                continue
            if headers is None and r.headers.get("x-bench-node") != owner:
                wrong[kind + " (not the owner)"] = wrong.get(kind + " (not the owner)", 0) + 1
                continue
            if headers is not None and r.text != "ok":
                wrong[kind] = wrong.get(kind, 0) + 1
                continue
            got[kind].append(took)
            this[kind] = took
        if "get_other_again" in this and "get_owner" in this:
            hop.append(this["get_other_again"] - this["get_owner"])
        if "proxy_other" in this and "proxy_owner" in this:
            proxy_hop.append(this["proxy_other"] - this["proxy_owner"])
    out: dict[str, Any] = {f"{k}_ms": sms(v) for k, v in got.items()}
    out["hop_ms"] = sms(hop)
    out["proxy_hop_ms"] = sms(proxy_hop)
    out["wrong"] = wrong
    return out


async def list_latency(client: httpx.AsyncClient, fronts: list[str], urls: dict[str, str], repeats: int,
                       expected: int) -> dict[str, Any]:
    lat, wrong = [], 0
    for i in range(repeats):
        took, r = await timed_get(client, urls[fronts[i % len(fronts)]] + "/v2/sandboxes?limit=100")
        if r is None or r.status_code != 200 or len(r.json()) != min(100, expected):
            wrong += 1
            continue
        lat.append(took)
    return {"latency_ms": sms(lat), "wrong": wrong}


async def idle(client: httpx.AsyncClient, hosts: list[Host], cpu: Cpu, seconds: float, nodes: int) -> dict[str, Any]:
    """The etcd traffic and CPU of the nodes doing nothing for ``seconds``."""
    a = await snapshot(client, hosts, cpu)
    await asyncio.sleep(seconds)
    b = await snapshot(client, hosts, cpu)
    span = b.t - a.t
    t = traffic(a, b)
    per_kind: dict[str, dict[str, float]] = {}
    for kind in ("real", "simulated"):
        names = [k for k, v in b.node_traffic.items() if v[0] == kind and k in a.node_traffic]
        if names:
            per_kind[kind] = {
                "nodes": len(names),
                "requests_per_s_per_node": sum(b.node_traffic[k][1] - a.node_traffic[k][1] for k in names) / span / len(names),
                "bytes_per_s_per_node": sum(b.node_traffic[k][2] - a.node_traffic[k][2] for k in names) / span / len(names)}
    return {"window_s": round(span, 2), "requests_per_s": t["requests"] / span,
            "per_node_by_kind": per_kind,
            "bytes_per_s": (t["bytes_sent"] + t["bytes_received"]) / span,
            "requests_per_s_per_node": t["requests"] / span / nodes,
            "by_call_per_s": {k: v / span for k, v in t["by_call"].items()},
            "bytes_by_call_per_s": {k: v / span for k, v in t["bytes_by_call"].items()},
            "cpu_pct": {k: round(100 * v / span, 1) for k, v in cpu_delta(a, b).items()}}


# -- one cluster size ----------------------------------------------------------------------------

async def create_phase(client: httpx.AsyncClient, hosts: list[Host], cpu: Cpu, fronts: list[str],
                       urls: dict[str, str], kinds: dict[str, str], count: int, args: argparse.Namespace,
                       idle_before: dict[str, Any]) -> tuple[dict[str, Any], list[Created], bool]:
    before = await snapshot(client, hosts, cpu, drain=True)
    started = time.perf_counter()
    results, seconds, stopped = await create_many(client, [urls[f] for f in fronts], count, args.concurrency,
                                                  args.batch_budget)
    after = await snapshot(client, hosts, cpu, drain=True)
    seq, _, _ = await create_many(client, [urls[f] for f in fronts], 0 if stopped else args.sequential, 1, 60)
    after_seq = await snapshot(client, hosts, cpu, drain=True)
    ok = sum(r.ok for r in results)
    t = traffic(before, after)
    span = after.t - before.t
    idle_req = idle_before["requests_per_s"] * span
    idle_bytes = idle_before["bytes_per_s"] * span
    placement = after.timings["placement"]
    owners: dict[str, int] = {}
    by_kind: dict[str, list[float]] = {}
    for r in results:
        if r.ok:
            owners[r.node] = owners.get(r.node, 0) + 1
            by_kind.setdefault(kinds.get(r.node, "?"), []).append(r.latency)
    windows = rate_windows(results, started, args.windows)
    out: dict[str, Any] = {
        "requested": count, "seconds": round(seconds, 3), "stopped_early": stopped,
        "creates_per_s": ok / seconds if seconds > 0 else float("nan"),
        "rate_windows": [round(x, 1) for x in windows], "rate_windows_summary": summary(windows),
        **create_stats(results),
        "placement_ms": sms([p[0] + p[1] + p[2] for p in placement if p[1] == p[1]]),
        "placement_check_store_ms": sms([p[0] for p in placement if p[0]]),
        "placement_read_ms": sms([p[1] for p in placement if p[1] == p[1]]),
        "placement_candidates_ms": sms([p[2] for p in placement]),
        "placement_etcd_reads": sum(1 for p in placement if p[3]),
        "entry_write_ms": sms(after.timings["entry_write"]),
        "spread": {"nodes_used": len(owners), "max_per_node": max(owners.values(), default=0),
                   "min_per_node": min(owners.values(), default=0),
                   "on_kind": {k: len(v) for k, v in sorted(by_kind.items())}},
        "latency_ms_by_owner_kind": {k: sms(v) for k, v in sorted(by_kind.items())},
        "etcd_per_create": {
            "requests": t["requests"] / ok if ok else float("nan"),
            "bytes": (t["bytes_sent"] + t["bytes_received"]) / ok if ok else float("nan"),
            # minus the idle rate measured before the batch: an estimate only, as the nodes' time-driven
            # loops (node-list reads) slow down when creates take the CPU (it can go below 0 then)
            "requests_net_of_idle": (t["requests"] - idle_req) / ok if ok else float("nan"),
            "bytes_net_of_idle": (t["bytes_sent"] + t["bytes_received"] - idle_bytes) / ok if ok else float("nan"),
            "by_call": {k: round(v / ok, 3) for k, v in t["by_call"].items()} if ok else {},
            "bytes_by_call": {k: round(v / ok) for k, v in t["bytes_by_call"].items()} if ok else {},
        },
        "cpu_ms_per_create": {k: round(1000 * v / ok, 3) for k, v in cpu_delta(before, after).items()} if ok else {},
        "cpu_pct": {k: round(100 * v / span, 1) for k, v in cpu_delta(before, after).items()},
        "sequential": {**create_stats(seq), "placement_ms": sms([p[0] + p[1] + p[2] for p in after_seq.timings["placement"]
                                                                 if p[1] == p[1]]),
                       "entry_write_ms": sms(after_seq.timings["entry_write"])},
    }
    return out, results + seq, stopped


async def run_cluster(client: httpx.AsyncClient, work: Path, n: int, args: argparse.Namespace,
                      rng: random.Random) -> dict[str, Any]:
    """N nodes (``--real`` of them real, the rest simulated) on a fresh 3-member etcd."""
    real = min(n, args.real)
    sim = n - real
    base = work / f"n{n}"
    etcd = LocalEtcdCluster(base / "etcd", 3)
    hosts: list[Host] = []
    cpu = Cpu()
    prefix = "/trenvx-bench"
    t_start = time.perf_counter()
    etcd.start()
    try:
        for i in range(3):
            cpu.add("etcd", etcd.pid(i))
        real_names = [f"r{i}" for i in range(real)]
        sim_names = [f"s{i:03d}" for i in range(sim)]
        hosts = [start_host(base, "real", [name], etcd.url, prefix, args) for name in real_names]
        per = max(1, args.sim_per_process)
        for i in range(0, sim, per):  # a process's event loop serves at most --sim-per-process nodes
            hosts.append(start_host(base, "simulated", sim_names[i:i + per], etcd.url, prefix, args))
        await wait_ready(hosts, 60 + 2 * n)
        for h in hosts:
            cpu.add("real_nodes" if h.kind == "real" else "simulated_nodes", h.ready["pid"])
        cpu.add("client", os.getpid())
        urls = {name: url for h in hosts for name, url in h.urls.items()}
        kinds = {name: h.kind for h in hosts for name in h.urls}
        async with EtcdClient(etcd.endpoints, timeout_s=10) as ec:
            deadline = time.monotonic() + 60
            while await ec.count(prefix + "/nodes/") < n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {await ec.count(prefix + '/nodes/')} of {n} nodes registered in 60 s")
                await asyncio.sleep(0.2)
            startup = time.perf_counter() - t_start
            await asyncio.sleep(1.5)  # every node's cached node list now has all N
            fronts = real_names
            print(f"\n{n} nodes ({real} real, {sim} simulated), up in {startup:.1f} s", flush=True)
            idle_now = await idle(client, hosts, cpu, args.idle, n)
            out: dict[str, Any] = {"nodes": n, "real_nodes": real, "simulated_nodes": sim, "fronts": fronts,
                                   "startup_s": round(startup, 2), "idle_empty": idle_now, "checkpoints": []}
            print(f"  idle, no sandboxes: {idle_now['requests_per_s']:.1f} etcd requests/s "
                  f"({idle_now['bytes_per_s'] / 1024:.1f} KiB/s)", flush=True)
            created: list[tuple[str, str]] = []
            for target in args.sandbox_counts:
                want = target - len(created)
                if want <= 0:
                    continue
                phase, results, stopped = await create_phase(client, hosts, cpu, fronts, urls, kinds, want, args,
                                                             idle_now)
                created += [(r.sid, r.node) for r in results if r.ok and r.node]
                print(f"  {len(created)} sandboxes: {phase['creates_per_s']:.0f} creates/s"
                      f"{' (stopped at the time budget)' if stopped else ''}, latency p50 "
                      f"{phase['latency_ms']['p50']:.1f} ms, placement p50 {phase['placement_ms']['p50']:.3f} ms, "
                      f"entry write p50 {phase['entry_write_ms']['p50']:.1f} ms", flush=True)
                await asyncio.sleep(args.settle)
                idle_now = await idle(client, hosts, cpu, args.idle, n)
                route = await routing(client, created, urls, fronts, args.routing_samples, rng)
                listing = await list_latency(client, fronts, urls, args.list_repeats, len(created))
                status = await ec.status()
                alive = await ec.count(prefix + "/nodes/")
                expiries = sum(h.log_text().count(LEASE_EXPIRED) for h in hosts)
                out["checkpoints"].append({"sandboxes": len(created), "create": phase, "idle": idle_now,
                                           "routing": route, "list": listing, "nodes_registered": alive,
                                           "lease_expiries": expiries, "etcd_db_bytes": status.get("dbSize", 0)})
                if alive < n or expiries:
                    print(f"  WARNING: {alive} of {n} nodes registered, {expiries} leases expired so far (a node "
                          "process starved of CPU for longer than the TTL)", flush=True)
                print(f"  idle: {idle_now['requests_per_s']:.1f} etcd requests/s; GET via owner p50 "
                      f"{route['get_owner_ms']['p50']:.1f} ms, via another node p50 "
                      f"{route['get_other_again_ms']['p50']:.1f} ms; list p50 {listing['latency_ms']['p50']:.0f} ms",
                      flush=True)
                if stopped:
                    break
            return out
    finally:
        stop_hosts(hosts)
        etcd.stop()
        shutil.rmtree(base, ignore_errors=True)


async def run_solo(client: httpx.AsyncClient, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One node without a cluster (no etcd, no router), the same stand-in: the baseline."""
    host = start_host(work, "solo", ["solo"], "", "/unused", args)
    try:
        await wait_ready([host], 60)
        url = host.urls["solo"]
        await create_many(client, [url], 20, 1, 60)  # warm-up
        node = psutil.Process(host.ready["pid"])
        before = node.cpu_times()
        results, seconds, _ = await create_many(client, [url], args.solo_creates, args.concurrency, args.batch_budget)
        after = node.cpu_times()
        seq, _, _ = await create_many(client, [url], args.sequential, 1, 60)
        ids = [r.sid for r in results if r.ok]
        get, proxy = [], []
        for sid in ids[:args.routing_samples]:
            took, r = await timed_get(client, f"{url}/sandboxes/{sid}")
            if r is not None and r.status_code == 200:
                get.append(took)
            took, r = await timed_get(client, f"{url}/hello", {"e2b-sandbox-id": sid, "e2b-sandbox-port": PORT})
            if r is not None and r.status_code == 200:
                proxy.append(took)
        ok = sum(r.ok for r in results)
        node_cpu = (after.user + after.system - before.user - before.system) / ok if ok else float("nan")
        return {"creates_per_s": ok / seconds if seconds else float("nan"), **create_stats(results),
                "node_cpu_ms_per_create": round(1000 * node_cpu, 3),
                "sequential": create_stats(seq), "get_ms": sms(get), "proxy_ms": sms(proxy)}
    finally:
        stop_hosts([host])


# -- output ---------------------------------------------------------------------------------------

REAL_VS_SIMULATED = (
    "real: a 3-member etcd (LocalEtcdCluster, fresh per node count), the trenvx node code (create_app, "
    "ClusterRouter, ClusterNode, EtcdClient, SandboxManager) and HTTP between client, nodes and etcd on "
    "loopback; stand-in: the VMM (a create makes a directory, no process, no network, no guest); "
    "simulated: the nodes beyond --real run many to a process (full nodes, own leases, records, "
    "entries, watches and loops, one port each), sharing its CPU; everything shares this machine's cores")


def f(x: float, digits: int = 1) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


nan = float("nan")


def per_node(idle_window: dict[str, Any], kind: str) -> str:
    k = idle_window["per_node_by_kind"].get(kind)
    return f(k["requests_per_s_per_node"], 2) if k else "-"


def print_tables(out: dict[str, Any]) -> None:
    solo = out["solo"]
    print(f"\n{REAL_VS_SIMULATED}.")
    print(f"\nno cluster (one node, no etcd): {f(solo['creates_per_s'], 0)} creates/s; create p50/p99 "
          f"{f(solo['latency_ms']['p50'])}/{f(solo['latency_ms']['p99'])} ms (stand-in "
          f"{f(solo['standin_ms']['p50'])} ms, outside it {f(solo['outside_ms']['p50'])}/{f(solo['outside_ms']['p99'])}"
          f" ms); node CPU {f(solo['node_cpu_ms_per_create'])} ms/create; one at a time p50 "
          f"{f(solo['sequential']['latency_ms']['p50'])} ms; GET p50/p99 "
          f"{f(solo['get_ms']['p50'])}/{f(solo['get_ms']['p99'])} ms; proxied p50 {f(solo['proxy_ms']['p50'])} ms")
    rows = [(c, p) for c in out["clusters"] for p in c["checkpoints"]]
    print("\ncreates through the front nodes (ms; outside = create - stand-in create on the owner; "
          "placement = store check + node list + candidates() on the front node; etcd reads: of the node list)")
    print(f"{'nodes':>5} {'real/sim':>8} {'sandboxes':>9} {'creates/s':>9} {'create p50/p99':>15} "
          f"{'outside p50/p99':>16} {'1-at-a-time p50':>15} {'placement p50/p99':>18} {'etcd reads':>10} "
          f"{'entry write p50/p99':>19} {'failed':>6}")
    for c, p in rows:
        k = p["create"]
        print(f"{c['nodes']:>5} {c['real_nodes']:>4}/{c['simulated_nodes']:<3} {p['sandboxes']:>9} "
              f"{f(k['creates_per_s'], 0):>9} {f(k['latency_ms']['p50']):>7}/{f(k['latency_ms']['p99']):<7} "
              f"{f(k['outside_ms']['p50']):>8}/{f(k['outside_ms']['p99']):<7} "
              f"{f(k['sequential']['latency_ms']['p50']):>15} "
              f"{f(k['placement_ms']['p50'], 3):>9}/{f(k['placement_ms']['p99'], 2):<8} "
              f"{k['placement_etcd_reads']:>10} {f(k['entry_write_ms']['p50']):>9}/{f(k['entry_write_ms']['p99']):<9} "
              f"{k['failed']:>6}")
    print("\nrouting and lists (ms): GET /sandboxes/{id} through the owner vs another node (first: owner looked up "
          "in etcd; again: remembered), proxied request; list = GET /v2/sandboxes?limit=100")
    print(f"{'nodes':>5} {'sandboxes':>9} {'GET owner p50/p99':>18} {'other 1st p50/p99':>18} "
          f"{'other again p50/p99':>20} {'hop p50/p99':>12} {'proxy owner/other p50':>22} {'list p50/p99':>14} "
          f"{'wrong':>5}")
    for c, p in rows:
        r, li = p["routing"], p["list"]
        print(f"{c['nodes']:>5} {p['sandboxes']:>9} {f(r['get_owner_ms']['p50']):>9}/{f(r['get_owner_ms']['p99']):<8} "
              f"{f(r['get_other_first_ms']['p50']):>9}/{f(r['get_other_first_ms']['p99']):<8} "
              f"{f(r['get_other_again_ms']['p50']):>10}/{f(r['get_other_again_ms']['p99']):<9} "
              f"{f(r['hop_ms']['p50']):>5}/{f(r['hop_ms']['p99']):<6} "
              f"{f(r['proxy_owner_ms']['p50']):>11}/{f(r['proxy_other_ms']['p50']):<10} "
              f"{f(li['latency_ms']['p50'], 0):>7}/{f(li['latency_ms']['p99'], 0):<6} "
              f"{sum(r['wrong'].values()) + li['wrong']:>5}")
    print("\netcd traffic per create (all nodes' EtcdClient.stats over the batch / creates; puts: the entry and "
          "record writes; watch: KiB streamed to the N nodes' watches; the rest: renewals and node-list reads, "
          "which go on however fast creates go) and of the nodes idle")
    print(f"{'nodes':>5} {'sandboxes':>9} {'req/create':>10} {'puts':>5} {'KiB/create':>10} {'puts':>5} {'watch':>6} "
          f"{'idle req/s':>10} {'per node real/sim':>17} {'idle KiB/s':>10} {'idle CPU% etcd/real/sim':>23} "
          f"{'CPU ms/create (etcd, nodes, client)':>36}")
    for c, p in rows:
        e, i, cpu = p["create"]["etcd_per_create"], p["idle"], p["create"]["cpu_ms_per_create"]
        nodes_cpu = cpu.get("real_nodes", 0) + cpu.get("simulated_nodes", 0)
        print(f"{c['nodes']:>5} {p['sandboxes']:>9} {f(e['requests'], 2):>10} {f(e['by_call'].get('/v3/kv/put', nan), 2):>5} "
              f"{f(e['bytes'] / 1024, 1):>10} {f(e['bytes_by_call'].get('/v3/kv/put', nan) / 1024, 1):>5} "
              f"{f(e['bytes_by_call'].get(STREAMS, nan) / 1024, 1):>6} "
              f"{f(i['requests_per_s']):>10} {per_node(i, 'real'):>8}/{per_node(i, 'simulated'):<8} "
              f"{f(i['bytes_per_s'] / 1024):>10} "
              f"{f(i['cpu_pct'].get('etcd', nan)):>9}/{f(i['cpu_pct'].get('real_nodes', nan)):>5}/"
              f"{f(i['cpu_pct'].get('simulated_nodes', nan)):<7} "
              f"{f(cpu.get('etcd', nan)):>12} {f(nodes_cpu):>10} {f(cpu.get('client', nan)):>10}")
    notes = [f"{c['nodes']} nodes at {p['sandboxes']}: {p['nodes_registered']} registered, {p['lease_expiries']} "
             "lease(s) expired" for c, p in rows if p.get("lease_expiries") or p.get("nodes_registered", c["nodes"]) < c["nodes"]]
    notes += [f"{c['nodes']} nodes: the batch to {p['sandboxes']} stopped at the time budget "
              f"({p['create']['requested']} asked for)" for c, p in rows if p["create"]["stopped_early"]]
    for note in notes:
        print(f"note: {note}")


# -- main ---------------------------------------------------------------------------------------------

def code_version() -> dict[str, Any]:
    """The commit measured, and whether src/ had changes not committed (the cluster code moves)."""
    root = Path(__file__).resolve().parent.parent

    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"), "src_changed": bool(git("status", "--porcelain", "--", "src"))}


def counts(text: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--{what}: {text!r} is not a comma-separated list of numbers (e.g. 3,10,30)") from None
    if not out or min(out) < 1:
        raise SystemExit(f"--{what}: give at least one count, each 1 or more (got {text!r})")
    return out


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="3,10,30,100", help="node counts to sweep (default 3,10,30,100)")
    ap.add_argument("--sandboxes", default="1000,10000", help="sandbox counts measured at, cumulative (default 1000,10000)")
    ap.add_argument("--real", type=int, default=4, help="real nodes (own process; the front nodes), the rest simulated (default 4)")
    ap.add_argument("--sim-per-process", type=int, default=50,
                    help="simulated nodes per shared process at most (default 50)")
    ap.add_argument("--concurrency", type=int, default=16, help="creates in flight (default 16)")
    ap.add_argument("--sequential", type=int, default=50, help="creates one at a time after each batch (default 50)")
    ap.add_argument("--windows", type=int, default=5, help="rate windows per batch (default 5)")
    ap.add_argument("--routing-samples", type=int, default=200, help="sandboxes sampled for routing (default 200)")
    ap.add_argument("--list-repeats", type=int, default=10, help="lists per checkpoint (default 10)")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of each idle window (default 10: one lease TTL)")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds after a batch before the idle window (default 2)")
    ap.add_argument("--solo-creates", type=int, default=1000, help="creates of the no-cluster baseline (default 1000)")
    ap.add_argument("--batch-budget", type=float, default=300.0,
                    help="seconds a create batch may take before it stops starting creates (default 300)")
    ap.add_argument("--lease-ttl", type=int, default=10, help="the nodes' lease TTL, s (default 10, trenvx's)")
    ap.add_argument("--candidates", type=int, default=3, help="K of best-of-K placement (default 3, trenvx's)")
    ap.add_argument("--max-sandboxes", type=int, default=20000, help="each node's max_sandboxes (default 20000)")
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--short", action="store_true",
                    help="a quick run (< 60 s): 3 real + 10 simulated nodes, 300 sandboxes, short windows")
    ap.add_argument("--json", default="", help="write the JSON here (default benchmarks/results/cluster-<time>.json)")
    ap.add_argument("--print", default="", metavar="JSON", help="print the tables of an earlier run's JSON, and exit")
    args = ap.parse_args()
    if args.print:
        print_tables(json.loads(Path(args.print).read_text()))
        return 0
    if args.short:
        args.nodes, args.sandboxes, args.real = "13", "300", 3
        args.concurrency, args.sequential, args.routing_samples, args.list_repeats = 8, 20, 30, 5
        args.idle, args.settle, args.solo_creates, args.batch_budget = 4.0, 1.0, 100, 30.0
    node_counts = counts(args.nodes, "nodes")
    args.sandbox_counts = sorted(set(counts(args.sandboxes, "sandboxes")))
    if args.real < 2:
        raise SystemExit("--real must be at least 2: routing is measured through a front node that does not own "
                         "the sandbox")
    if shutil.which(ETCD_BIN) is None:
        raise SystemExit(f"{ETCD_BIN} not found on PATH: install Debian's etcd-server (scripts/start.sh setup does)")
    rng = random.Random(args.seed)
    etcd_version = subprocess.run([ETCD_BIN, "--version"], capture_output=True, text=True, timeout=10).stdout
    out: dict[str, Any] = {
        "benchmark": "cluster", "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"name": platform.node(), "cores": os.cpu_count(), "mem_gib": round(psutil.virtual_memory().total / 2**30, 1),
                 "python": platform.python_version(), "etcd": etcd_version.splitlines()[0] if etcd_version else "",
                 "loadavg_start": os.getloadavg()},
        "args": {k: v for k, v in vars(args).items()}, "real_vs_simulated": REAL_VS_SIMULATED,
        "code": code_version(),
    }
    work = Path(tempfile.mkdtemp(prefix="trenvx-cluster-bench-"))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=512)
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
            print(f"cluster control plane: nodes {node_counts}, sandboxes {args.sandbox_counts}, {args.real} real nodes, "
                  f"concurrency {args.concurrency} ({platform.node()}, {os.cpu_count()} cores)", flush=True)
            out["solo"] = await run_solo(client, work, args)
            print(f"no cluster: {out['solo']['creates_per_s']:.0f} creates/s, create p50 "
                  f"{out['solo']['latency_ms']['p50']:.1f} ms", flush=True)
            out["clusters"] = []
            for n in node_counts:
                out["clusters"].append(await run_cluster(client, work, n, args, rng))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["host"]["loadavg_end"] = os.getloadavg()
    print_tables(out)
    path = write_results("cluster", out, args.json)
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cancellable(main))
