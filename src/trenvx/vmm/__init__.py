"""VMM drivers behind one interface (:class:`VmmDriver`): QEMU, Firecracker, Cloud Hypervisor."""

from __future__ import annotations

from ..config import Config, VmmType
from .base import DiskSpec, MachineSpec, SnapshotFiles, StageTimes, Vm, VmmDriver, VmmError, VmSpec, VmState

__all__ = [
    "DiskSpec", "MachineSpec", "SnapshotFiles", "StageTimes", "Vm", "VmmDriver", "VmmError", "VmSpec",
    "VmState", "check_template_vmm", "driver_for",
]


def driver_for(vmm_type: VmmType, config: Config) -> VmmDriver:
    """The driver for ``vmm_type``, configured from ``config``."""
    if vmm_type is VmmType.qemu:
        from .qemu import QemuDriver

        return QemuDriver(config.vmm.qemu_binary, cache_dir=config.data_root / "cache")
    cache = config.data_root / "cache" / "vmlinux"
    if vmm_type is VmmType.firecracker:
        from .firecracker import FirecrackerDriver

        return FirecrackerDriver(config.fc_binary_path, cache_dir=cache)
    if vmm_type is VmmType.cloud_hypervisor:
        from .cloud_hypervisor import CloudHypervisorDriver

        return CloudHypervisorDriver(config.ch_binary_path, cache_dir=cache)
    raise VmmError(f"unknown vmm_type {vmm_type!r}; use one of: {', '.join(t.value for t in VmmType)}")


def check_template_vmm(template: str, built_with: str, restoring_with: str) -> None:
    """Raise VmmError unless a template built with ``built_with`` is restored with the same VMM.

    A snapshot holds one VMM's device state: another VMM cannot load it.
    """
    if built_with != restoring_with:
        raise VmmError(
            f"template {template!r} was built with vmm_type {built_with!r} and cannot be restored with "
            f"{restoring_with!r}: a snapshot holds one VMM's device state. Restore it with {built_with}, or "
            f"rebuild the template with vmm_type = \"{restoring_with}\""
        )
