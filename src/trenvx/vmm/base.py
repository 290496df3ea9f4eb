"""The one interface every VMM driver implements, and the value types that cross it.

A driver turns a :class:`VmSpec` into a running VM (``boot``), writes a snapshot of a running
VM (``snapshot``), and brings a snapshot back to life in a new process (``prestart`` +
``restore``). It knows nothing of templates or sandboxes: those are the layers above.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..guest.endpoint import AgentEndpoint, HybridVsockEndpoint, TcpEndpoint

if TYPE_CHECKING:
    from .jail import JailPolicy

__all__ = [
    "AgentEndpoint", "DiskFormat", "DiskSpec", "HybridVsockEndpoint", "MachineSpec", "SnapshotFiles", "StageTimes",
    "TcpEndpoint", "Vm", "VmSpec", "VmState", "VmStats", "VmmDriver", "VmmError",
]

DiskFormat = Literal["raw", "qcow2"]


class VmmError(Exception):
    """A VMM process failed to start, answer, snapshot or restore. The message says which."""


class VmState(str, enum.Enum):
    incoming = "incoming"  # started, waiting for a snapshot to restore
    running = "running"
    paused = "paused"
    exited = "exited"


@dataclass(frozen=True)
class DiskSpec:
    path: Path
    format: DiskFormat = "raw"
    read_only: bool = False


@dataclass(frozen=True)
class MachineSpec:
    """Everything that must be identical between the VM that was snapshotted and its restores."""

    vcpu: int
    mem_mb: int
    accelerator: Literal["kvm", "tcg"]
    kernel: Path
    initrd: Path
    cmdline: str
    tcg_tb_size_mb: int = 32


@dataclass(frozen=True)
class VmSpec:
    """One VM process: its machine, its files, and how the host reaches its agent."""

    name: str
    workdir: Path
    """Holds this VM's control sockets, console log and pid file; the caller owns it."""
    machine: MachineSpec
    memory_file: Path
    """Guest RAM. Shared (written back to the file) while building, private (copy-on-write) on restore."""
    memory_shared: bool
    root_disk: DiskSpec
    anonymous_memory: bool = False
    """Guest RAM is the VM's own anonymous memory, not ``memory_file``: for a cold boot, or filled
    from a full snapshot's stream (every VM a private copy, as E2B restores). Only the baselines of
    the benchmarks use it."""
    agent_host_port: int = 0
    """Host TCP port (on 127.0.0.1) forwarded to the guest agent's port; 0 lets the kernel choose."""
    kill_with_owner: bool = True
    """Kill the VMM when the process that started it dies (off for servers that adopt VMs on restart)."""
    net_tap: str = ""
    """A tap device for the guest's eth0 (in ``netns`` when that is set); empty: QEMU's user
    networking (Firecracker, Cloud Hypervisor: no network device, the agent over vsock)."""
    netns: str = ""
    """A named network namespace (``/run/netns/NAME``) the VMM process runs in; its tap is there."""
    guest_address: str = ""
    """Where the host reaches the guest's ports when it has a tap network (the slot's address);
    empty: through the VMM's port forwards on 127.0.0.1."""
    isolated_user_net: bool = False
    """QEMU user networking with ``restrict=on``: the guest reaches nothing (only the port forwards
    the host adds reach it). For sandboxes on hosts without network namespaces."""
    root_on_pmem: bool = False
    """Attach ``root_disk`` as virtio-pmem, read-only and shared (the guest maps the one image with
    DAX, no copy in its page cache), instead of virtio-blk. The guest's writes go to ``scratch_disk``
    (the overlay mode's upper layer)."""
    scratch_disk: DiskSpec | None = None
    """The writable disk (the upper layer of the overlay mode) next to a pmem root."""
    jail: JailPolicy | None = None
    """Run the VMM jailed (:mod:`trenvx.vmm.jail`: its own uid, mount namespace, cgroup, seccomp);
    None: as the server's user, as template builds do. QEMU only."""

    @property
    def own_disk(self) -> DiskSpec:
        """The disk this VM writes to: the writable layer in overlay mode, else the root disk."""
        return self.scratch_disk if self.root_on_pmem and self.scratch_disk is not None else self.root_disk


@dataclass(frozen=True)
class SnapshotFiles:
    """A snapshot on disk: device state, and the guest RAM file it refers to."""

    vmstate: Path
    memory_file: Path


@dataclass
class VmStats:
    pid: int
    rss_bytes: int
    pss_bytes: int
    cpu_seconds: float


@dataclass
class StageTimes:
    """Seconds spent in each step of a restore, in order (a driver fills in ``load`` and ``resume``)."""

    steps: dict[str, float] = field(default_factory=dict)


class Vm(abc.ABC):
    """A running (or restorable) VMM process. Owned by whoever created it: they must ``kill`` it."""

    spec: VmSpec
    agent_port: int
    """The host port (on 127.0.0.1) that reaches the guest agent."""

    @property
    @abc.abstractmethod
    def pid(self) -> int: ...

    @property
    def agent_url(self) -> str:
        return f"http://127.0.0.1:{self.agent_port}"

    @property
    def agent_endpoint(self) -> AgentEndpoint:
        """How the host reaches the guest agent: TCP to ``agent_port`` unless the driver says otherwise
        (Firecracker and Cloud Hypervisor: hybrid vsock). Connect with ``AgentClient.for_endpoint``."""
        return TcpEndpoint("127.0.0.1", self.agent_port)

    @property
    def console_log(self) -> Path:
        return self.spec.workdir / "console.log"

    @abc.abstractmethod
    async def pause(self) -> None: ...

    @abc.abstractmethod
    async def resume(self) -> None: ...

    @abc.abstractmethod
    async def kill(self) -> None:
        """Stop the process (idempotent) and reap it. Files in ``workdir`` stay."""

    @abc.abstractmethod
    def is_alive(self) -> bool: ...

    @abc.abstractmethod
    async def wait_exit(self) -> int:
        """Wait until the VMM process ends; its exit status."""

    def stats(self) -> VmStats:
        """Memory (RSS, and PSS: shared pages divided among their users) and CPU time of the VMM."""
        from .process import cpu_seconds_of, memory_of

        rss, pss = memory_of(self.pid)
        return VmStats(pid=self.pid, rss_bytes=rss, pss_bytes=pss, cpu_seconds=cpu_seconds_of(self.pid))

    def console_tail(self, lines: int = 30) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class VmmDriver(abc.ABC):
    """Boot, snapshot, restore. One implementation per VMM."""

    name: str
    disk_formats: tuple[DiskFormat, ...] = ("raw", "qcow2")
    root_on_pmem: bool = False
    """This VMM can attach an image as virtio-pmem (``VmSpec.root_on_pmem``: the overlay mode)."""
    free_page_reporting: bool = False
    """Its guests give the memory they free back to the host (virtio-balloon free page reporting)."""
    device_layout: str = "1"
    """Changes whenever the devices of this driver's VMs change: a snapshot restores only into the
    same devices, so it is part of a template build's inputs (a change rebuilds templates)."""
    """Root disk formats this VMM opens. Drivers without qcow2 need a raw per-sandbox disk:
    :func:`trenvx.vmm.hostfs.clone_file` makes one by reflink (or a full copy)."""

    @abc.abstractmethod
    async def boot(self, spec: VmSpec) -> Vm:
        """Start a VM from its kernel. Returns once the process runs (not once the guest is up)."""

    @abc.abstractmethod
    async def snapshot(self, vm: Vm, dest: Path) -> SnapshotFiles:
        """Pause ``vm`` and write its device state into ``dest``; guest RAM stays in its file.

        The VM is stopped afterwards and must be killed by the caller.
        """

    @abc.abstractmethod
    async def prestart(self, spec: VmSpec) -> Vm:
        """Start a VMM process that waits for a snapshot (no guest code runs yet)."""

    @abc.abstractmethod
    async def restore(self, vm: Vm, snapshot: SnapshotFiles, times: StageTimes | None = None) -> None:
        """Load ``snapshot`` into a prestarted ``vm`` and resume it."""

    async def restore_fresh(self, spec: VmSpec, snapshot: SnapshotFiles, times: StageTimes | None = None) -> Vm:
        """Start a new process and restore into it (the path when no prestarted process is at hand)."""
        vm = await self.prestart(spec)
        try:
            await self.restore(vm, snapshot, times)
        except BaseException:
            await vm.kill()
            raise
        return vm
