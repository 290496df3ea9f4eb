"""SnapshotRestore: from a published template build to a running sandbox whose agent has answered.

Steps of one restore (each timed), in three calls that a pool can run at different times:

- :meth:`SnapshotRestore.prepare`: ``disk`` (qcow2 overlay), ``spawn`` (a VMM process waiting
  for the snapshot);
- :meth:`SnapshotRestore.start`: ``load`` (device state), ``resume``;
- :meth:`SnapshotRestore.activate`: ``init`` (the agent's first reply: it receives the
  sandbox's identity: id, env vars, token, clock, fresh entropy).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, StartMode
from ..filelock import AsyncFileLock
from ..guest.client import AgentClient
from ..layout import DataRoot
from ..template.integrity import check_build
from ..template.store import TemplateBuild
from ..vmm import (
    DiskSpec, SnapshotFiles, StageTimes, Vm, VmmDriver, VmmError, VmSpec, check_template_vmm, driver_for,
)
from ..vmm.hostfs import clone_file
from ..vmm.jail import JailPolicy, policy_for
from ..config import VmmType
from ..network.policy import EgressPolicy
from ..network.slot import HostNetwork, NetworkSlot
from .disk import create_overlay
from .network_state import SLOT_FILE
from .snapshots import add_user



class TemplateNetworkMismatch(VmmError):
    """A template build was made for another network mode than this server's (its snapshot holds
    the NIC's backend): it must be rebuilt before sandboxes can start from it."""


def network_fields(slot: NetworkSlot | None) -> dict[str, Any]:
    """The VmSpec fields of a VM in ``slot`` (a tap in its namespace) or, without one, of an
    isolated sandbox on QEMU's user networking."""
    if slot is None:
        return {"isolated_user_net": True}
    return slot.vm_fields()

OVERLAY = "disk.qcow2"
INIT_TIMEOUT_S = 120.0
"""How long the agent's first reply may take. Under TCG, bursts of 50-100 new VMMs on 2 cores
spent over 30 s (the client's default) translating and failed 1 create in 100 with ReadTimeout."""
RAW_COPY = "disk.raw"


def new_sandbox_id() -> str:
    """An id like E2B's: 20 lowercase letters and digits, starting with a letter."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return secrets.choice(alphabet[:26]) + "".join(secrets.choice(alphabet) for _ in range(19))


@dataclass(eq=False)
class PreparedVm:
    """A VMM process with its disk (and network slot), before identity."""

    vm: Vm
    workdir: Path
    times: dict[str, float] = field(default_factory=dict)
    """Stage seconds so far."""
    slot: NetworkSlot | None = None
    """The sandbox's network namespace (``network = "netns"``); None with user networking."""


@dataclass
class RestoredVm:
    sandbox_id: str
    build: TemplateBuild
    vm: Vm
    agent: AgentClient
    access_token: str
    workdir: Path
    slot: NetworkSlot | None = None
    times: dict[str, float] = field(default_factory=dict)
    """Seconds of each stage done on the create path (stages a pool did earlier are not in it)."""
    source: str = "cold"
    """Where the VM came from: ``hot`` or ``warm`` pool, ``cold`` (a new VMM process), or adopted."""


class SnapshotRestore:
    """Restores sandboxes from template builds with the VMM each build was made with."""

    def __init__(self, config: Config, data_root: DataRoot, network: HostNetwork | None = None) -> None:
        self.config = config
        self.data_root = data_root
        self.network = network
        """Where sandboxes get their network slots; None: QEMU user networking, isolated."""
        self._drivers: dict[str, VmmDriver] = {}

    def driver(self, build: TemplateBuild) -> VmmDriver:
        kind = build.manifest.vmm_type
        configured = self.config.template.get(build.manifest.name)
        if configured is not None:
            check_template_vmm(build.manifest.name, kind, configured.vmm_type.value)
        if kind not in self._drivers:
            self._drivers[kind] = driver_for(VmmType(kind), self.config)
        return self._drivers[kind]

    @property
    def mode(self) -> StartMode:
        return self.config.orchestrator.start_mode

    def vm_spec(
        self, build: TemplateBuild, sandbox_id: str, workdir: Path, *, kill_with_owner: bool = True,
        slot: NetworkSlot | None = None,
    ) -> VmSpec:
        own = self._disk(build, workdir)
        return VmSpec(
            name=sandbox_id, workdir=workdir / "vm", machine=build.machine,
            memory_file=build.snapshot.memory_file, memory_shared=False,
            anonymous_memory=self.mode is not StartMode.snapshot,
            kill_with_owner=kill_with_owner, **self._disks(build, own), **network_fields(slot),
            jail=self.jail if build.manifest.vmm_type == VmmType.qemu.value else None,
        )

    @property
    def jail(self) -> JailPolicy | None:
        """How sandboxes' VMMs are jailed (``[jail]``, resolved against this host once); None: not."""
        return policy_for(self.config)

    def uses_slot(self, build: TemplateBuild) -> bool:
        """Sandboxes of ``build`` get a network slot: this server has slots and the VMM gives the
        guest a NIC (QEMU; Firecracker and Cloud Hypervisor guests have vsock only, for now)."""
        return self.network is not None and build.manifest.vmm_type == VmmType.qemu.value

    def check_network(self, build: TemplateBuild) -> None:
        """A build restores only with the network backend it was made with (see ``vmm.qemu.netdev_arg``)."""
        if build.manifest.vmm_type != VmmType.qemu.value:
            return
        want = "netns" if self.network is not None else "user"
        built = build.manifest.inputs.get("network", "user")
        if built != want:
            raise TemplateNetworkMismatch(
                f"template {build.manifest.name} (build {build.build_id}) was built for {built} networking and "
                f"this server runs sandboxes with {want} networking; rebuild it: template-manager --config "
                f"CONFIG -t {build.manifest.name}"
            )

    @staticmethod
    def _disks(build: TemplateBuild, own: DiskSpec) -> dict[str, Any]:
        """The VmSpec disk fields: ``own`` is the root, or in overlay mode the writable layer
        under which the template's image is shared on virtio-pmem."""
        if build.overlay:
            return {"root_disk": DiskSpec(build.rootfs, "raw", read_only=True), "root_on_pmem": True, "scratch_disk": own}
        return {"root_disk": own}

    def _disk(self, build: TemplateBuild, workdir: Path) -> DiskSpec:
        """The sandbox's own disk: a qcow2 overlay over the template's image (its upper layer in
        overlay mode), or (for VMMs without qcow2: Firecracker, Cloud Hypervisor) a reflinked copy."""
        if "qcow2" in self.driver(build).disk_formats:
            return DiskSpec(workdir / OVERLAY, "qcow2")
        return DiskSpec(workdir / RAW_COPY, "raw")

    async def prepare(self, build: TemplateBuild, sandbox_id: str, *, kill_with_owner: bool = True) -> PreparedVm:
        """Everything that can happen before the request: the disk and a VMM process waiting.

        With ``start_mode = "boot"`` the process boots the template's kernel instead.
        """
        times: dict[str, float] = {}
        self.check_network(build)
        workdir = self.data_root.sandbox_dir(sandbox_id)
        workdir.mkdir(parents=True)
        slot: NetworkSlot | None = None
        try:
            add_user(build, sandbox_id, workdir)  # the build's files stay while this directory does
            await check_build(build)  # TemplateDamaged: its files differ from its manifest's hashes
            t0 = time.perf_counter()
            if self.network is not None and self.uses_slot(build):
                slot = await self.network.acquire()
                times["net"] = time.perf_counter() - t0
                (workdir / SLOT_FILE).write_text(str(slot.index))
            t0 = time.perf_counter()
            own = self._disk(build, workdir)
            spec = self.vm_spec(build, sandbox_id, workdir, kill_with_owner=kill_with_owner, slot=slot)
            if own.format == "qcow2":
                # The base by its real path: the overlay's header names it, and a snapshot's layer made
                # of this overlay must find it whatever way data_root was reached.
                await create_overlay(build.writable_base.resolve(), own.path, build.writable_format)
            else:
                await clone_file(build.writable_base, own.path)
            t1 = time.perf_counter()
            driver = self.driver(build)
            vm = await (driver.boot(spec) if self.mode is StartMode.boot else driver.prestart(spec))
            times["disk"] = t1 - t0
            times["spawn"] = time.perf_counter() - t1
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            await self.release_slot(slot)
            raise
        return PreparedVm(vm, workdir, times, slot)

    @staticmethod
    async def apply_egress(slot: NetworkSlot | None, egress: EgressPolicy, times: dict[str, float]) -> None:
        """Load ``egress`` into the slot before the guest runs (nothing to do for the default rules
        of a fresh slot, or without a slot)."""
        if slot is None or egress == slot.egress:
            return
        t0 = time.perf_counter()
        await slot.apply(egress)
        times["net_rules"] = time.perf_counter() - t0

    async def release_slot(self, slot: NetworkSlot | None) -> None:
        if slot is not None and self.network is not None:
            await self.network.release(slot)

    async def full_snapshot(self, build: TemplateBuild) -> SnapshotFiles:
        """The build's snapshot with guest RAM in the stream (made once, cached by build id)."""
        dest = self.data_root.cache / "full-snapshots" / f"{build.manifest.name}-{build.build_id}"
        files = SnapshotFiles(vmstate=dest / "vmstate-full", memory_file=build.snapshot.memory_file)
        if files.vmstate.exists():
            return files
        driver = self.driver(build)
        make = getattr(driver, "full_snapshot", None)
        if make is None:
            raise VmmError(f"start_mode snapshot-private is not available with {driver.name}")
        async with AsyncFileLock(dest.parent / f".{dest.name}.lock"):
            if files.vmstate.exists():
                return files
            # Earlier builds' full snapshots (hundreds of MiB each); build ids start with a date.
            for old in dest.parent.glob(f"{build.manifest.name}-{'[0-9]' * 8}T*"):
                if old.is_dir() and old != dest:
                    shutil.rmtree(old, ignore_errors=True)
            workdir = self.data_root.sandbox_dir(f"full-{new_sandbox_id()}")
            workdir.mkdir(parents=True)
            slot = await self.network.acquire() if self.network is not None and self.uses_slot(build) else None
            try:
                spec = dataclasses.replace(
                    self.vm_spec(build, workdir.name, workdir, slot=slot), anonymous_memory=False,
                    **self._disks(build, DiskSpec(build.writable_base, build.writable_format, read_only=True)),  # type: ignore[arg-type]
                )
                return await make(spec, build.snapshot, dest)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
                await self.release_slot(slot)

    async def start(self, build: TemplateBuild, prepared: PreparedVm) -> None:
        """Load the snapshot into a prepared VMM process and resume it (no identity yet)."""
        vm, times = prepared.vm, prepared.times
        try:
            if self.mode is StartMode.boot:
                t0 = time.perf_counter()
                async with AgentClient.for_endpoint(vm.agent_endpoint) as agent:
                    await agent.wait_healthy(float(build.manifest.config.get("boot_timeout_s", 300)))
                times["boot"] = time.perf_counter() - t0
                return
            snapshot = build.snapshot
            if self.mode is StartMode.snapshot_private:
                snapshot = await self.full_snapshot(build)
            st = StageTimes()
            await self.driver(build).restore(vm, snapshot, st)
            times.update(st.steps)
        except BaseException:
            await self.discard(prepared)
            raise

    async def activate(
        self, build: TemplateBuild, sandbox_id: str, prepared: PreparedVm, env_vars: dict[str, str] | None = None,
    ) -> RestoredVm:
        """Give a running guest its identity (the agent's first reply of this sandbox)."""
        vm, workdir, times = prepared.vm, prepared.workdir, prepared.times
        token = secrets.token_urlsafe(24)
        # A snapshot's agent still holds its source sandbox's token: its /init must carry it.
        agent = AgentClient.for_endpoint(vm.agent_endpoint, timeout=INIT_TIMEOUT_S, access_token=build.init_token)
        try:
            await check_build(build)  # a pooled VM of a build damaged since it was made is not handed out
            t0 = time.perf_counter()
            # The template's default user is given here, not baked into the snapshot: the agent
            # was started (as root, its default) before the template's snapshot was taken.
            await agent.init(
                sandbox_id=sandbox_id, env_vars=dict(env_vars or {}), access_token=token,
                hostname=sandbox_id, timestamp_ns=time.time_ns(), entropy=os.urandom(64),
                default_user=build.default_user, default_workdir=build.default_workdir,
            )
            times["init"] = time.perf_counter() - t0
        except BaseException:
            await agent.aclose()
            await self.discard(prepared)
            raise
        await agent.aclose()
        return RestoredVm(
            sandbox_id=sandbox_id, build=build, vm=vm, agent=AgentClient.for_endpoint(vm.agent_endpoint, access_token=token),
            access_token=token, workdir=workdir, slot=prepared.slot, times=times,
        )

    async def restore(
        self,
        build: TemplateBuild,
        *,
        sandbox_id: str | None = None,
        env_vars: dict[str, str] | None = None,
        prepared: PreparedVm | None = None,
        kill_with_owner: bool = True,
        egress: EgressPolicy | None = None,
    ) -> RestoredVm:
        """prepare (unless ``prepared`` is given) + egress rules into its slot + start + activate."""
        sandbox_id = sandbox_id or new_sandbox_id()
        prepared = prepared or await self.prepare(build, sandbox_id, kill_with_owner=kill_with_owner)
        if egress is not None:
            try:
                await self.apply_egress(prepared.slot, egress, prepared.times)
            except BaseException:
                await self.discard(prepared)
                raise
        await self.start(build, prepared)
        return await self.activate(build, sandbox_id, prepared, env_vars)

    async def discard(self, prepared: PreparedVm) -> None:
        """Kill a VM that never became a sandbox (or stopped being one), remove its files and its
        network slot."""
        try:
            await prepared.vm.kill()
            shutil.rmtree(prepared.workdir, ignore_errors=True)
        finally:
            await self.release_slot(prepared.slot)

    async def destroy(self, restored: RestoredVm) -> None:
        """Kill the VM, remove every file of the sandbox and its network slot."""
        try:
            await restored.agent.aclose()
        finally:
            await self.discard(PreparedVm(restored.vm, restored.workdir, slot=restored.slot))
