"""VMM drivers behind one interface (:class:`VmmDriver`): QEMU, Firecracker, Cloud Hypervisor."""

from __future__ import annotations

from ..config import Config, VmmType
from .base import DiskSpec, MachineSpec, SnapshotFiles, StageTimes, Vm, VmmDriver, VmmError, VmSpec, VmState

__all__ = [
    "DiskSpec", "MachineSpec", "SnapshotFiles", "StageTimes", "Vm", "VmmDriver", "VmmError", "VmSpec",
    "VmState", "driver_for",
]


def driver_for(vmm_type: VmmType, config: Config) -> VmmDriver:
    """The driver for ``vmm_type``, configured from ``config``."""
    if vmm_type is VmmType.qemu:
        from .qemu import QemuDriver

        return QemuDriver(config.vmm.qemu_binary)
    raise VmmError(
        f"vmm_type {vmm_type.value!r} is not supported by this version of trenvx yet; use vmm_type = \"qemu\""
    )
