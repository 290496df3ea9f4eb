"""Stand-in nodes for ``benchmarks/cluster.py``: the real trenvx node over a stand-in VMM.

A node here is what ``trenvx serve --cluster`` runs: ``create_app`` (the API, the ClusterRouter,
the ClusterNode with its EtcdClient, a real SandboxManager with its reaper and metrics sampler),
served by uvicorn on its own port. Only what lies under the manager is a stand-in, so that the
control plane is all that is left to measure:

- :class:`StandInRestorer`: a "restore" makes the sandbox's directory and returns a
  :class:`StandInVm`, which has no process (pid 0), runs until killed and has no network; its
  agent (:class:`StandInAgent`) answers the metrics sampler with fixed figures. A sandbox's port
  is "forwarded" to :class:`EchoUpstream`, one small HTTP responder per process, so that a
  proxied request has somewhere to go.
- the template ``standin``: a manifest and three 1 KiB files (no kernel, no image).
- the network mode is ``user``: no namespaces, no host rules.

Run as a process, a *node host* serves every node its spec names, each an app of its own on its
own port, in one event loop (one uvicorn server over all the ports)::

    python benchmarks/cluster_standin.py SPEC.json

A host of one node is a "real" node of the benchmark (its own process, as ``trenvx serve`` is);
a host of many serves the benchmark's simulated nodes, which share one process and its CPU. The
host writes ``ready_file`` once every node has started (registered in etcd), and answers the
benchmark on a control port: ``GET /stats`` (each node's ``EtcdClient.stats``, its sandboxes,
and the timings below), ``POST /drain`` (the same, clearing the timings). On SIGTERM every node
revokes its lease and the process exits at once: its sandboxes have nothing to stop, and the
benchmark deletes their entries and directories.

Timings taken here, around the real code (nothing in ``src/`` is changed):

- ``placement``: per create placed by a node of this host, the store check
  (``ClusterNode.check_store``, where the node has one), the node-list read
  (``ClusterNode.live_nodes``) and ``candidates()``, which ``ClusterRouter._place`` calls one
  after the other (all wrapped in this process), and whether the records were read from etcd;
- ``standin``: the API route's own time for a create (a middleware innermost in the app, from
  the request to the answer's start), also sent back as ``X-Bench-Standin-Us`` with
  ``X-Bench-Node`` (the node that answered);
- ``entry_write``: from the route's answer to its leaving the cluster router: the ClusterNode's
  ``sync``, which writes the new sandbox's entry to etcd before a create's answer leaves;
- ``bytes_by_call``: each node's etcd bytes per gateway path (unary calls; ``EtcdStats`` has
  bytes in total only), its EtcdClient's HTTP ``post`` wrapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import json
import logging
import math
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

TEMPLATE = "standin"
BUILD_ID = "20260101T000000-standin0"
TEMPLATE_MEM_MB = 128
CREATE_PATHS = ("/sandboxes", "/v2/sandboxes")

log = logging.getLogger("cluster_standin")


# -- the stand-in VMM ------------------------------------------------------------------------

class StandInVm:
    """A VM with no process and no network: running from its "restore" until killed. Its agent's
    endpoint and every forwarded port are the host's :class:`EchoUpstream`."""

    pid = 0  # psutil knows no process 0: memory reads give (0, 0), start times None
    qmp = None

    def __init__(self, sandbox_id: str, workdir: Path, upstream_port: int) -> None:
        from trenvx.vmm.base import VmState

        self.spec = SimpleNamespace(name=sandbox_id, workdir=workdir)
        self.upstream_port = upstream_port
        self.state = VmState.running
        self._exited = asyncio.Event()

    @property
    def agent_port(self) -> int:
        return self.upstream_port

    @property
    def agent_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}"

    @property
    def agent_endpoint(self) -> Any:
        from trenvx.guest.endpoint import TcpEndpoint

        return TcpEndpoint("127.0.0.1", self.upstream_port)

    def is_alive(self) -> bool:
        return not self._exited.is_set()

    async def wait_exit(self) -> int:
        await self._exited.wait()
        return 0

    async def kill(self) -> None:
        from trenvx.vmm.base import VmState

        self.state = VmState.exited
        self._exited.set()

    async def pause(self) -> None:
        from trenvx.vmm.base import VmState

        self.state = VmState.paused

    async def resume(self) -> None:
        from trenvx.vmm.base import VmState

        self.state = VmState.running

    async def forward_port(self, guest_port: int) -> int:
        return self.upstream_port

    def console_tail(self, lines: int = 30) -> str:
        return ""


class StandInAgent:
    """The guest agent of a stand-in VM: the metrics sampler's figures, nothing else (no HTTP
    client is made per sandbox, as the real AgentClient would)."""

    async def metrics(self) -> dict[str, Any]:
        return {"cpu_used_pct": 0.0, "mem_used": 64 << 20, "mem_total": TEMPLATE_MEM_MB << 20,
                "disk_used": 1 << 20, "disk_total": 64 << 20}

    async def aclose(self) -> None:
        return None


class StandInRestorer:
    """What the SandboxManager calls instead of ``SnapshotRestore``: a restore is a directory
    made and a :class:`StandInVm` returned, at once."""

    network = None
    jail = None
    """Stand-in VMs are not processes: nothing to jail."""

    def __init__(self, data_root: Any, upstream_port: int) -> None:
        self.data_root = data_root
        self.upstream_port = upstream_port

    def driver(self, build: Any) -> Any:
        return SimpleNamespace(name="standin", free_page_reporting=False)

    def check_network(self, build: Any) -> None:
        """A stand-in build has no network backend to mismatch."""

    def uses_slot(self, build: Any) -> bool:
        return False

    async def restore(self, build: Any, *, sandbox_id: str | None = None, env_vars: dict[str, str] | None = None,
                      prepared: Any = None, kill_with_owner: bool = True, egress: Any = None) -> Any:
        from trenvx.sandbox.restore import RestoredVm, new_sandbox_id

        t0 = time.perf_counter()
        sid = sandbox_id or new_sandbox_id()
        workdir = self.data_root.sandbox_dir(sid)
        workdir.mkdir(parents=True)
        vm = StandInVm(sid, workdir, self.upstream_port)
        return RestoredVm(sandbox_id=sid, build=build, vm=vm, agent=StandInAgent(),  # type: ignore[arg-type]
                          access_token=secrets.token_urlsafe(8), workdir=workdir,
                          times={"standin": time.perf_counter() - t0})

    async def destroy(self, restored: Any) -> None:
        await restored.vm.kill()
        shutil.rmtree(restored.workdir, ignore_errors=True)

    async def discard(self, prepared: Any) -> None:
        await prepared.vm.kill()
        shutil.rmtree(prepared.workdir, ignore_errors=True)

    async def release_slot(self, slot: Any) -> None:
        return None


def make_standin_template(data_root: Path, mem_mb: int = TEMPLATE_MEM_MB) -> None:
    """The ``standin`` template's current build under ``data_root``: a real manifest (the
    TemplateStore reads it as any build) over three 1 KiB files."""
    from trenvx.template.store import MANIFEST, MachineRecord, TemplateManifest

    d = data_root / "templates" / TEMPLATE / BUILD_ID
    d.mkdir(parents=True, exist_ok=True)
    for f in ("rootfs.ext4", "memory", "vmstate"):
        (d / f).write_bytes(b"\0" * 1024)
    manifest = TemplateManifest(
        name=TEMPLATE, build_id=BUILD_ID, created_at=dt.datetime.now(dt.UTC).isoformat(), vmm_type="qemu",
        input_digest="5" * 64, inputs={}, config={"name": TEMPLATE, "disk_mb": 64, "mem_mb": mem_mb},
        machine=MachineRecord(vcpu=1, mem_mb=mem_mb, accelerator="tcg", kernel="/nonexistent/vmlinuz",
                              initrd="/nonexistent/initrd", cmdline="", tcg_tb_size_mb=32),
        accelerator_reason="stand-in", kernel_version="0", versions={}, sizes={"memory_bytes": mem_mb << 20},
        stage_seconds={}, rootfs_source="stand-in",
    )
    (d / MANIFEST).write_text(manifest.model_dump_json())
    link = data_root / "templates" / TEMPLATE / "current"
    if not link.is_symlink():
        link.symlink_to(BUILD_ID)


def node_config(data_root: Path, *, name: str, port: int, etcd: str, prefix: str, lease_ttl_s: int,
                candidates: int, max_sandboxes: int) -> Any:
    """A node's config: on 127.0.0.1:``port``, no API key, user networking, long sandbox
    timeouts, room for ``max_sandboxes``; in the cluster ``etcd`` (empty: a single machine)."""
    from trenvx.config import ClusterConfig, Config, NetworkConfig, NetworkMode, OrchestratorConfig

    orch = OrchestratorConfig(host="127.0.0.1", port=port, api_key="", max_sandboxes=max_sandboxes,
                              max_sandboxes_per_template=max_sandboxes, memory_headroom_mb=0,
                              default_timeout_s=3600, keep_on_exit=False)
    cluster = (ClusterConfig(etcd=etcd, name=name, advertise_url=f"http://127.0.0.1:{port}", prefix=prefix,
                             lease_ttl_s=lease_ttl_s, candidates=candidates) if etcd else ClusterConfig())
    return Config(data_root=data_root, orchestrator=orch, template_manager={"template_id": TEMPLATE},
                  network=NetworkConfig(mode=NetworkMode.user), cluster=cluster)


def standin_manager(config: Any, upstream_port: int) -> Any:
    """The real SandboxManager (no state file, no pools) over the stand-in VMM."""
    from trenvx.layout import DataRoot
    from trenvx.sandbox.manager import SandboxManager

    manager = SandboxManager(config, state_path=None, pools=False)
    manager.restorer = StandInRestorer(DataRoot(config.data_root).ensure(), upstream_port)  # type: ignore[assignment]
    return manager


# -- a port's upstream -----------------------------------------------------------------------

class EchoUpstream:
    """One HTTP/1.1 responder on loopback answering every request ``200 ok`` (keep-alive): where
    every stand-in sandbox's ports lead."""

    def __init__(self) -> None:
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> "EchoUpstream":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip() or 0)
                if length:
                    await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()


# -- timings around the real code ---------------------------------------------------------------

class Timings:
    """What this host's nodes measured since the last drain (seconds)."""

    def __init__(self) -> None:
        self.placement: list[tuple[float, float, float, bool]] = []
        """(store check, node-list read, candidates(), whether the node records were read from etcd)
        per placed create, in seconds."""
        self.standin: list[float] = []
        self.entry_write: list[float] = []

    def drain(self) -> dict[str, Any]:
        out = {"placement": self.placement, "standin": self.standin, "entry_write": self.entry_write}
        self.placement, self.standin, self.entry_write = [], [], []
        return out

    def peek(self) -> dict[str, Any]:
        return {"placement": list(self.placement), "standin": list(self.standin),
                "entry_write": list(self.entry_write)}


_before_candidates: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "before_candidates", default=None)
"""What the request's placement did before ``candidates()``: its store check and node-list read."""


def _noted() -> dict[str, Any]:
    noted = _before_candidates.get()
    if noted is None:
        noted = {}
        _before_candidates.set(noted)
    return noted


def install_placement_timing(timings: Timings) -> None:
    """Wrap ``candidates`` as ``trenvx.server.cluster_routing`` calls it: each call records its
    own time and that of the store check and node-list read before it in the same request."""
    import trenvx.server.cluster_routing as routing

    original = routing.candidates

    def timed_candidates(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            took = time.perf_counter() - t0
            noted = _before_candidates.get() or {}
            _before_candidates.set(None)
            timings.placement.append((noted.get("check_store", 0.0), noted.get("live_nodes", math.nan), took,
                                      noted.get("read", False)))

    routing.candidates = timed_candidates  # type: ignore[assignment]


def time_live_nodes(node: Any) -> None:
    """Wrap one ClusterNode's ``live_nodes`` (and ``check_store``, the one-read check that etcd
    answers, where the node has one): their times, and whether the node records were read from
    etcd, are kept for the ``candidates`` call that follows them in the same request."""
    original = node.live_nodes

    async def timed(*args: Any, **kwargs: Any) -> Any:
        before = node._nodes_at
        t0 = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            noted = _noted()
            noted["live_nodes"] = time.perf_counter() - t0
            noted["read"] = node._nodes_at != before

    node.live_nodes = timed
    check = getattr(node, "check_store", None)
    if check is not None:
        async def timed_check(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await check(*args, **kwargs)
            finally:
                _noted()["check_store"] = time.perf_counter() - t0

        node.check_store = timed_check


def count_bytes_by_call(etcd: Any) -> dict[str, list[int]]:
    """Bytes sent and received per gateway path of one EtcdClient's unary calls (its ``stats``
    count bytes in total only): its HTTP client's ``post`` wrapped. Path -> [sent, received]."""
    tally: dict[str, list[int]] = {}
    http = etcd._http
    original = http.post

    async def post(url: Any, *args: Any, **kwargs: Any) -> Any:
        resp = await original(url, *args, **kwargs)
        counts = tally.setdefault(urlsplit(str(url)).path, [0, 0])
        counts[0] += len(kwargs.get("content") or b"")
        counts[1] += len(resp.content)
        return resp

    http.post = post
    return tally


class InnerTiming:
    """ASGI middleware, innermost in a node's app (right before its routes): the route's time,
    sent back as ``X-Bench-Standin-Us`` (with ``X-Bench-Node``), and for a create also kept with
    the time its answer then spends in the outer layers (the entry written to etcd)."""

    def __init__(self, app: Any, node: str, timings: Timings) -> None:
        self.app = app
        self.node = node.encode()
        self.timings = timings

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        is_create = scope["method"] == "POST" and scope["path"].rstrip("/") in CREATE_PATHS
        t0 = time.perf_counter()

        async def timed_send(msg: dict[str, Any]) -> None:
            if msg["type"] != "http.response.start":
                return await send(msg)
            t1 = time.perf_counter()
            headers = [*msg.get("headers", []), (b"x-bench-node", self.node),
                       (b"x-bench-standin-us", str(round((t1 - t0) * 1e6)).encode())]
            await send({**msg, "headers": headers})
            if is_create and msg.get("status") == 201:
                self.timings.standin.append(t1 - t0)
                self.timings.entry_write.append(time.perf_counter() - t1)

        await self.app(scope, receive, timed_send)


# -- the host process -------------------------------------------------------------------------

def listening_socket() -> socket.socket:
    """A TCP socket bound to a free loopback port, for uvicorn to listen on. Made with the protocol
    number (``IPPROTO_TCP``), not 0: asyncio sets TCP_NODELAY only on sockets that name it, and
    without it a response's headers and body leave as two segments, the second held back until
    the client's delayed ACK (~40 ms per request on a kept-alive connection)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


def _json_response(payload: Any) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    body = json.dumps(payload).encode()
    return body, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]


class NodeHost:
    """The nodes of one spec, served from this process (see the module's text)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.timings = Timings()
        self.apps: dict[int, Any] = {}
        """Port -> that node's app."""
        self.nodes: dict[str, Any] = {}
        """Name -> (app, manager)."""
        self.bytes_by_call: dict[str, dict[str, list[int]]] = {}
        """Node -> its EtcdClient's bytes per gateway path (see :func:`count_bytes_by_call`)."""
        self.control_port = 0
        self.stop = asyncio.Event()

    async def control(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/stats" or path == "/drain":
            times = os.times()
            out: dict[str, Any] = {"pid": os.getpid(), "cpu_s": times.user + times.system, "nodes": {}}
            for name, (app, manager) in self.nodes.items():
                node = app.state.cluster
                entry: dict[str, Any] = {"sandboxes": manager.admission.total}
                if node is not None:
                    s = node.etcd.stats
                    entry.update(registered=node.registered, url=node.url, etcd={
                        "requests": s.requests, "bytes_sent": s.bytes_sent, "bytes_received": s.bytes_received,
                        "by_call": dict(s.by_call), "bytes_by_call": self.bytes_by_call.get(name, {})})
                out["nodes"][name] = entry
            out["timings"] = self.timings.drain() if path == "/drain" else self.timings.peek()
            body, headers = _json_response(out)
            status = 200
        else:
            body, headers = _json_response({"message": f"no {path} here: GET /stats, POST /drain"})
            status = 404
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def dispatch(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        port = (scope.get("server") or ("", 0))[1]
        app = self.apps.get(port)
        if app is None:
            return await self.control(scope, receive, send)
        await app(scope, receive, send)

    async def run(self) -> None:
        import uvicorn
        from starlette.middleware import Middleware

        from trenvx.server.app import create_app

        spec = self.spec
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        upstream = await EchoUpstream().start()
        install_placement_timing(self.timings)
        sockets: list[socket.socket] = []
        ports: dict[str, int] = {}
        for n in spec["nodes"]:
            s = listening_socket()
            sockets.append(s)
            port = s.getsockname()[1]
            ports[n["name"]] = port
            root = Path(n["data_root"])
            make_standin_template(root)
            cfg = node_config(root, name=n["name"], port=port, etcd=spec.get("etcd", ""),
                              prefix=spec.get("prefix", "/trenvx"), lease_ttl_s=spec.get("lease_ttl_s", 10),
                              candidates=spec.get("candidates", 3), max_sandboxes=spec.get("max_sandboxes", 20000))
            manager = standin_manager(cfg, upstream.port)
            app = create_app(cfg, manager=manager)
            app.user_middleware.append(Middleware(InnerTiming, node=n["name"], timings=self.timings))
            if app.state.cluster is not None:
                time_live_nodes(app.state.cluster)
                self.bytes_by_call[n["name"]] = count_bytes_by_call(app.state.cluster.etcd)
            self.apps[port] = app
            self.nodes[n["name"]] = (app, manager)
        ctl = listening_socket()
        sockets.append(ctl)
        self.control_port = ctl.getsockname()[1]

        started = time.perf_counter()
        lifespans = []
        for app, _ in self.nodes.values():  # each node: manager started, registered in etcd, loops running
            cm = app.router.lifespan_context(app)
            await cm.__aenter__()
            lifespans.append(cm)
        config = uvicorn.Config(self.dispatch, interface="asgi3", lifespan="off", log_level="warning", access_log=False,
                                timeout_keep_alive=60, backlog=4096)
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=sockets)
        ready = {"pid": os.getpid(), "control_port": self.control_port, "nodes": ports,
                 "upstream_port": upstream.port, "start_s": time.perf_counter() - started}
        tmp = Path(spec["ready_file"] + ".tmp")
        tmp.write_text(json.dumps(ready))
        os.replace(tmp, spec["ready_file"])
        await self.stop.wait()
        # Leave at once: each node's lease revoked (its record goes with it); nothing else to stop.
        revokes = [app.state.cluster.etcd.revoke(app.state.cluster.lease)
                   for app, _ in self.nodes.values() if app.state.cluster is not None and app.state.cluster.lease]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*revokes, return_exceptions=True), 10)
        logging.shutdown()
        os._exit(0)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python benchmarks/cluster_standin.py SPEC.json (written by benchmarks/cluster.py)",
              file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(NodeHost(spec).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
