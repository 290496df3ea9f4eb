"""Re-attaching to VMM processes that a previous server started (``trenvx serve --keep``).

A restarted server is not the parent of those processes, so it cannot ``waitpid`` them. It
watches them through a pidfd instead (readable when the process ends, immune to pid reuse)
and reaches QEMU through the unix QMP socket QEMU keeps open in the VM's workdir.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from pathlib import Path

import psutil
from qemu.qmp import QMPClient

from ..vmm.base import VmSpec, VmState

log = logging.getLogger(__name__)

QMP_SOCKET = "qmp.sock"
QMP_CONNECT_TIMEOUT_S = 5.0


def process_started_at(pid: int) -> float | None:
    """The start time of process ``pid`` (seconds since the epoch), or None if it does not exist."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def is_our_vmm(pid: int, started_at: float, name: str) -> bool:
    """Whether ``pid`` is still the VMM process we recorded (same start time, named after the sandbox)."""
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


async def attach_qemu(spec: VmSpec, pid: int, agent_port: int):  # -> QemuVm
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
    vm = QemuVm(spec, process, qmp, VmState.running)  # type: ignore[arg-type]
    vm.agent_port = agent_port
    return vm
