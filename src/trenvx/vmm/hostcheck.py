"""Which VMMs and accelerators this host can run, and why not: for ``trenvx doctor`` and the tests.

- QEMU: its binary; it runs under KVM where usable, else under TCG (slower, always possible).
- Firecracker, Cloud Hypervisor: their binary at a supported version (``--version``), and KVM:
  neither has a software-emulation mode, and a PVM-only /dev/kvm cannot run stock guest kernels.
- vhost-vsock (``/dev/vhost-vsock``, module ``vhost_vsock``): the host kernel's vsock backend,
  needed for a QEMU vhost-vsock device; Firecracker's and Cloud Hypervisor's hybrid vsock is
  emulated in the VMM and does not need it.
- reflink on ``data_root``: per-sandbox raw disks (Firecracker, Cloud Hypervisor) are free with
  it and full copies without.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, VmmType
from .accel import kvm_obstacle
from .base import VmmError
from .binaries import BinaryRequirement, check_binary


@dataclass(frozen=True)
class Availability:
    """One VMM or host feature: usable or not, and a detail that says why and what to do."""

    name: str
    usable: bool
    detail: str


def _run(coro):  # noqa: ANN001, ANN202 - a coroutine run to completion from sync code, loop or not
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _microvm(configured: str, req: BinaryRequirement, kvm_problem: str | None) -> tuple[bool, str]:
    try:
        binary = _run(check_binary(configured, req))
    except VmmError as e:
        return False, str(e)
    if kvm_problem:
        return False, f"{binary.path} ({binary.version_text}) is installed, but {req.vmm} needs KVM and {kvm_problem}"
    return True, f"{binary.path} ({binary.banner})"


def vmm_availability(config: Config) -> list[Availability]:
    """Each VMM of :class:`VmmType`: whether templates can be built and restored with it here."""
    from .cloud_hypervisor import REQUIREMENT as CH
    from .firecracker import REQUIREMENT as FC

    kvm_problem = kvm_obstacle()
    out = []
    qemu = shutil.which(config.vmm.qemu_binary)
    if qemu:
        accel = "KVM" if not kvm_problem else "TCG only (software emulation, slower)"
        out.append(Availability(VmmType.qemu.value, True, f"{qemu}; {accel}"))
    else:
        out.append(Availability(VmmType.qemu.value, False,
                                f"{config.vmm.qemu_binary} not on PATH: run scripts/start.sh setup"))
    ok, detail = _microvm(config.fc_binary_path, FC, kvm_problem)
    out.append(Availability(VmmType.firecracker.value, ok, detail))
    ok, detail = _microvm(config.ch_binary_path, CH, kvm_problem)
    out.append(Availability(VmmType.cloud_hypervisor.value, ok, detail))
    return out


def accelerator_availability(config: Config) -> list[Availability]:
    problem = kvm_obstacle()
    kvm = Availability("kvm", problem is None, "/dev/kvm usable" if problem is None else
                       f"{problem} -> QEMU falls back to TCG; Firecracker and Cloud Hypervisor cannot run")
    qemu = shutil.which(config.vmm.qemu_binary)
    tcg = Availability("tcg", bool(qemu), "QEMU's software emulation (QEMU only; slower than KVM)" if qemu else
                       f"needs QEMU: {config.vmm.qemu_binary} not on PATH (scripts/start.sh setup)")
    return [kvm, tcg]


def vhost_vsock_availability() -> Availability:
    dev, mod = Path("/dev/vhost-vsock"), Path("/sys/module/vhost_vsock")
    if dev.exists() and os.access(dev, os.R_OK | os.W_OK):
        return Availability("vhost-vsock", True, "/dev/vhost-vsock usable")
    why = ("/dev/vhost-vsock is not readable and writable by this user" if dev.exists() else
           "module vhost_vsock is loaded but /dev/vhost-vsock is missing" if mod.exists() else
           "the host kernel has no vhost_vsock (modprobe vhost_vsock, or a kernel with CONFIG_VHOST_VSOCK)")
    return Availability("vhost-vsock", False,
                        f"{why}; only a QEMU vsock device needs it (Firecracker/Cloud Hypervisor emulate hybrid vsock)")


def reflink_availability(data_root: Path) -> Availability:
    from .hostfs import reflink_supported

    ok, why = reflink_supported(data_root)
    if ok:
        return Availability("reflink", True, f"{why}: per-sandbox raw disks are free")
    return Availability("reflink", False, f"{why}: Firecracker/Cloud Hypervisor sandboxes get full disk copies; "
                        "put data_root on XFS (reflink=1) or btrfs")


def jail_availability(config: Config) -> list[Availability]:
    """Which pieces of the jailed VMM (:mod:`.jail`) this host allows: a uid per VMM, a mount
    namespace, cgroups (version and controllers), QEMU's seccomp policy. Nothing is changed on the host."""
    from .jail import owner_of, probe_host

    if config.jail.enabled is False:
        return [Availability("jail", False, "[jail] enabled = false: VMMs run as the server's user")]
    host = probe_host(owner_of(config.data_root), config.vmm.qemu_binary, prepare=False)
    return [Availability(name, ok, detail) for name, ok, detail in host.rows()]


__all__ = ["Availability", "accelerator_availability", "jail_availability", "reflink_availability", "vhost_vsock_availability",
           "vmm_availability"]
