"""SnapshotRestore: from a published template build to a running sandbox whose agent has answered.

Steps of one restore (each timed): ``disk`` (qcow2 overlay), ``spawn`` (a VMM process waiting for
the snapshot, skipped when a prestarted one is handed in), ``load`` (device state), ``resume``,
``init`` (the agent receives the sandbox's identity: id, env vars, token, clock, fresh entropy).
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..guest.client import AgentClient
from ..layout import DataRoot
from ..template.store import TemplateBuild
from ..vmm import DiskSpec, StageTimes, Vm, VmmDriver, VmSpec, driver_for
from ..config import VmmType
from .disk import create_overlay

OVERLAY = "disk.qcow2"


def new_sandbox_id() -> str:
    """An id like E2B's: 20 lowercase letters and digits, starting with a letter."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return secrets.choice(alphabet[:26]) + "".join(secrets.choice(alphabet) for _ in range(19))


@dataclass
class RestoredVm:
    sandbox_id: str
    build: TemplateBuild
    vm: Vm
    agent: AgentClient
    access_token: str
    workdir: Path
    times: dict[str, float] = field(default_factory=dict)


class SnapshotRestore:
    """Restores sandboxes from template builds with the VMM each build was made with."""

    def __init__(self, config: Config, data_root: DataRoot) -> None:
        self.config = config
        self.data_root = data_root
        self._drivers: dict[str, VmmDriver] = {}

    def driver(self, build: TemplateBuild) -> VmmDriver:
        kind = build.manifest.vmm_type
        if kind not in self._drivers:
            self._drivers[kind] = driver_for(VmmType(kind), self.config)
        return self._drivers[kind]

    def vm_spec(self, build: TemplateBuild, sandbox_id: str, workdir: Path, *, kill_with_owner: bool = True) -> VmSpec:
        return VmSpec(
            name=sandbox_id, workdir=workdir / "vm", machine=build.machine,
            memory_file=build.snapshot.memory_file, memory_shared=False,
            root_disk=DiskSpec(workdir / OVERLAY, "qcow2"), kill_with_owner=kill_with_owner,
        )

    async def prepare(self, build: TemplateBuild, sandbox_id: str, *, kill_with_owner: bool = True) -> tuple[Vm, Path, dict[str, float]]:
        """Everything that can happen before the request: the disk and a VMM process waiting."""
        times: dict[str, float] = {}
        workdir = self.data_root.sandbox_dir(sandbox_id)
        workdir.mkdir(parents=True)
        try:
            t0 = time.perf_counter()
            await create_overlay(build.rootfs, workdir / OVERLAY)
            t1 = time.perf_counter()
            vm = await self.driver(build).prestart(self.vm_spec(build, sandbox_id, workdir, kill_with_owner=kill_with_owner))
            times["disk"] = t1 - t0
            times["spawn"] = time.perf_counter() - t1
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return vm, workdir, times

    async def restore(
        self,
        build: TemplateBuild,
        *,
        sandbox_id: str | None = None,
        env_vars: dict[str, str] | None = None,
        prepared: tuple[Vm, Path, dict[str, float]] | None = None,
        kill_with_owner: bool = True,
    ) -> RestoredVm:
        sandbox_id = sandbox_id or new_sandbox_id()
        vm, workdir, times = prepared or await self.prepare(build, sandbox_id, kill_with_owner=kill_with_owner)
        token = secrets.token_urlsafe(24)
        agent = AgentClient(vm.agent_url)
        try:
            st = StageTimes()
            await self.driver(build).restore(vm, build.snapshot, st)
            times.update(st.steps)
            t0 = time.perf_counter()
            await agent.init(
                sandbox_id=sandbox_id, env_vars=dict(env_vars or {}), access_token=token,
                hostname=sandbox_id, timestamp_ns=time.time_ns(), entropy=os.urandom(64),
            )
            times["init"] = time.perf_counter() - t0
        except BaseException:
            await agent.aclose()
            await vm.kill()
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        await agent.aclose()
        return RestoredVm(
            sandbox_id=sandbox_id, build=build, vm=vm, agent=AgentClient(vm.agent_url, access_token=token),
            access_token=token, workdir=workdir, times=times,
        )

    @staticmethod
    async def destroy(restored: RestoredVm) -> None:
        """Kill the VM and remove every file of the sandbox."""
        try:
            await restored.agent.aclose()
        finally:
            await restored.vm.kill()
            shutil.rmtree(restored.workdir, ignore_errors=True)
