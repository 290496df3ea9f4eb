"""Fakes for testing the sandbox manager and the server without VMs.

- a template build on disk (a real manifest, tiny files) so the real TemplateStore is used;
- a "VM" that is a real process (``sleep``, named ``trenvx-<id>`` like QEMU's ``-name``), started
  through the real :class:`VmmProcess`, so death detection, kill and adoption are exercised;
- with ``vmm="firecracker"`` or ``"cloud-hypervisor"``, a "VM" reached like those VMMs': its agent
  behind a stand-in hybrid vsock socket, its VMM's API answered by the stand-in of tests/standins
  on the socket in its workdir (what a restarted manager re-attaches through);
- an upstream HTTP/websocket server standing in for the guest agent and guest web servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import os
import secrets
import shutil
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from trenvx.config import AGENT_PORT, Config, OrchestratorConfig
from trenvx.guest.client import AgentClient
from trenvx.layout import DataRoot
from trenvx.sandbox.restore import RestoredVm, SnapshotRestore, new_sandbox_id
from trenvx.template.store import MANIFEST, MachineRecord, TemplateManifest
from trenvx.vmm.base import VmState
from trenvx.vmm.microvm import VSOCK_SOCKET
from trenvx.vmm.process import VmmProcess

BUILD_ID = "20260101T000000-deadbeef"


def make_template(data_root: Path, name: str = "tpl", mem_mb: int = 256, vcpu: int = 1, vmm_type: str = "qemu") -> Path:
    d = data_root / "templates" / name / BUILD_ID
    d.mkdir(parents=True, exist_ok=True)
    for f in ("rootfs.ext4", "memory", "vmstate"):
        (d / f).write_bytes(b"\0" * 1024)
    m = TemplateManifest(
        name=name, build_id=BUILD_ID, created_at=dt.datetime.now(dt.UTC).isoformat(), vmm_type=vmm_type,
        input_digest="0" * 64, inputs={}, config={"name": name, "disk_mb": 64, "mem_mb": mem_mb},
        machine=MachineRecord(vcpu=vcpu, mem_mb=mem_mb, accelerator="tcg", kernel="/nonexistent/vmlinuz",
                              initrd="/nonexistent/initrd", cmdline="", tcg_tb_size_mb=32),
        accelerator_reason="fake", kernel_version="6.1.0-0", versions={}, sizes={"memory_bytes": mem_mb << 20},
        stage_seconds={"boot": 1.0}, rootfs_source="fake",
    )
    (d / MANIFEST).write_text(m.model_dump_json())
    link = data_root / "templates" / name / "current"
    if link.is_symlink():
        link.unlink()
    link.symlink_to(BUILD_ID)
    return d


def make_config(data_root: Path, **orch: Any) -> Config:
    defaults: dict[str, Any] = {"memory_headroom_mb": 0, "reaper_interval_s": 0.05}
    defaults.update(orch)
    return Config(data_root=data_root, orchestrator=OrchestratorConfig(**defaults),
                  template_manager={"template_id": "tpl"})


class FakeVm:
    """A process standing in for a VMM; the agent is the upstream test server (over TCP, or with
    ``vsock`` through the hybrid vsock socket ``workdir/v.sock``)."""

    def __init__(self, sandbox_id: str, workdir: Path, process: Any, agent_port: int, forwards: dict[int, int],
                 vsock: bool = False) -> None:
        self.spec = type("Spec", (), {"name": sandbox_id, "workdir": workdir})()
        self.process = process
        self.agent_port = agent_port
        self.forwards = forwards
        self.vsock = vsock
        self.state = VmState.running
        self.forward_calls: list[int] = []
        self.qmp = None

    @property
    def agent_endpoint(self) -> Any:
        from trenvx.guest.endpoint import HybridVsockEndpoint, TcpEndpoint

        if self.vsock:
            return HybridVsockEndpoint(self.spec.workdir / VSOCK_SOCKET, AGENT_PORT)
        return TcpEndpoint("127.0.0.1", self.agent_port)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def agent_url(self) -> str:
        return f"http://127.0.0.1:{self.agent_port}"

    def is_alive(self) -> bool:
        return self.process.is_alive()

    async def wait_exit(self) -> int:
        return await self.process.wait()

    async def kill(self) -> None:
        await self.process.kill()
        self.state = VmState.exited

    async def pause(self) -> None:
        self.state = VmState.paused

    async def resume(self) -> None:
        self.state = VmState.running

    async def forward_port(self, guest_port: int) -> int:
        self.forward_calls.append(guest_port)
        await asyncio.sleep(0.01)
        if guest_port not in self.forwards:
            raise RuntimeError(f"no forward for {guest_port} in this fake")
        return self.forwards[guest_port]

    def console_tail(self, lines: int = 30) -> str:
        return ""


class FakeRestorer:
    """Stands in for SnapshotRestore: 'restores' by starting a named sleep process. With ``vmm`` set to
    firecracker or cloud-hypervisor, every "VM" also gets the stand-ins of that VMM's sockets
    (``standins``, still serving after the manager closes, as a VMM outlives a ``--keep`` server)."""

    def __init__(self, data_root: DataRoot, agent_port: int, forwards: dict[int, int] | None = None,
                 delay_s: float = 0.0, vmm: str = "qemu") -> None:
        self.data_root = data_root
        self.agent_port = agent_port
        self.forwards = forwards or {}
        self.delay_s = delay_s
        self.vmm = vmm
        self.fail_next: Exception | None = None
        self.restored: list[RestoredVm] = []
        self.kill_with_owner: list[bool] = []
        self.standins: dict[str, list[Any]] = {}
        """Sandbox id -> its VMM's stand-ins: [hybrid vsock socket, API]."""
        self.jail = None
        """No jail: the stand-in "VMs" are sleep processes of ours."""

    def driver(self, build: Any) -> Any:
        """The fake "VMM": its sleep processes give no freed guest memory back."""
        return SimpleNamespace(name=self.vmm, free_page_reporting=False)

    def vm_spec(self, build: Any, sandbox_id: str, workdir: Path, *, kill_with_owner: bool = True, slot: Any = None) -> Any:
        from trenvx.vmm.base import DiskSpec, VmSpec

        return VmSpec(name=sandbox_id, workdir=workdir / "vm", machine=build.machine, memory_file=workdir / "m",
                      memory_shared=False, root_disk=DiskSpec(workdir / "disk.qcow2", "qcow2"),
                      kill_with_owner=kill_with_owner)

    async def restore(self, build: Any, *, sandbox_id: str | None = None, env_vars: dict[str, str] | None = None,
                      prepared: Any = None, kill_with_owner: bool = True, egress: Any = None) -> RestoredVm:
        if self.fail_next is not None:
            e, self.fail_next = self.fail_next, None
            raise e
        sid = sandbox_id or new_sandbox_id()
        workdir = self.data_root.sandbox_dir(sid)
        (workdir / "vm").mkdir(parents=True)
        (workdir / "disk.qcow2").write_bytes(b"overlay")
        t0 = time.perf_counter()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        proc = await VmmProcess.spawn(["bash", "-c", f"exec -a trenvx-{sid} sleep 3600"], workdir / "vm" / "vmm.log",
                                      kill_with_owner=kill_with_owner)
        self.kill_with_owner.append(kill_with_owner)
        vm = FakeVm(sid, workdir / "vm", proc, self.agent_port, self.forwards, vsock=self.vmm != "qemu")
        if self.vmm != "qemu":
            self.standins[sid] = await start_microvm_standins(self.vmm, workdir / "vm", proc.pid, self.agent_port)
        token = secrets.token_urlsafe(8)
        r = RestoredVm(sandbox_id=sid, build=build, vm=vm, agent=AgentClient.for_endpoint(vm.agent_endpoint, access_token=token),  # type: ignore[arg-type]
                       access_token=token, workdir=workdir, times={"spawn": time.perf_counter() - t0, "init": 0.001})
        self.restored.append(r)
        return r


    def check_network(self, build: Any) -> None:
        """Fake builds have no network backend to mismatch."""

    def uses_slot(self, build: Any) -> bool:
        return False

    async def destroy(self, restored: RestoredVm) -> None:
        await SnapshotRestore.destroy(self, restored)  # type: ignore[arg-type]

    async def discard(self, prepared: Any) -> None:
        await SnapshotRestore.discard(self, prepared)  # type: ignore[arg-type]

    async def release_slot(self, slot: Any) -> None:
        assert slot is None, "the fake restorer makes no network slots"

    network = None

    async def close_standins(self) -> None:
        for standins in self.standins.values():
            for s in standins:
                await s.close()
        self.standins.clear()


class FakeSuspender:
    """Stands for the Suspender: a pause kills the fake VM's process (writing a stand-in saved state),
    a resume starts a new one, with the same id and token. ``refuse_next`` (a message) makes the next
    pause refused as if the agent had not answered; ``fail_next`` makes the next pause or resume raise."""

    def __init__(self, restorer: FakeRestorer) -> None:
        self.restorer = restorer
        self.refuse_next: str | None = None
        self.fail_next: Exception | None = None
        self.unresponsive_next = False
        self.calls: list[tuple[str, str, bool]] = []

    def check_supported(self, build: Any) -> None:
        from trenvx.sandbox.suspend import PauseUnsupported

        if self.restorer.vmm != "qemu":
            raise PauseUnsupported(f"pausing to disk is not supported by this VMM yet ({self.restorer.vmm})")

    async def pause(self, restored: RestoredVm, *, memory: bool, strict: bool, timeout_left: float) -> Any:
        from trenvx.sandbox.suspend import PAUSE_DIR, VMSTATE, PauseInfo, PauseRefused, StoppedVm

        self.calls.append(("pause", restored.sandbox_id, memory))
        if self.fail_next is not None:
            e, self.fail_next = self.fail_next, None
            raise e
        unresponsive, self.unresponsive_next = self.unresponsive_next, False
        if self.refuse_next is not None or (unresponsive and (strict or not memory)):
            why, self.refuse_next = self.refuse_next or "the agent did not answer", None
            raise PauseRefused(why)
        d = restored.workdir / PAUSE_DIR
        d.mkdir(mode=0o700, exist_ok=True)
        stored = b"saved state" * 10 if memory else b""
        if memory:
            (d / VMSTATE).write_bytes(stored)
        await restored.vm.kill()
        await restored.agent.aclose()
        info = PauseInfo(kind="memory" if memory else "filesystem", paused_at=time.time(), timeout_left=timeout_left,
                         stored_bytes=len(stored), seconds=0.01, envd_unresponsive=unresponsive)
        vm = restored.vm
        return dataclasses.replace(restored, vm=StoppedVm(vm.spec, vm.agent_endpoint, vm.agent_port), slot=None), info

    async def resume(self, paused: RestoredVm, info: Any, *, memory: bool = True, egress: Any = None,
                     env_vars: dict[str, str] | None = None, kill_with_owner: bool = True) -> RestoredVm:
        from trenvx.sandbox.suspend import PAUSE_DIR, ResumeRefused

        self.calls.append(("resume", paused.sandbox_id, memory))
        if memory and info.kind == "memory" and info.envd_unresponsive:
            raise ResumeRefused("paused while its agent did not answer; resume it with memory false")
        if self.fail_next is not None:
            e, self.fail_next = self.fail_next, None
            raise e
        sid, workdir = paused.sandbox_id, paused.workdir
        proc = await VmmProcess.spawn(["bash", "-c", f"exec -a trenvx-{sid} sleep 3600"], workdir / "vm" / "vmm.log",
                                      kill_with_owner=kill_with_owner)
        r = self.restorer
        vm = FakeVm(sid, workdir / "vm", proc, r.agent_port, r.forwards, vsock=r.vmm != "qemu")
        shutil.rmtree(workdir / PAUSE_DIR, ignore_errors=True)
        return dataclasses.replace(
            paused, vm=vm, agent=AgentClient.for_endpoint(vm.agent_endpoint, access_token=paused.access_token),
            times={"spawn": 0.001, "init": 0.001}, source="resumed")


async def start_microvm_standins(vmm: str, workdir: Path, pid: int, agent_port: int) -> list[Any]:
    """The sockets of a running Firecracker / Cloud Hypervisor VM in ``workdir``: the hybrid vsock socket
    (port 49983 piped to ``127.0.0.1:agent_port``) and the VMM's API stand-in, its VM running."""
    from tests.standins.cloud_hypervisor_api import CloudHypervisorApi
    from tests.standins.firecracker_api import FirecrackerApi
    from tests.standins.hybrid_vsock import HybridVsockStandIn
    from trenvx.vmm import cloud_hypervisor, firecracker

    vsock = HybridVsockStandIn(workdir / VSOCK_SOCKET, {AGENT_PORT: ("127.0.0.1", agent_port)})
    await vsock.start()
    api: Any
    if vmm == "firecracker":
        api = FirecrackerApi(workdir)
        api.state = "Running"
        await api.start(workdir / firecracker.API_SOCKET)
    elif vmm == "cloud-hypervisor":
        api = CloudHypervisorApi(pid=pid)
        api.state, api.config = "Running", {"vsock": {"socket": str(workdir / VSOCK_SOCKET)}}
        await api.start(workdir / cloud_hypervisor.API_SOCKET)
    else:
        raise ValueError(f"no stand-ins for vmm {vmm!r}")
    return [vsock, api]


def _network_fake_class() -> type:
    """A manager whose network is a stand-in: egress rules are recorded (``egress_applied``), not
    enforced; ``network_unavailable`` set to a message makes create (with rules) and set_network
    raise NetworkUnavailable, as a host without network namespaces does. The sandbox gets its
    egress policy, allow_public_traffic and (when private) a traffic token as a slot would give them."""
    from trenvx.sandbox.manager import NetworkUnavailable, SandboxManager

    class NetworkFakeManager(SandboxManager):
        network_unavailable: str | None = None

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.egress_applied: list[tuple[str, Any]] = []

        async def create(self, template: str | None = None, *, egress: Any = None, allow_public_traffic: bool = True,
                         **kw: Any) -> Any:
            if egress is not None and self.network_unavailable:
                raise NetworkUnavailable(self.network_unavailable)
            # the real manager refuses rules it cannot enforce (no slot here): it gets none, the
            # sandbox gets them afterwards, as a slot would have applied them
            sb = await super().create(template, egress=None, allow_public_traffic=allow_public_traffic, **kw)
            if egress is not None:
                sb.egress = egress
            sb.allow_public_traffic = allow_public_traffic
            if not allow_public_traffic and not sb.traffic_access_token:
                sb.traffic_access_token = secrets.token_urlsafe(16)
            return sb

        async def _apply_egress(self, sb: Any, egress: Any) -> None:
            if self.network_unavailable:
                raise NetworkUnavailable(self.network_unavailable)
            self.egress_applied.append((sb.id, egress))

    return NetworkFakeManager


def fake_manager(config: Config, agent_port: int, *, state: bool = True, keep: bool | None = None,
                 forwards: dict[int, int] | None = None, delay_s: float = 0.0, admission: Any = None,
                 vmm: str = "qemu", network: bool = False):
    """The real manager over fake VMs; ``network=True``: with a stand-in network (see _network_fake_class)."""
    from trenvx.sandbox.manager import SandboxManager

    from trenvx.config import NetworkConfig, NetworkMode

    # Fake VMs have no network slots: the manager runs in user mode (no namespaces, no host rules).
    config = config.model_copy(update={"network": NetworkConfig(mode=NetworkMode.user)})
    dr = DataRoot(config.data_root).ensure()
    cls = _network_fake_class() if network else SandboxManager
    m = cls(config, state_path=dr.run / "state.sqlite" if state else None, keep=keep, admission=admission,
            pools=False)
    m.restorer = FakeRestorer(dr, agent_port, forwards, delay_s, vmm=vmm)  # type: ignore[assignment]
    m.suspender = FakeSuspender(m.restorer)  # type: ignore[assignment]
    return m


async def fake_attach(spec: Any, pid: int, agent_port: int) -> FakeVm:
    """Replacement for adopt.attach_qemu: a FakeVm over a pidfd-watched process."""
    from trenvx.sandbox.adopt import PidProcess

    proc = PidProcess(pid, spec.workdir / "vmm.log")
    return FakeVm(spec.name, spec.workdir, proc, agent_port, {})


# -- the upstream server ----------------------------------------------------------------------

class UpstreamState:
    def __init__(self) -> None:
        self.stream_cancelled = 0
        self.last_headers: dict[str, str] = {}


def upstream_app(state: UpstreamState) -> Starlette:
    async def health(request: Request) -> Response:
        return Response(status_code=204)

    async def echo(request: Request) -> Response:
        # (a StreamingResponse would compete with request.stream() for receive())
        body = b"".join([chunk async for chunk in request.stream()])
        return Response(body, media_type="application/octet-stream",
                        headers={"x-chunked-upload": str("content-length" not in request.headers).lower()})

    async def headers(request: Request) -> JSONResponse:
        state.last_headers = dict(request.headers)
        return JSONResponse({"headers": dict(request.headers), "path": request.url.path,
                             "query": request.url.query, "method": request.method})

    async def stream(request: Request) -> StreamingResponse:
        n = int(request.query_params.get("n", "5"))
        delay = float(request.query_params.get("delay", "0.2"))

        async def gen():
            for i in range(n):
                yield f"chunk-{i}\n".encode()
                await asyncio.sleep(delay)
        return StreamingResponse(gen(), media_type="text/plain")

    async def forever(request: Request) -> StreamingResponse:
        async def gen():
            try:
                i = 0
                while True:
                    yield f"tick-{i}\n".encode()
                    i += 1
                    await asyncio.sleep(0.05)
            except (asyncio.CancelledError, GeneratorExit):
                state.stream_cancelled += 1
                raise
        return StreamingResponse(gen(), media_type="text/plain")

    async def stall(request: Request) -> Response:
        """Answers nothing for an hour: an agent blocked before its answer (a read of a FIFO)."""
        await asyncio.sleep(3600)
        return Response(status_code=204)

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept(subprotocol=(websocket.scope.get("subprotocols") or [None])[0])
        try:
            while True:
                msg = await websocket.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                if msg.get("text") is not None:
                    await websocket.send_text("echo:" + msg["text"])
                elif msg.get("bytes") is not None:
                    await websocket.send_bytes(b"echo:" + msg["bytes"])
        except Exception:  # noqa: BLE001
            return

    return Starlette(routes=[
        Route("/health", health), Route("/echo", echo, methods=["POST", "PUT"]),
        Route("/headers", headers, methods=["GET", "POST", "DELETE"]), Route("/stream", stream),
        Route("/forever", forever), Route("/stall", stall), WebSocketRoute("/ws", ws),
    ])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadedServer:
    """Runs an ASGI app with uvicorn in a background thread (own event loop)."""

    def __init__(self, app: Any, port: int | None = None, lifespan: str = "off") -> None:
        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan=lifespan, ws="auto"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadedServer":
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("upstream server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with contextlib.suppress(Exception):
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    return False


def rm(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)


@contextlib.asynccontextmanager
async def fake_api(data_root: Path, agent_port: int, *, network: bool = False, **orch: Any) -> Any:
    """The real app over a fake manager (template ``tpl``, agents answered by the upstream on
    ``agent_port``), as an httpx client on it; ``client.manager`` is the manager."""
    import httpx  # (the fakes themselves need no HTTP client)

    from trenvx.server.app import create_app

    make_template(data_root, "tpl")
    cfg = make_config(data_root, **orch)
    m = fake_manager(cfg, agent_port, network=network)
    await m.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(cfg, manager=m)),
                                     base_url="http://testserver") as c:
            c.manager = m  # type: ignore[attr-defined]
            yield c
    finally:
        await m.close()
