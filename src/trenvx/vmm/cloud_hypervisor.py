"""The Cloud Hypervisor driver: its REST API (``/api/v1``) on the ``--api-socket``.

- Boot: ``PUT vm.create`` with the whole VmConfig (ELF vmlinux + initramfs payload, root disk on
  virtio-blk, or with ``root_on_pmem`` on virtio-pmem with ``discard_writes`` so the guest maps
  the shared image with DAX and its writes stay private, plus an optional writable scratch disk;
  vsock, serial to ``console.log``, rng, a tap NIC if given), then ``PUT vm.boot``.
- Snapshot: ``PUT vm.pause``, ``PUT vm.snapshot`` to ``file://<dest>/vmstate/`` (Cloud Hypervisor
  writes ``config.json``, ``state.json`` and ``memory-ranges`` there); ``memory-ranges`` is then
  moved to the VM's ``memory_file``, where templates keep guest RAM.
- Restore: a fresh process; a per-sandbox snapshot directory whose ``config.json`` names this
  sandbox's disk, vsock socket and console, ``state.json`` and ``memory-ranges`` being symlinks to
  the template's; ``PUT vm.restore`` then ``PUT vm.resume``. The memory is mapped rather than
  copied where the installed version offers it: ``memory_restore_mode`` ``CopyOnWrite``
  (MAP_PRIVATE of the memory file: pages shared between sandboxes) or else ``OnDemand``
  (userfaultfd: pages copied on first touch); older versions copy all of it, which is logged.

Errors: Cloud Hypervisor answers a failed request with 4xx/5xx and, in recent versions, a JSON
array of the error chain (outermost first), in older ones plain text; both become a VmmError.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..kernel.vmlinux import ensure_vmlinux
from .base import SnapshotFiles, StageTimes, Vm, VmmError, VmSpec, VmState
from .binaries import BinaryRequirement, VmmBinary
from .microvm import GUEST_CID, ApiSocketDriver, ApiSocketVm, socket_workdir, VSOCK_SOCKET, adapt_cmdline, require_kvm
from .process import VmmProcess
from .uds_api import UdsApi

log = logging.getLogger(__name__)

REQUIREMENT = BinaryRequirement(
    vmm="Cloud Hypervisor",
    default_name="cloud-hypervisor",
    config_key="ch_binary_path",
    minimum=(40, 0, 0),
    why_minimum="the REST API and snapshot format this driver is written against (payload, pmem discard_writes)",
)
API_SOCKET = "ch.sock"
API_PREFIX = "/api/v1"
RESTORE_DIR = "restore"
GUEST_MAC = "06:00:ac:10:00:02"
SNAPSHOT_TIMEOUT_S = 300.0

# memory_restore_mode, from the Cloud Hypervisor docs (snapshot_restore.md, the OpenAPI
# RestoreConfig): OnDemand arrived with v52, CopyOnWrite later. Older versions ignore the field
# (serde without deny_unknown_fields) and copy, so it is sent only from ONDEMAND_SINCE on; a
# version that knows the field but not the variant answers 400 and the next mode is tried.
ONDEMAND_SINCE = (52, 0, 0)
COPY_ON_WRITE_SINCE = (54, 0, 0)
RESTORE_MODES = ("CopyOnWrite", "OnDemand")


def describe_error(status: int, body: bytes) -> str:
    """A JSON array of messages (error chain) in recent versions, plain text in older ones."""
    text = body.decode(errors="replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return text or f"HTTP {status} without a body"
    if isinstance(obj, list) and all(isinstance(x, str) for x in obj):
        return ": ".join(obj) or f"HTTP {status}"
    return text


class CloudHypervisorVm(ApiSocketVm):
    def __init__(self, spec: VmSpec, process: VmmProcess, api: UdsApi, binary: VmmBinary, state: VmState) -> None:
        super().__init__(spec, process, api, state)
        self.binary = binary

    async def pause(self) -> None:
        await self.api.request("PUT", "/vm.pause")
        self.state = VmState.paused

    async def resume(self) -> None:
        await self.api.request("PUT", "/vm.resume")
        self.state = VmState.running

    async def info(self) -> dict[str, Any]:
        """``GET vm.info``: the VM's config and state (Created, Running, Paused, Shutdown)."""
        return dict(await self.api.request("GET", "/vm.info"))

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Orderly stop: ``vm.shutdown`` then ``vmm.shutdown``, and wait for the process to exit."""
        try:
            await self.api.request("PUT", "/vm.shutdown", timeout=timeout)
            await self.api.request("PUT", "/vmm.shutdown", timeout=timeout)
        finally:
            await self.api.aclose()
            await self.process.kill(grace_s=timeout)
            self.state = VmState.exited


def _rewrite_config(config: dict[str, Any], spec: VmSpec) -> dict[str, Any]:
    """The snapshot's VmConfig with this VM's paths: disks, pmem, vsock socket, serial file."""
    out = json.loads(json.dumps(config))
    if spec.root_on_pmem:
        pmem = out.get("pmem") or []
        if not pmem:
            raise VmmError("the snapshot's config.json has no pmem device, but the VM's root is on pmem")
        pmem[0]["file"] = str(spec.root_disk.path)
        disks = out.get("disks") or []
        if spec.scratch_disk is not None:
            if not disks:
                raise VmmError("the snapshot's config.json has no disk for the scratch disk")
            disks[0]["path"] = str(spec.scratch_disk.path)
    else:
        disks = out.get("disks") or []
        if not disks:
            raise VmmError("the snapshot's config.json has no disk for the root disk")
        disks[0]["path"] = str(spec.root_disk.path)
    if not isinstance(out.get("vsock"), dict):
        raise VmmError("the snapshot's config.json has no vsock device: the agent could not be reached")
    out["vsock"]["socket"] = str(spec.workdir / VSOCK_SOCKET)
    if isinstance(out.get("serial"), dict) and out["serial"].get("mode") == "File":
        out["serial"]["file"] = str(spec.workdir / "console.log")
    return out


class CloudHypervisorDriver(ApiSocketDriver):
    name = "cloud-hypervisor"
    requirement = REQUIREMENT
    root_on_pmem = True

    def __init__(self, binary: str = "", *, cache_dir: Path) -> None:
        super().__init__(binary, cache_dir=cache_dir)
        self._restore_modes: dict[str, tuple[str, ...]] = {}

    async def _spawn(self, spec: VmSpec, state: VmState) -> CloudHypervisorVm:
        require_kvm(spec, "Cloud Hypervisor")
        binary = await self.binary()
        for disk in (spec.root_disk, spec.scratch_disk):
            if disk is not None and disk.format != "raw":
                raise VmmError(
                    f"this driver gives Cloud Hypervisor raw images only, but {disk.path} is {disk.format}; "
                    f"give it a raw copy (trenvx.vmm.hostfs.clone_file)"
                )
        sock = socket_workdir(spec.workdir, API_SOCKET)
        argv = [binary.path, "--api-socket", f"path={sock}"]
        process = await VmmProcess.spawn(
            argv, spec.workdir / "vmm.log", kill_with_owner=spec.kill_with_owner, cwd=spec.workdir
        )
        api = UdsApi(sock, vmm="Cloud Hypervisor", process=process, describe_error=describe_error, prefix=API_PREFIX)
        vm = CloudHypervisorVm(spec, process, api, binary, state)
        try:
            await api.wait_ready("/vmm.ping")
        except BaseException:
            await vm.kill()
            raise
        return vm

    def vm_config(self, spec: VmSpec, vmlinux: Path) -> dict[str, Any]:
        """The VmConfig body of ``vm.create`` for ``spec`` (field names from the OpenAPI document)."""
        m = spec.machine
        root = "root=/dev/pmem0 rootflags=dax" if spec.root_on_pmem else None
        payload = {
            "kernel": str(vmlinux), "initramfs": str(m.initrd),
            "cmdline": adapt_cmdline(m.cmdline, network=bool(spec.net_tap), root=root),
        }
        config: dict[str, Any] = {
            "cpus": {"boot_vcpus": m.vcpu, "max_vcpus": m.vcpu},
            "memory": {"size": m.mem_mb << 20, "shared": False},
            "payload": payload,
            "vsock": {"cid": GUEST_CID, "socket": str(spec.workdir / VSOCK_SOCKET), "id": "vsock0"},
            "serial": {"mode": "File", "file": str(spec.workdir / "console.log")},
            "console": {"mode": "Off"},
            "rng": {"src": "/dev/urandom"},
        }
        disks = []
        if spec.root_on_pmem:
            config["pmem"] = [{"file": str(spec.root_disk.path), "discard_writes": True, "id": "pmem0"}]
            if spec.scratch_disk is not None:
                disks.append({"path": str(spec.scratch_disk.path), "readonly": False, "id": "scratch"})
        else:
            disks.append({"path": str(spec.root_disk.path), "readonly": spec.root_disk.read_only, "id": "root"})
        if disks:
            config["disks"] = disks
        if spec.net_tap:
            config["net"] = [{"tap": spec.net_tap, "mac": GUEST_MAC, "id": "net0"}]
        return config

    async def boot(self, spec: VmSpec) -> CloudHypervisorVm:
        vmlinux = await ensure_vmlinux(spec.machine.kernel, self.cache_dir)
        vm = await self._spawn(spec, VmState.incoming)
        try:
            await vm.api.request("PUT", "/vm.create", self.vm_config(spec, vmlinux))
            await vm.api.request("PUT", "/vm.boot")
        except BaseException:
            await vm.kill()
            raise
        vm.state = VmState.running
        return vm

    async def snapshot(self, vm: Vm, dest: Path) -> SnapshotFiles:
        assert isinstance(vm, CloudHypervisorVm)
        vmstate = dest / "vmstate"
        shutil.rmtree(vmstate, ignore_errors=True)
        vmstate.mkdir(parents=True)
        await vm.pause()
        await vm.api.request(
            "PUT", "/vm.snapshot", {"destination_url": f"file://{vmstate.resolve()}"}, timeout=SNAPSHOT_TIMEOUT_S
        )
        ranges = vmstate / "memory-ranges"
        if not ranges.is_file():
            raise VmmError(f"Cloud Hypervisor's snapshot in {vmstate} has no memory-ranges file")
        os.replace(ranges, vm.spec.memory_file)
        for f in (vm.spec.memory_file, vmstate / "state.json", vmstate / "config.json"):
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        return SnapshotFiles(vmstate=vmstate, memory_file=vm.spec.memory_file)

    async def prestart(self, spec: VmSpec) -> CloudHypervisorVm:
        return await self._spawn(spec, VmState.incoming)

    def _modes_for(self, binary: VmmBinary) -> tuple[str, ...]:
        if binary.path not in self._restore_modes:
            if binary.version >= COPY_ON_WRITE_SINCE:
                modes: tuple[str, ...] = RESTORE_MODES
            elif binary.version >= ONDEMAND_SINCE:
                modes = ("OnDemand",)
            else:
                modes = ()
                log.warning(
                    "Cloud Hypervisor %s has no memory_restore_mode: every restore copies the template's whole "
                    "memory into the sandbox (slower, no sharing); CopyOnWrite needs v%d or newer",
                    binary.version_text, COPY_ON_WRITE_SINCE[0],
                )
            self._restore_modes[binary.path] = modes
        return self._restore_modes[binary.path]

    def _restore_dir(self, vm: CloudHypervisorVm, snapshot: SnapshotFiles) -> Path:
        src = snapshot.vmstate
        try:
            config = json.loads((src / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise VmmError(f"cannot read the snapshot's {src / 'config.json'}: {e}; rebuild the template") from None
        d = vm.spec.workdir / RESTORE_DIR
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(_rewrite_config(config, vm.spec)))
        os.symlink((src / "state.json").resolve(), d / "state.json")
        os.symlink(snapshot.memory_file.resolve(), d / "memory-ranges")
        return d

    async def restore(self, vm: Vm, snapshot: SnapshotFiles, times: StageTimes | None = None) -> None:
        assert isinstance(vm, CloudHypervisorVm)
        if vm.state is not VmState.incoming:
            raise VmmError(f"VM {vm.spec.name} is {vm.state.value}, not a fresh Cloud Hypervisor process")
        t0 = time.perf_counter()
        source = self._restore_dir(vm, snapshot)
        body: dict[str, Any] = {"source_url": f"file://{source}", "prefault": False}
        modes = self._modes_for(vm.binary)
        for i, mode in enumerate(modes):
            try:
                await vm.api.request("PUT", "/vm.restore", {**body, "memory_restore_mode": mode}, timeout=SNAPSHOT_TIMEOUT_S)
                break
            except VmmError as e:
                if "(HTTP 400)" not in str(e) or i == len(modes) - 1:
                    raise
                log.warning("Cloud Hypervisor %s refused memory_restore_mode %s (%s); trying %s",
                            vm.binary.version_text, mode, e, modes[i + 1])
                self._restore_modes[vm.binary.path] = modes[i + 1:]
        else:
            await vm.api.request("PUT", "/vm.restore", body, timeout=SNAPSHOT_TIMEOUT_S)
        t1 = time.perf_counter()
        await vm.resume()
        if times is not None:
            times.steps["load"] = t1 - t0
            times.steps["resume"] = time.perf_counter() - t1


__all__ = ["CloudHypervisorDriver", "CloudHypervisorVm", "REQUIREMENT", "describe_error"]
