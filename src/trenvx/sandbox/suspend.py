"""Pause to disk and resume: a sandbox's whole state put away under its directory, its VMM gone.

What a paused sandbox is: its template's snapshot plus what it changed. Under
``data_root/sandboxes/<id>/`` (0700, root's): its disk (the qcow2 overlay it always had) and, for a
pause with memory, ``pause/vmstate`` (0600): its device state and the pages of its RAM that differ
from the template's memory file (:func:`trenvx.vmm.qemu_stream.filter_against`). The stored pages
are the guest's memory: nothing but this directory's owner (root) reads them.

Pause, in order:

1. ``/freeze`` through the agent, bounded by :data:`FREEZE_TIMEOUT_S`: the guest syncs and freezes
   its writable filesystems, so its disk holds everything written before the pause. An agent that
   does not answer in time is a guest that refuses: with ``strict`` (E2B's ``requireHealthyGuest``)
   or for a filesystem-only pause the pause is refused (:class:`PauseRefused`, E2B's 503) and the
   sandbox runs on; otherwise the pause goes ahead, marked ``envd_unresponsive`` (E2B's
   ``envdUnresponsiveAtPause``): its memory brings the hung agent back, so it resumes only without
   memory (:class:`ResumeRefused` otherwise). An agent too old to freeze syncs (``sync``) instead.
2. With memory: the driver stops the VM and saves it (``save_diff``); without: nothing to save.
3. The VMM ends (QEMU ``quit``: disk images closed cleanly) and its memory goes back to the host;
   the network slot is released (the guest's address is the same in every slot: any slot serves
   the resume).

A failure before step 3 thaws the guest and continues its VM: the sandbox runs as before.

Resume: a network slot (with the sandbox's egress rules), then either a VMM prestarted like every
sandbox's (the template's memory file mapped privately, the sandbox's own disk) that loads
``pause/vmstate`` (pages missing from it are the template's), then ``/init`` with the clock and
fresh entropy (the agent thaws first); or, without memory, a boot of the template's kernel on the
sandbox's disk (its processes are gone, its files are there) and ``/init`` with the sandbox's
identity, token and environment. A failed resume kills what it started: the sandbox stays paused,
its files untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from ..diskspace import DataRootFull, full_message, space_problem
from ..guest.client import AgentClient, AgentError
from ..guest.endpoint import AgentEndpoint
from ..network.policy import EgressPolicy
from ..network.slot import NetworkSlot
from ..template.store import TemplateBuild
from ..vmm import SnapshotFiles, StageTimes, Vm, VmmError, VmState
from ..vmm.base import VmSpec
from .network_state import SLOT_FILE
from .restore import INIT_TIMEOUT_S, RestoredVm, SnapshotRestore

log = logging.getLogger(__name__)

PAUSE_DIR = "pause"
VMSTATE = "vmstate"
FREEZE_TIMEOUT_S = 30.0
"""How long the agent may take to sync and freeze (a guest with much unwritten data takes a while
under TCG); past it the guest counts as refusing."""
THAW_AFTER_S = 60.0
"""The agent thaws by itself after this much of the guest's time if the host never thaws it. The
guest's clock stops with its vCPUs, so this only has to cover the moment between the freeze and
the VM's stop. It also ends a freeze that reaches a hung agent too late: an agent that did not
answer in time is thawed by the host, but the freeze it takes up when it runs again would arrive
after that thaw; its filesystems are then frozen for at most this long."""
SYNC_TIMEOUT_S = 60.0

PauseKind = Literal["memory", "filesystem"]


class PauseRefused(RuntimeError):
    """The guest's agent did not answer the freeze (E2B answers 503; the sandbox keeps running)."""


class ResumeRefused(RuntimeError):
    """Its memory was saved while its agent did not answer: resume it without memory (E2B's 409
    ``sandbox_snapshot_guest_agent_unresponsive``)."""

    error_code = "sandbox_snapshot_guest_agent_unresponsive"


class PauseUnsupported(RuntimeError):
    """This sandbox's VMM cannot pause to disk (yet)."""


@dataclass
class PauseInfo:
    """What a paused sandbox's record says about its pause (JSON in the state store)."""

    kind: PauseKind
    paused_at: float
    timeout_left: float
    """Seconds of its timeout left when it paused: its timeout does not run while paused."""
    stored_bytes: int = 0
    """Bytes of ``pause/vmstate`` (device state + the pages that differ from the template)."""
    seconds: float = 0.0
    envd_unresponsive: bool = False
    frozen: list[str] = field(default_factory=list)
    ram_pages: int = 0
    """Pages of guest RAM saved (those that differ from the template's)."""
    reason: str = "requested"
    """Why it paused: ``requested`` (a pause call) or ``timeout`` (its lifecycle's auto-pause)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "PauseInfo":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in names})


class StoppedVm(Vm):
    """Stands for the VM of a paused sandbox: no process; its spec and agent endpoint as they were."""

    def __init__(self, spec: VmSpec, endpoint: AgentEndpoint, agent_port: int) -> None:
        self.spec = spec
        self.agent_port = agent_port
        self._endpoint = endpoint
        self.state = VmState.exited

    @property
    def pid(self) -> int:
        return 0

    @property
    def agent_endpoint(self) -> AgentEndpoint:
        return self._endpoint

    async def pause(self) -> None:
        raise VmmError(f"sandbox {self.spec.name} is paused to disk: it has no VM to pause")

    async def resume(self) -> None:
        raise VmmError(f"sandbox {self.spec.name} is paused to disk: resume it through its manager")

    async def kill(self) -> None:
        return None

    def is_alive(self) -> bool:
        return False

    async def wait_exit(self) -> int:
        await asyncio.Event().wait()  # never: there is no process
        return -1


def pause_dir(workdir: Path) -> Path:
    return workdir / PAUSE_DIR


def stored_files_present(workdir: Path, info: PauseInfo) -> str:
    """"" when the files a resume needs are there, else what is missing."""
    if not workdir.is_dir():
        return f"its directory {workdir} is gone"
    if info.kind == "memory" and not (pause_dir(workdir) / VMSTATE).is_file():
        return f"its saved memory {pause_dir(workdir) / VMSTATE} is gone"
    return ""


def disk_bytes(path: Path) -> int:
    """Bytes a file takes on disk (its allocated blocks)."""
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


class Suspender:
    """Pauses sandboxes to disk and resumes them, with the VMM each template was built with."""

    def __init__(self, restorer: SnapshotRestore) -> None:
        self.restorer = restorer

    def check_supported(self, build: TemplateBuild) -> None:
        driver = self.restorer.driver(build)
        if getattr(driver, "save_diff", None) is None:
            raise PauseUnsupported(
                f"pausing to disk is not supported by this VMM yet ({driver.name}); only sandboxes of templates "
                "built with vmm_type = \"qemu\" pause")

    # -- pause ----------------------------------------------------------------------------------

    async def pause(self, restored: RestoredVm, *, memory: bool, strict: bool, timeout_left: float) -> tuple[RestoredVm, PauseInfo]:
        """Save the sandbox and end its VMM; the new RestoredVm has no VM (:class:`StoppedVm`)."""
        self.check_supported(restored.build)
        t0 = time.perf_counter()
        kind: PauseKind = "memory" if memory else "filesystem"
        vm, workdir = restored.vm, restored.workdir
        frozen, responsive = await self._freeze(restored, must_answer=strict or not memory)
        info = PauseInfo(kind=kind, paused_at=time.time(), timeout_left=timeout_left,
                         envd_unresponsive=not responsive, frozen=frozen)
        target = pause_dir(workdir)
        try:
            os.chmod(workdir, 0o700)
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(mode=0o700)
            if memory:
                save = getattr(self.restorer.driver(restored.build), "save_diff")
                stats = await save(vm, target / VMSTATE, restored.build.snapshot.memory_file)
                info.stored_bytes = (target / VMSTATE).stat().st_size
                info.ram_pages = sum(stats.pages_kept.values())
            else:
                await vm.pause()  # nothing runs between the freeze and the end of the VMM
        except BaseException as e:
            shutil.rmtree(target, ignore_errors=True)
            await self._continue(restored)
            if isinstance(e, Exception) and space_problem(e, workdir):
                what = (f"the pause of sandbox {restored.sandbox_id} (it stores the guest's RAM that differs from "
                        f"its template's, up to {restored.build.machine.mem_mb} MiB)")
                raise DataRootFull(full_message(self.restorer.data_root.root, what, None)
                                   + "; the sandbox keeps running") from e
            raise
        await self._end_vmm(vm)
        slot = restored.slot
        await self.restorer.release_slot(slot)
        (workdir / SLOT_FILE).unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            await restored.agent.aclose()
        info.seconds = time.perf_counter() - t0
        stopped = StoppedVm(vm.spec, vm.agent_endpoint, vm.agent_port)
        paused = dataclasses.replace(restored, vm=stopped, slot=None)
        log.info("sandbox %s paused (%s) in %.2f s: %.1f MiB stored (%d pages of RAM)%s", restored.sandbox_id, kind,
                 info.seconds, info.stored_bytes / (1 << 20), info.ram_pages,
                 "; its agent did not answer the freeze" if info.envd_unresponsive else "")
        return paused, info

    async def _freeze(self, restored: RestoredVm, *, must_answer: bool) -> tuple[list[str], bool]:
        """(mount points frozen, whether the agent answered). Raises PauseRefused when it must answer
        and does not."""
        agent = AgentClient.for_endpoint(restored.vm.agent_endpoint, access_token=restored.access_token,
                                         timeout=FREEZE_TIMEOUT_S)
        try:
            try:
                result = await asyncio.wait_for(agent.freeze(thaw_after_s=THAW_AFTER_S), FREEZE_TIMEOUT_S)
                if result.errors:
                    log.warning("sandbox %s: freezing for the pause: %s", restored.sandbox_id, "; ".join(result.errors))
                return result.paths, True
            except AgentError as e:
                if e.status not in (404, 501):
                    raise
                # An agent from before /freeze: its sync is the next best thing.
                log.info("sandbox %s: its agent cannot freeze (%s); syncing instead", restored.sandbox_id, e.message)
                r = await asyncio.wait_for(agent.run("sync", timeout=SYNC_TIMEOUT_S), SYNC_TIMEOUT_S + 5)
                if r.exit_code != 0:
                    raise AgentError("internal", f"sync exited with {r.exit_code}") from e
                return [], True
        except (AgentError, httpx.HTTPError, asyncio.TimeoutError, OSError, TimeoutError) as e:
            why = "did not answer in time" if isinstance(e, (asyncio.TimeoutError, httpx.TimeoutException)) else str(e)
            if must_answer:
                # It may yet freeze late: its own timer thaws it (THAW_AFTER_S).
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(agent.thaw(), 5)
                raise PauseRefused(
                    f"the sandbox's agent did not freeze its filesystems ({why}); the sandbox keeps running. "
                    "A filesystem-only pause, or a pause with requireHealthyGuest, needs an agent that answers"
                ) from None
            log.warning("sandbox %s: its agent did not freeze its filesystems (%s); pausing its memory anyway",
                        restored.sandbox_id, why)
            return [], False
        finally:
            await agent.aclose()

    async def _continue(self, restored: RestoredVm) -> None:
        """After a failed pause: the VM runs again and the guest is thawed (best effort)."""
        vm = restored.vm
        if not vm.is_alive():
            return
        try:
            await vm.resume()
        except Exception as e:  # noqa: BLE001 - the pause's own error is the one reported
            log.warning("sandbox %s: continuing its VM after a failed pause failed: %s", restored.sandbox_id, e)
            return
        with contextlib.suppress(Exception):
            async with AgentClient.for_endpoint(vm.agent_endpoint, access_token=restored.access_token,
                                                timeout=10) as agent:
                await agent.thaw()

    @staticmethod
    async def _end_vmm(vm: Vm) -> None:
        quit_ = getattr(vm, "quit", None)
        if quit_ is not None:
            await quit_()
        else:
            await vm.kill()

    # -- resume ---------------------------------------------------------------------------------

    async def resume(
        self, paused: RestoredVm, info: PauseInfo, *, memory: bool = True, egress: EgressPolicy,
        env_vars: dict[str, str], kill_with_owner: bool = True,
    ) -> RestoredVm:
        """Bring a paused sandbox back (same id, token, files; with its memory, its processes).
        ``memory=False``: a boot from its disk. Raises ResumeRefused for memory saved while its
        agent did not answer; any other failure leaves the sandbox paused as it was."""
        build, workdir, sid = paused.build, paused.workdir, paused.sandbox_id
        with_memory = memory and info.kind == "memory"
        if with_memory and info.envd_unresponsive:
            raise ResumeRefused(
                f"sandbox {sid} was paused while its agent did not answer; restoring its memory would bring the "
                "unresponsive agent back. Resume it without memory (memory: false; E2B's on_resume=\"reboot\"), "
                "which boots it from its disk")
        missing = stored_files_present(workdir, info)
        if missing:
            raise VmmError(f"sandbox {sid} cannot resume: {missing}")
        self.restorer.check_network(build)  # its device state holds the NIC's backend (a 409 naming the mismatch)
        times: dict[str, float] = {}
        slot: NetworkSlot | None = None
        vm: Vm | None = None
        restorer = self.restorer
        try:
            t0 = time.perf_counter()
            if restorer.network is not None and restorer.uses_slot(build):
                slot = await restorer.network.acquire()
                (workdir / SLOT_FILE).write_text(str(slot.index))
                times["net"] = time.perf_counter() - t0
                await SnapshotRestore.apply_egress(slot, egress, times)
            spec = restorer.vm_spec(build, sid, workdir, kill_with_owner=kill_with_owner, slot=slot)
            driver = restorer.driver(build)
            if with_memory:
                spec = dataclasses.replace(spec, anonymous_memory=False)
                t1 = time.perf_counter()
                vm = await driver.prestart(spec)
                times["spawn"] = time.perf_counter() - t1
                st = StageTimes()
                await driver.restore(vm, SnapshotFiles(pause_dir(workdir) / VMSTATE, build.snapshot.memory_file), st)
                times.update(st.steps)
                agent = AgentClient.for_endpoint(vm.agent_endpoint, access_token=paused.access_token,
                                                 timeout=INIT_TIMEOUT_S)
                try:
                    t1 = time.perf_counter()
                    await agent.resync()
                    times["init"] = time.perf_counter() - t1
                finally:
                    await agent.aclose()
            else:
                vm = await self._boot(build, spec, paused, env_vars, times)
        except BaseException:
            if vm is not None:
                await vm.kill()
            (workdir / SLOT_FILE).unlink(missing_ok=True)
            await restorer.release_slot(slot)
            raise
        shutil.rmtree(pause_dir(workdir), ignore_errors=True)  # running again: the next pause saves it afresh
        agent = AgentClient.for_endpoint(vm.agent_endpoint, access_token=paused.access_token)
        log.info("sandbox %s resumed (%s) %s", sid, "memory" if with_memory else "boot from its disk",
                 {k: round(v * 1000, 1) for k, v in times.items()})
        return dataclasses.replace(paused, vm=vm, agent=agent, slot=slot, times=times, source="resumed")

    async def _boot(self, build: TemplateBuild, spec: VmSpec, paused: RestoredVm, env_vars: dict[str, str],
                    times: dict[str, float]) -> Vm:
        """Boot the template's kernel on the sandbox's own disk and give the agent its identity."""
        spec = dataclasses.replace(spec, anonymous_memory=True)
        t0 = time.perf_counter()
        vm = await self.restorer.driver(build).boot(spec)
        try:
            async with AgentClient.for_endpoint(vm.agent_endpoint, timeout=INIT_TIMEOUT_S) as agent:
                waiter = asyncio.ensure_future(agent.wait_healthy(float(build.manifest.config.get("boot_timeout_s", 300))))
                died = asyncio.ensure_future(vm.wait_exit())
                done, _ = await asyncio.wait({waiter, died}, return_when=asyncio.FIRST_COMPLETED)
                if died in done:
                    waiter.cancel()
                    raise VmmError(f"the VM of {paused.sandbox_id} exited (status {died.result()}) while booting from "
                                   f"its disk: {vm.console_tail(10)}")
                died.cancel()
                waiter.result()
                times["boot"] = time.perf_counter() - t0
                t1 = time.perf_counter()
                await agent.init(
                    sandbox_id=paused.sandbox_id, env_vars=dict(env_vars), access_token=paused.access_token,
                    hostname=paused.sandbox_id, timestamp_ns=time.time_ns(), entropy=os.urandom(64),
                    default_user=build.default_user, default_workdir=build.default_workdir,
                )
                times["init"] = time.perf_counter() - t1
        except BaseException:
            await vm.kill()
            raise
        return vm

    @staticmethod
    def forget(workdir: Path) -> None:
        """Remove what a pause stored (the sandbox's directory goes with its kill)."""
        shutil.rmtree(pause_dir(workdir), ignore_errors=True)
