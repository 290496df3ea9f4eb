"""The Firecracker driver: its documented HTTP API on a unix socket, snapshots restored copy-on-write.

- Boot: ``PUT /machine-config``, ``/boot-source`` (an ELF vmlinux extracted from the bzImage,
  :mod:`trenvx.kernel.vmlinux`), ``/drives/rootfs``, ``/vsock``, ``/entropy``, and with a tap device
  ``/network-interfaces/eth0`` + ``/mmds/config`` + ``/mmds``; then ``PUT /actions InstanceStart``.
- Snapshot: ``PATCH /vm Paused``, ``PUT /snapshot/create`` (Full): the device state into
  ``vmstate``, the guest RAM into the VM's ``memory_file``.
- Restore: a fresh process (``/snapshot/load`` is only accepted before anything is configured),
  ``PUT /snapshot/load`` with ``mem_backend {backend_type: File}``: Firecracker maps the memory
  file ``MAP_PRIVATE``, so every sandbox of a template shares its pages in the host page cache and
  copies only those it writes; ``resume_vm`` starts it in the same call.

Per-sandbox paths: a snapshot records the drive's and the vsock socket's paths as given at boot.
They are given relative (``rootfs``, ``v.sock``) and every Firecracker process runs in its VM's
workdir, where ``rootfs`` is a symlink to that VM's disk: a restore in another workdir finds its
own disk and creates its own vsock socket, on every Firecracker version (``vsock_override`` and
the like are not needed). Firecracker opens only raw images: the per-sandbox disk is a reflink
copy of the template's (:func:`trenvx.vmm.hostfs.clone_file`).

The guest's serial console goes to Firecracker's stdout, i.e. ``vmm.log`` in the workdir.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

from ..kernel.vmlinux import ensure_vmlinux
from .base import SnapshotFiles, StageTimes, Vm, VmmError, VmSpec, VmState
from .binaries import BinaryRequirement
from .microvm import GUEST_CID, ApiSocketDriver, ApiSocketVm, socket_workdir, VSOCK_SOCKET, adapt_cmdline, link, require_kvm
from .process import VmmProcess
from .uds_api import UdsApi

log = logging.getLogger(__name__)

REQUIREMENT = BinaryRequirement(
    vmm="Firecracker",
    default_name="firecracker",
    config_key="fc_binary_path",
    minimum=(1, 8, 0),
    why_minimum=(
        "1.8 describes virtio devices to the guest in ACPI tables; Debian's kernel has no "
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES to find them on the command line as older releases pass them"
    ),
)
API_SOCKET = "fc.sock"
ROOT_LINK = "rootfs"
"""The drive's path as Firecracker sees it: relative to the process's cwd (the VM's workdir)."""
GUEST_MAC = "06:00:ac:10:00:02"
SNAPSHOT_TIMEOUT_S = 300.0
_ID_RE = re.compile(r"[^A-Za-z0-9-]")


def describe_error(status: int, body: bytes) -> str:
    """Firecracker's error body is ``{"fault_message": "..."}``."""
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("fault_message"), str):
        return obj["fault_message"]
    return body.decode(errors="replace").strip() or f"HTTP {status} without a body"


class FirecrackerVm(ApiSocketVm):
    @property
    def console_log(self) -> Path:
        return Path(self.process.log_path)

    async def pause(self) -> None:
        await self.api.request("PATCH", "/vm", {"state": "Paused"})
        self.state = VmState.paused

    async def resume(self) -> None:
        await self.api.request("PATCH", "/vm", {"state": "Resumed"})
        self.state = VmState.running

    async def set_metadata(self, data: dict[str, object]) -> None:
        """Merge ``data`` into the guest's MMDS store (``PATCH /mmds``; needs a tap device)."""
        await self.api.request("PATCH", "/mmds", dict(data))



class FirecrackerDriver(ApiSocketDriver):
    name = "firecracker"
    requirement = REQUIREMENT

    async def _spawn(self, spec: VmSpec, state: VmState) -> FirecrackerVm:
        require_kvm(spec, "Firecracker")
        binary = await self.binary()
        if spec.root_disk.format != "raw":
            raise VmmError(
                f"Firecracker opens raw disk images only, but {spec.name}'s root disk {spec.root_disk.path} is "
                f"{spec.root_disk.format}; give it a raw copy (trenvx.vmm.hostfs.clone_file)"
            )
        sock = socket_workdir(spec.workdir, API_SOCKET)
        link(spec.root_disk.path, spec.workdir / ROOT_LINK)
        argv = [binary.path, "--api-sock", str(sock), "--id", _ID_RE.sub("-", spec.name)[:64] or "vm"]
        process = await VmmProcess.spawn(
            argv, spec.workdir / "vmm.log", kill_with_owner=spec.kill_with_owner, cwd=spec.workdir
        )
        api = UdsApi(sock, vmm="Firecracker", process=process, describe_error=describe_error)
        vm = FirecrackerVm(spec, process, api, state)
        try:
            await api.wait_ready("/")
        except BaseException:
            await vm.kill()
            raise
        return vm

    async def boot(self, spec: VmSpec) -> FirecrackerVm:
        vmlinux = await ensure_vmlinux(spec.machine.kernel, self.cache_dir)
        vm = await self._spawn(spec, VmState.incoming)
        try:
            await self._configure(vm, vmlinux)
            await vm.api.request("PUT", "/actions", {"action_type": "InstanceStart"})
        except BaseException:
            await vm.kill()
            raise
        vm.state = VmState.running
        return vm

    async def _configure(self, vm: FirecrackerVm, vmlinux: Path) -> None:
        spec, m, api = vm.spec, vm.spec.machine, vm.api
        await api.request("PUT", "/machine-config", {
            "vcpu_count": m.vcpu, "mem_size_mib": m.mem_mb, "smt": False, "track_dirty_pages": False,
        })
        await api.request("PUT", "/boot-source", {
            "kernel_image_path": str(vmlinux), "initrd_path": str(m.initrd),
            "boot_args": adapt_cmdline(m.cmdline, network=bool(spec.net_tap)),
        })
        await api.request("PUT", f"/drives/{ROOT_LINK}", {
            "drive_id": ROOT_LINK, "path_on_host": ROOT_LINK, "is_root_device": False,
            "is_read_only": spec.root_disk.read_only, "cache_type": "Unsafe",
        })
        await api.request("PUT", "/vsock", {"guest_cid": GUEST_CID, "uds_path": VSOCK_SOCKET})
        await api.request("PUT", "/entropy", {})
        if spec.net_tap:
            await api.request("PUT", "/network-interfaces/eth0", {
                "iface_id": "eth0", "host_dev_name": spec.net_tap, "guest_mac": GUEST_MAC,
            })
            await api.request("PUT", "/mmds/config", {"version": "V2", "network_interfaces": ["eth0"]})
            await api.request("PUT", "/mmds", {"trenvx": {"vm": spec.name}})

    async def snapshot(self, vm: Vm, dest: Path) -> SnapshotFiles:
        assert isinstance(vm, FirecrackerVm)
        dest.mkdir(parents=True, exist_ok=True)
        vmstate = dest / "vmstate"
        await vm.pause()
        await vm.api.request("PUT", "/snapshot/create", {
            "snapshot_type": "Full", "snapshot_path": str(vmstate.resolve()),
            "mem_file_path": str(vm.spec.memory_file.resolve()),
        }, timeout=SNAPSHOT_TIMEOUT_S)
        for f in (vmstate, vm.spec.memory_file):
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        return SnapshotFiles(vmstate=vmstate, memory_file=vm.spec.memory_file)

    async def prestart(self, spec: VmSpec) -> FirecrackerVm:
        return await self._spawn(spec, VmState.incoming)

    async def restore(self, vm: Vm, snapshot: SnapshotFiles, times: StageTimes | None = None) -> None:
        assert isinstance(vm, FirecrackerVm)
        if vm.state is not VmState.incoming:
            raise VmmError(f"VM {vm.spec.name} is {vm.state.value}, not a fresh Firecracker process waiting for a snapshot")
        t0 = time.perf_counter()
        await vm.api.request("PUT", "/snapshot/load", {
            "snapshot_path": str(snapshot.vmstate.resolve()),
            "mem_backend": {"backend_type": "File", "backend_path": str(snapshot.memory_file.resolve())},
            "resume_vm": True,
        }, timeout=SNAPSHOT_TIMEOUT_S)
        vm.state = VmState.running
        if times is not None:
            times.steps["load"] = time.perf_counter() - t0  # includes the resume (resume_vm)
            times.steps["resume"] = 0.0


__all__ = ["FirecrackerDriver", "FirecrackerVm", "REQUIREMENT", "describe_error"]
