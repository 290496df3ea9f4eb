"""Re-attaching to VMM processes that a previous server started (``trenvx serve --keep``).

A restarted server is not the parent of those processes, so it cannot ``waitpid`` them. It
watches them through a pidfd instead (readable when the process ends, immune to pid reuse)
and reaches each VMM through the control socket it keeps open in the VM's workdir: QEMU's QMP
socket, Firecracker's and Cloud Hypervisor's API sockets (whose guest agent is then reached
through the hybrid vsock socket next to it, :attr:`Vm.agent_endpoint`). :func:`attach` picks
the way by the VMM recorded for the sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
from qemu.qmp import QMPClient

from ..config import VmmType
from ..vmm.base import Vm, VmmError, VmSpec, VmState
from ..vmm.binaries import VmmBinary, parse_version
from ..vmm.jail import VmmJail
from ..vmm.uds_api import UdsApi

if TYPE_CHECKING:
    from ..vmm.cloud_hypervisor import CloudHypervisorVm
    from ..vmm.firecracker import FirecrackerVm
    from ..vmm.qemu import QemuVm

log = logging.getLogger(__name__)

QMP_SOCKET = "qmp.sock"
QMP_CONNECT_TIMEOUT_S = 5.0
API_ATTACH_TIMEOUT_S = 5.0


def process_started_at(pid: int) -> float | None:
    """The start time of process ``pid`` (seconds since the epoch), or None if it does not exist."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def recorded_vmm(value: str) -> VmmType:
    """The :class:`VmmType` of a state record's ``vmm_type``; VmmError if this trenvx does not know it."""
    try:
        return VmmType(value)
    except ValueError:
        raise VmmError(
            f"the sandbox is recorded as running on VMM {value!r}, which this trenvx does not know "
            f"(known: {', '.join(t.value for t in VmmType)}); adopt it with the trenvx that started it"
        ) from None


def process_marker(vmm_type: str, sandbox_id: str) -> str:
    """A string in the command line of the VMM process of ``sandbox_id``: QEMU's ``-name trenvx-<id>``;
    Firecracker's ``--id`` and API socket path, Cloud Hypervisor's API socket path (in the
    sandbox's workdir) hold the sandbox id."""
    return f"trenvx-{sandbox_id}" if vmm_type == VmmType.qemu.value else sandbox_id


def is_our_vmm(pid: int, started_at: float, name: str) -> bool:
    """Whether ``pid`` is still the VMM process we recorded (same start time, ``name`` in its command
    line: see :func:`process_marker`)."""
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        if abs(p.create_time() - started_at) > 1.0:
            return False
        return any(name in arg for arg in p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


class PidProcess:
    """A process that is not our child, with the interface of :class:`trenvx.vmm.process.VmmProcess`."""

    def __init__(self, pid: int, log_path: Path) -> None:
        self.pid = pid
        self.log_path = log_path
        self.returncode: int | None = None
        try:
            self._fd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._fd = None
            self.returncode = -1
        self._exited = asyncio.get_running_loop().create_future()
        if self._fd is None:
            self._exited.set_result(-1)
        else:
            asyncio.get_running_loop().add_reader(self._fd, self._on_exit)

    def _on_exit(self) -> None:
        self._close_fd()
        self.returncode = -1  # not our child: its exit status went to its parent
        if not self._exited.done():
            self._exited.set_result(-1)

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

    def is_alive(self) -> bool:
        return self.returncode is None

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    async def kill(self, grace_s: float = 0.0) -> None:
        if self.returncode is not None or self._fd is None:
            return
        try:
            signal.pidfd_send_signal(self._fd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await self.wait()

    def detach(self) -> None:
        """Stop watching (the process keeps running)."""
        self._close_fd()

    def output_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


async def attach(vmm_type: VmmType, spec: VmSpec, pid: int, agent_port: int) -> Vm:
    """A :class:`Vm` for the running VMM process ``pid`` of ``spec``, started by another process.

    ``agent_port`` is the recorded host port of QEMU's forward to the agent (unused by the other
    VMMs, whose agent is reached through the hybrid vsock socket in ``spec.workdir``). Raises
    VmmError (or the QMP client's error) when the VMM does not answer on its control socket.
    """
    if vmm_type is VmmType.qemu:
        return await attach_qemu(spec, pid, agent_port)
    if vmm_type is VmmType.firecracker:
        return await attach_firecracker(spec, pid)
    if vmm_type is VmmType.cloud_hypervisor:
        return await attach_cloud_hypervisor(spec, pid)
    raise VmmError(f"cannot re-attach to a {vmm_type.value} VM: no way to do so is known")


async def release(vm: Vm) -> None:
    """Let go of ``vm`` without stopping it: close its control connection, stop watching its process."""
    qmp = getattr(vm, "qmp", None)
    if qmp is not None:
        with contextlib.suppress(Exception):
            await qmp.disconnect()
    api = getattr(vm, "api", None)
    if isinstance(api, UdsApi):
        with contextlib.suppress(Exception):
            await api.aclose()
    detach = getattr(getattr(vm, "process", None), "detach", None)
    if detach is not None:
        detach()


async def attach_qemu(spec: VmSpec, pid: int, agent_port: int) -> QemuVm:
    """A :class:`~trenvx.vmm.qemu.QemuVm` for a running QEMU of ``spec`` started by another process."""
    from ..vmm.qemu import QemuVm

    spec = dataclasses.replace(spec, agent_host_port=agent_port, kill_with_owner=False)
    process = PidProcess(pid, spec.workdir / "vmm.log")
    qmp = QMPClient(spec.name)
    try:
        await asyncio.wait_for(qmp.connect(str(spec.workdir / QMP_SOCKET)), QMP_CONNECT_TIMEOUT_S)
    except BaseException:
        process.detach()
        with contextlib.suppress(Exception):
            await qmp.disconnect()
        raise
    jail = VmmJail.of_running(spec.jail, spec.name, pid) if spec.jail is not None else None
    vm = QemuVm(spec, process, qmp, VmState.running, jail)  # type: ignore[arg-type]
    vm.agent_port = agent_port
    return vm


def _api_of(
    spec: VmSpec, pid: int, socket_name: str, vmm: str, describe_error: Callable[[int, bytes], str], prefix: str = "",
) -> tuple[PidProcess, UdsApi]:
    """The watched process and an API client on its socket ``spec.workdir/socket_name``."""
    sock = spec.workdir / socket_name
    if not sock.exists():
        raise VmmError(f"the API socket {sock} of {vmm} (pid {pid}) is gone: cannot re-attach to {spec.name}")
    process = PidProcess(pid, spec.workdir / "vmm.log")
    api = UdsApi(sock, vmm=vmm, process=process, describe_error=describe_error, prefix=prefix)  # type: ignore[arg-type]
    return process, api


def _vm_state(vmm: str, name: str, state: object) -> VmState:
    """``Running`` / ``Paused`` (as both VMMs name them) as a VmState; VmmError for any other state."""
    if state == "Running":
        return VmState.running
    if state == "Paused":
        return VmState.paused
    raise VmmError(f"{vmm} of {name} reports its VM as {state!r}, not running or paused: nothing to re-attach to")


async def attach_firecracker(spec: VmSpec, pid: int) -> FirecrackerVm:
    """A :class:`~trenvx.vmm.firecracker.FirecrackerVm` for a running Firecracker of ``spec``, through
    its API socket in ``spec.workdir`` (``GET /`` says whether its VM runs)."""
    from ..vmm.firecracker import API_SOCKET, FirecrackerVm, describe_error

    spec = dataclasses.replace(spec, kill_with_owner=False)
    process, api = _api_of(spec, pid, API_SOCKET, "Firecracker", describe_error)
    try:
        info = await api.request("GET", "/", timeout=API_ATTACH_TIMEOUT_S)
        state = _vm_state("Firecracker", spec.name, info.get("state") if isinstance(info, dict) else info)
    except BaseException:
        await api.aclose()
        process.detach()
        raise
    return FirecrackerVm(spec, process, api, state)  # type: ignore[arg-type]


async def attach_cloud_hypervisor(spec: VmSpec, pid: int) -> CloudHypervisorVm:
    """A :class:`~trenvx.vmm.cloud_hypervisor.CloudHypervisorVm` for a running Cloud Hypervisor of
    ``spec``, through its API socket in ``spec.workdir`` (``vmm.ping``: its version and pid;
    ``vm.info``: whether its VM runs)."""
    from ..vmm.cloud_hypervisor import API_PREFIX, API_SOCKET, CloudHypervisorVm, describe_error

    spec = dataclasses.replace(spec, kill_with_owner=False)
    process, api = _api_of(spec, pid, API_SOCKET, "Cloud Hypervisor", describe_error, API_PREFIX)
    try:
        ping = await api.request("GET", "/vmm.ping", timeout=API_ATTACH_TIMEOUT_S)
        ping = ping if isinstance(ping, dict) else {}
        if isinstance(ping.get("pid"), int) and ping["pid"] != pid:
            raise VmmError(
                f"the API socket {api.socket_path} answers for Cloud Hypervisor pid {ping['pid']}, not the "
                f"recorded pid {pid}: not re-attaching {spec.name}"
            )
        info = await api.request("GET", "/vm.info", timeout=API_ATTACH_TIMEOUT_S)
        state = _vm_state("Cloud Hypervisor", spec.name, info.get("state") if isinstance(info, dict) else info)
    except BaseException:
        await api.aclose()
        process.detach()
        raise
    version_text = str(ping.get("version") or ping.get("build_version") or "")
    binary = VmmBinary(path=_executable(pid), version=parse_version(version_text) or (0, 0, 0),
                       banner=str(ping.get("build_version") or version_text))
    return CloudHypervisorVm(spec, process, api, binary, state)  # type: ignore[arg-type]


def _executable(pid: int) -> str:
    try:
        return psutil.Process(pid).exe()
    except psutil.Error:
        return ""
