"""What the Firecracker and Cloud Hypervisor drivers share: KVM only, an ELF kernel, the agent on
hybrid vsock, and a kernel command line fitted to the devices actually attached.

The template's command line is written for QEMU (``root=/dev/vda``, ``trenvx.net=`` for user
networking). Without a tap device there is no eth0, and the initramfs would stop waiting for
one; with the root on virtio-pmem the root device is ``/dev/pmem0`` mounted with DAX.
"""

from __future__ import annotations

import os
from pathlib import Path

from typing import Any

from ..config import AGENT_PORT
from .base import DiskFormat, HybridVsockEndpoint, Vm, VmmDriver, VmmError, VmSpec, VmState
from .binaries import BinaryRequirement, VmmBinary, check_binary
from .uds_api import check_socket_path

GUEST_CID = 3
"""The guest's vsock context id (every VM has its own vsock device, so one value serves all)."""
VSOCK_SOCKET = "v.sock"
"""The hybrid vsock socket, in the VM's workdir."""
_NET_PARAMS = ("trenvx.net=", "trenvx.dns=")


def require_kvm(spec: VmSpec, vmm: str) -> None:
    if spec.machine.accelerator != "kvm":
        raise VmmError(
            f"{vmm} runs VMs only under KVM, but {spec.name} is a {spec.machine.accelerator} machine "
            f"(this host: see `trenvx doctor`); build the template on a host with usable /dev/kvm, "
            f"or use vmm_type = \"qemu\""
        )


def adapt_cmdline(cmdline: str, *, network: bool, root: str | None = None) -> str:
    """``cmdline`` without the network parameters when there is no NIC, and with ``root`` (e.g.
    ``/dev/pmem0 rootflags=dax``) in place of its ``root=`` (and ``rootflags=``) when given."""
    words = cmdline.split()
    if not network:
        words = [w for w in words if not w.startswith(_NET_PARAMS)]
    if root is not None:
        words = [w for w in words if not w.startswith(("root=", "rootflags="))]
        words += root.split()
    return " ".join(words)


def socket_workdir(workdir: Path, api_socket: str) -> Path:
    """Make ``workdir`` ready for a new VMM process: socket paths within the UNIX limit, stale
    sockets of an earlier process gone. The API socket's path."""
    sock = workdir / api_socket
    check_socket_path(sock)
    check_socket_path(workdir / VSOCK_SOCKET)
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in (sock, workdir / VSOCK_SOCKET):
        stale.unlink(missing_ok=True)
    return sock


def agent_endpoint(workdir: Path) -> HybridVsockEndpoint:
    return HybridVsockEndpoint(workdir / VSOCK_SOCKET, AGENT_PORT)


def link(target: Path, at: Path) -> None:
    """Make ``at`` a symlink to ``target`` (replacing what was there)."""
    try:
        at.unlink()
    except FileNotFoundError:
        pass
    os.symlink(target.resolve(), at)


class ApiSocketVm(Vm):
    """A Firecracker or Cloud Hypervisor VM: its process, the API client on its socket, its agent
    on the hybrid vsock socket in its workdir. Subclasses say how to pause and resume."""

    def __init__(self, spec: VmSpec, process: Any, api: Any, state: VmState) -> None:
        self.spec = spec
        self.agent_port = 0
        self.process = process
        """A :class:`trenvx.vmm.process.VmmProcess` (or an adopted process with its interface)."""
        self.api = api
        """A :class:`trenvx.vmm.uds_api.UdsApi` on the VMM's API socket."""
        self.state = state

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    @property
    def agent_endpoint(self) -> HybridVsockEndpoint:
        return agent_endpoint(self.spec.workdir)

    def is_alive(self) -> bool:
        return bool(self.process.is_alive())

    async def wait_exit(self) -> int:
        return int(await self.process.wait())

    async def kill(self) -> None:
        await self.api.aclose()
        await self.process.kill()
        self.state = VmState.exited


class ApiSocketDriver(VmmDriver):
    """What the Firecracker and Cloud Hypervisor drivers share: raw disks only, a binary checked
    against ``requirement``, a cache of extracted vmlinux files."""

    disk_formats: tuple[DiskFormat, ...] = ("raw",)
    requirement: BinaryRequirement

    def __init__(self, binary: str = "", *, cache_dir: Path) -> None:
        """``binary``: the configured path (``fc_binary_path`` / ``ch_binary_path``; empty: the
        requirement's name on PATH); ``cache_dir``: where extracted vmlinux files are kept
        (``data_root/cache/vmlinux``)."""
        self.configured = binary
        self.cache_dir = cache_dir

    async def binary(self) -> VmmBinary:
        return await check_binary(self.configured, self.requirement)
