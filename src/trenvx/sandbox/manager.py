"""The sandboxes of one node: create from a template, find, run commands in, time out, kill.

This is the Python API below the HTTP server::

    async with SandboxManager(load_config("configs/example_config.toml")) as manager:
        sb = await manager.create("default-sandbox")
        result = await sb.run("python3 -c \\"print('Hello World')\\"")
        print(result.stdout)          # b'Hello World\\n'
        await manager.kill(sb.id)

What it adds to a bare restore:

- **Timeouts.** Every sandbox has a deadline (default ``orchestrator.default_timeout_s``);
  :meth:`set_timeout`, :meth:`refresh` and :meth:`connect` move it; a reaper kills expired ones,
  or pauses them to disk when their :class:`~.lifecycle.LifecyclePolicy` says ``auto_pause``
  (E2B's lifecycle); with ``auto_resume``, :meth:`wake` resumes a paused one for the traffic that
  reached it. A sandbox paused longer than ``orchestrator.paused_retention_s`` is killed.
- **Admission.** Limits per host and per template (429) and a memory headroom (503), checked
  before any work (see :mod:`.limits`).
- **Pools** (``[pool]`` in the config, :mod:`.pool`): a create takes a hot or warm VM made
  ahead of time when one is ready and otherwise restores into a new VMM process; it never waits
  for a refill. ``Sandbox.restored.source`` and ``start_times`` say which path a create took and
  what each stage on it cost; :attr:`SandboxManager.observers` hear of every create (metrics).
- **Pause to disk** (:mod:`.suspend`): :meth:`pause` saves a sandbox (its memory as the pages
  that differ from its template, or only its filesystem) under its directory and ends its VMM;
  :meth:`resume` (or :meth:`connect`) brings it back with the same id, token, files and, with
  memory, processes. A paused sandbox's timeout does not run, it counts for no limit, and it
  survives a server restart (a record and files: nothing to adopt).
- **Death detection.** A task awaits each VMM process; a VMM that exits on its own is noticed at
  once, its files are removed and the sandbox is reported as ended (reason ``died``).
- **Health checks** (``orchestrator.health_check_interval_s``): the agent of every running
  sandbox is asked ``/health`` periodically; one that has not answered for
  ``health_check_grace_s`` (a hung guest, a stopped VMM) is ended (reason ``unresponsive``).
- **Persistence** (when ``state_path`` is given, as the server does): every sandbox is recorded
  in SQLite with the VMM that runs it; a restarted manager adopts the VMs still running (pidfd +
  the VM's control socket: QMP for QEMU, the API socket for Firecracker and Cloud Hypervisor) and
  cleans up the files of those that died. VMs are then started so that they survive this process
  (no ``PR_SET_PDEATHSIG``): a server that crashes or is killed leaves its sandboxes running for
  the next one (and :mod:`.orphan_watchdog` ends them at their timeouts if none comes); a VM
  being made when it died is ended by the next server (:mod:`.inflight`). :meth:`close` kills
  every sandbox, unless ``keep=True``, which leaves them running. Without a state store nothing
  could adopt them: VMs die with this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

from ..config import AGENT_PORT, Config, NetworkMode, StartMode
from ..guest.client import AgentClient, CommandResult
from ..guest.endpoint import AgentEndpoint, HybridVsockEndpoint, TcpEndpoint
from ..layout import DataRoot
from ..template.store import MANIFEST, TemplateBuild, TemplateManifest, TemplateNotFound, TemplateStore
from ..vmm.process import memory_of, pid_alive
from . import adopt
from .lifecycle import InvalidTimeout, LifecyclePolicy, Reaper, check_timeout, deadline_after, extended_deadline
from .limits import Admission, AdmissionError, Limits, LimitReached, OutOfMemory
from .reclaim import PASS_DEADLINE_S, RECLAIM_AGAIN_S, Reclaimed, reclaim
from ..network import mode as network_mode
from ..network.policy import DEFAULT_POLICY, EgressPolicy
from ..network.slot import HostNetwork, NetworkSlot
from .network_state import NetworkState, read_network_state, write_network_state
from . import inflight
from .pool import PoolStats, TemplatePool, reap_stale_pooled
from .restore import RestoredVm, SnapshotRestore, TemplateNetworkMismatch, new_sandbox_id
from .snapshots import Snapshots, add_user
from .state import EXITED, PAUSED, RUNNING, SandboxRecord, StateStore
from .suspend import PauseInfo, PauseRefused, PauseUnsupported, ResumeRefused, StoppedVm, Suspender, stored_files_present

log = logging.getLogger(__name__)
MiB = 1 << 20

__all__ = [
    "AdmissionError", "CreateEvent", "InvalidTimeout", "LimitReached", "ManagerClosed", "NetworkUnavailable", "OutOfMemory",
    "PauseRefused", "PauseUnsupported", "PortUnavailable", "ResumeRefused", "SuspendEvent", "TemplateNetworkMismatch",
    "Sandbox", "SandboxConflict", "SandboxManager", "SandboxNotFound", "TemplateNotFound", "LifecyclePolicy",
    "VmExited",
]

ADOPT_HEALTH_TIMEOUT_S = 5.0
ORPHAN_MIN_AGE_S = 120.0
HEALTH_PROBE_MAX_S = 5.0
HEALTH_OVERLOAD_SILENT = 2
"""More sandboxes than this (and over a quarter of them) silent in one health pass: the host is
overloaded and none is ended for it (see :meth:`SandboxManager.check_health`)."""
HEALTH_PARALLEL = 16
"""Health probes in flight at once (each is one short HTTP request to an agent)."""


class SandboxNotFound(KeyError):
    """No running sandbox has this id. ``reason`` says why, when the sandbox existed."""

    def __init__(self, sandbox_id: str, reason: str = "") -> None:
        super().__init__(sandbox_id)
        self.sandbox_id = sandbox_id
        self.reason = reason

    def __str__(self) -> str:
        if self.reason:
            return f"sandbox {self.sandbox_id!r} does not exist anymore: {self.reason}"
        return f"sandbox {self.sandbox_id!r} does not exist (it was killed, timed out, or never existed)"


class ManagerClosed(RuntimeError):
    """The manager is shutting down and starts no more sandboxes."""


class PortUnavailable(RuntimeError):
    """A port inside the sandbox cannot be reached from the host."""


class SandboxConflict(RuntimeError):
    """The sandbox is not in a state that allows this (e.g. pausing a paused sandbox)."""


class NetworkUnavailable(RuntimeError):
    """Egress rules cannot be enforced for this sandbox (e.g. ``network = "user"``: no egress at all)."""


class VmExited(SandboxNotFound):
    """The sandbox's VMM process exited while an operation (a pause) used it: the sandbox has ended."""


END_REASONS = {
    "killed": "it was killed",
    "timeout": "its timeout expired",
    "died": "its VM exited on its own",
    "died_while_down": "its VM exited while the server was not running",
    "unresponsive": "its VM stopped responding",
    "lost": "the restarted server could not re-attach to its VM",
    "lost_paused": "the restarted server found its saved state incomplete",
    "paused_retention_expired": "it stayed paused longer than this server keeps paused sandboxes "
                                "(orchestrator.paused_retention_s)",
    "shutdown": "the server stopped",
}


def describe_end(reason: str, ended_at: float | None) -> str:
    text = END_REASONS.get(reason.split(":", 1)[0], reason or "it ended")
    if ":" in reason:
        text += f" ({reason.split(':', 1)[1].strip()})"
    if ended_at:
        text += f", {max(0.0, time.time() - ended_at):.0f} s ago"
    return text


@dataclass(frozen=True)
class SandboxOptions:
    """What a create asks of a new sandbox besides its template (one value for :meth:`SandboxManager.create`,
    a fork's children and the create path under them)."""

    env_vars: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    timeout_s: float | None = None
    """Seconds until its timeout (None: the orchestrator's default)."""
    egress: EgressPolicy | None = None
    """What it may reach outside (None: everything the operator does not block)."""
    allow_public_traffic: bool = True
    """False: its ports answer only requests carrying its ``traffic_access_token``."""
    allow_internet_access: bool | None = None
    mask_request_host: str | None = None
    lifecycle: LifecyclePolicy = field(default_factory=LifecyclePolicy)
    """What its timeout does (default: kill it)."""


@dataclass(eq=False)
class Sandbox:
    """One running sandbox. ``agent`` talks to the guest agent with this sandbox's access token."""

    restored: RestoredVm
    template: str
    created_at: float = field(default_factory=time.time)
    metadata: dict[str, str] = field(default_factory=dict)
    env_vars: dict[str, str] = field(default_factory=dict)
    end_at: float = 0.0
    """Deadline (seconds since the epoch) after which the reaper kills the sandbox."""
    pid_started_at: float = 0.0
    adopted: bool = False
    ports: dict[int, int] = field(default_factory=dict)
    """Guest port -> host port of the forwards added at runtime (besides the agent's)."""
    ending: bool = False
    paused: bool = False
    pause_info: PauseInfo | None = None
    """Set while paused to disk (its VMM is gone: ``restored.vm`` is a :class:`StoppedVm`). None with
    ``paused`` True: a sandbox adopted from a server of before pauses to disk, its vCPUs stopped."""
    reclaimed_at: float = 0.0
    """``time.monotonic()`` of the last memory reclaim (0: never)."""
    answered_at: float = field(default_factory=time.monotonic)
    """``time.monotonic()`` when its agent last answered a health check (or it started, resumed or
    was adopted)."""
    egress: EgressPolicy = DEFAULT_POLICY
    """What the sandbox may reach outside (E2B's allowOut/denyOut; enforced by its network slot)."""
    allow_public_traffic: bool = True
    """False: requests proxied to the sandbox's ports (not the agent's) must carry
    ``traffic_access_token`` in the ``e2b-traffic-access-token`` header (E2B's
    ``network.allowPublicTraffic``)."""
    traffic_access_token: str = ""
    """Set when ``allow_public_traffic`` is False; empty otherwise."""
    allow_internet_access: bool | None = None
    """E2B's ``allow_internet_access`` as the client gave it (reported back; ``egress`` holds its effect)."""
    mask_request_host: str | None = None
    """E2B's ``network.maskRequestHost`` as the client gave it (reported back; the proxy does not use it)."""
    lifecycle: LifecyclePolicy = field(default_factory=LifecyclePolicy)
    """What its timeout does (kill, or pause to disk) and whether traffic resumes it when paused."""
    _port_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    _state_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    """Held by a pause, a resume and a kill: one change of its state at a time."""
    _net_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    """Held while its egress rules change: the rules recorded are the rules loaded."""
    _watcher: asyncio.Task[None] | None = field(default=None, repr=False)
    _ended: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def id(self) -> str:
        return self.restored.sandbox_id

    def options_for_copy(self, timeout_s: float) -> SandboxOptions:
        """What a fork's child of this sandbox gets: its environment, metadata, network rules and
        lifecycle (auto-pause and auto-resume), with its own timeout."""
        return SandboxOptions(
            env_vars=dict(self.env_vars), metadata=dict(self.metadata), timeout_s=timeout_s, egress=self.egress,
            allow_public_traffic=self.allow_public_traffic, allow_internet_access=self.allow_internet_access,
            mask_request_host=self.mask_request_host, lifecycle=self.lifecycle,
        )

    @property
    def agent(self) -> AgentClient:
        return self.restored.agent

    @property
    def build(self) -> TemplateBuild:
        return self.restored.build

    @property
    def pid(self) -> int:
        return self.restored.vm.pid

    @property
    def agent_port(self) -> int:
        return self.restored.vm.agent_port

    @property
    def agent_url(self) -> str:
        return self.restored.vm.agent_url

    @property
    def agent_endpoint(self) -> AgentEndpoint:
        """How the host reaches the agent: TCP (QEMU's forward) or hybrid vsock (Firecracker, Cloud Hypervisor).
        (A resume may put the sandbox in another network slot: its endpoint is its VM's of now.)"""
        return self.restored.vm.agent_endpoint

    @property
    def vmm_type(self) -> str:
        """The VMM running this sandbox: the one its template was built with."""
        return self.build.manifest.vmm_type

    @property
    def access_token(self) -> str:
        return self.restored.access_token

    @property
    def start_times(self) -> dict[str, float]:
        return self.restored.times

    @property
    def state(self) -> str:
        return PAUSED if self.paused else RUNNING

    @property
    def timeout_left(self) -> float:
        if self.pause_info is not None:
            return self.pause_info.timeout_left  # its timeout does not run while paused
        return max(0.0, self.end_at - time.time())

    @property
    def shown_end_at(self) -> float:
        """When it will end if nothing changes (a paused sandbox: its time left counted from now)."""
        return time.time() + self.pause_info.timeout_left if self.pause_info is not None else self.end_at

    def is_alive(self) -> bool:
        return self.restored.vm.is_alive()

    def network_state(self) -> NetworkState:
        slot = self.restored.slot
        return NetworkState(
            slot.index if slot is not None else None, self.egress, self.allow_public_traffic,
            self.traffic_access_token, self.allow_internet_access, self.mask_request_host,
        )

    def memory(self) -> tuple[int, int]:
        """(RSS, PSS) of the sandbox's VMM process in bytes (0, 0 when paused to disk: it has none)."""
        if self.pause_info is not None:
            return 0, 0
        return memory_of(self.pid)

    async def run(self, cmd: str | list[str], **kwargs: Any) -> CommandResult:
        return await self.agent.run(cmd, **kwargs)

    def record(self) -> SandboxRecord:
        m = self.build.manifest
        return SandboxRecord(
            id=self.id, template=self.template, build_id=m.build_id, build_path=str(self.build.path),
            pid=self.pid, pid_started_at=self.pid_started_at, agent_port=self.agent_port,
            access_token=self.access_token, workdir=str(self.restored.workdir), created_at=self.created_at,
            end_at=self.end_at, vcpu=m.machine.vcpu, mem_mb=m.machine.mem_mb, disk_mb=self.build.disk_mb,
            metadata=dict(self.metadata), env_vars=dict(self.env_vars), start_times=dict(self.start_times),
            ports=dict(self.ports), state=self.state, vmm_type=self.vmm_type,
            pause=self.pause_info.to_json() if self.pause_info is not None else {},
            lifecycle=self.lifecycle.to_json(),
        )



@dataclass(frozen=True)
class CreateEvent:
    """One create attempt, as the metrics see it."""

    template: str
    source: str
    """``hot``, ``warm`` (pools) or ``cold`` (a new VMM process)."""
    stages: dict[str, float]
    """Seconds per stage on the create path: disk, spawn, load, resume, init (the agent's first reply)."""
    total_s: float
    outcome: str
    """``ok``, or the exception's class name."""


@dataclass(frozen=True)
class SuspendEvent:
    """One pause or resume attempt, as the metrics see it."""

    op: str
    """``pause`` or ``resume``."""
    template: str
    kind: str
    """A pause: ``memory`` or ``filesystem``; a resume: ``memory`` or ``boot`` (from its disk)."""
    seconds: float
    outcome: str
    """``ok``, or the exception's class name."""
    stored_bytes: int = 0
    reason: str = "requested"
    """Why: ``requested`` (the API), a pause's ``timeout`` (its lifecycle's auto-pause), a resume's
    ``traffic`` (auto-resume)."""


class SandboxManager:
    def __init__(
        self,
        config: Config,
        *,
        state_path: Path | None = None,
        keep: bool | None = None,
        admission: Admission | None = None,
        pools: bool = True,
    ) -> None:
        self.config = config
        orch = config.orchestrator
        self.data_root = DataRoot(config.data_root).ensure()
        self.templates = TemplateStore(self.data_root)
        self.keep = orch.keep_on_exit if keep is None else keep
        self.store = StateStore(state_path) if state_path is not None else None
        self.vms_outlive = self.keep or self.store is not None
        """VMs are started without ``PR_SET_PDEATHSIG``: they survive this process's death (a crash,
        SIGKILL, the OOM killer) for the next server to adopt. Pooled VMs too: a pooled VM becomes a
        sandbox when a create takes it, and a process cannot drop its death signal later. Without a
        state store nothing could adopt them, so they die with this process."""
        self.network_mode, self.network_reason = network_mode.resolve(config.network)
        self.network: HostNetwork | None = (
            HostNetwork(config.network, config.data_root, outlive_process=self.vms_outlive)
            if self.network_mode is NetworkMode.netns else None
        )
        self.restorer = SnapshotRestore(config, self.data_root, self.network)
        self.suspender = Suspender(self.restorer)
        self.snapshots = Snapshots(self)
        """Snapshots and forks of running sandboxes (:mod:`.snapshots`)."""
        self.admission = admission or Admission(
            Limits(orch.max_sandboxes, orch.max_sandboxes_per_template, orch.memory_headroom_mb)
        )
        self._sandboxes: dict[str, Sandbox] = {}
        self._ended: dict[str, SandboxRecord] = {}
        self._creating: set[asyncio.Task[Sandbox]] = set()
        self._reclaiming = asyncio.Lock()
        self._finishing: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False
        self.reaper = Reaper(orch.reaper_interval_s, self._due, self._expire, self._housekeeping)
        self.adopted: list[str] = []
        self.cleaned: list[str] = []
        self.pools: dict[str, TemplatePool] = {}
        self._use_pools = (
            pools and (config.pool.warm_max > 0 or config.pool.hot_max > 0) and orch.start_mode is StartMode.snapshot
        )
        self.observers: list[Callable[[CreateEvent], None]] = []
        """Called after every create attempt (success or failure), e.g. by the server's metrics."""
        self.suspend_observers: list[Callable[[SuspendEvent], None]] = []
        """Called after every pause and resume attempt."""
        self.recovered_paused: list[str] = []
        """Paused sandboxes a restarted manager found in its state (records and files, no VMM)."""
        self._waking: dict[str, asyncio.Task[Sandbox]] = {}
        """Auto-resumes in progress (:meth:`wake`), one per sandbox, shared by the requests that wait."""
        self._auto_pausing: dict[str, asyncio.Task[None]] = {}
        """Auto-pauses in progress (a timed-out sandbox whose lifecycle says pause)."""
        self._health_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "SandboxManager":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- start and stop -------------------------------------------------------------------

    async def start(self) -> None:
        """Adopt what a previous server left running (with a state store), start the reaper."""
        if self._started:
            return
        self._started = True
        network_mode.warn_if_user(self.network_mode, self.network_reason)
        if self.store is not None:
            reap_stale_pooled(self.data_root)
            self._reap_inflight()
        if self.network is not None:
            # Slots of sandboxes a previous server left running are kept (and taken back by
            # _recover); every other slot of this data_root is removed.
            keep = {s for rec in (self.store.running() if self.store is not None else [])
                    if (s := read_network_state(Path(rec.workdir)).slot) is not None}
            await self.network.start(keep=keep)
        if self.store is not None:
            await self._recover()
            if self.network is not None:
                await self.network.sweep()
        self._prune_ended(time.time())  # a previous server's ended sandboxes, before anything lists them
        await self._sweep_jails()
        self.reaper.start()
        if self.config.orchestrator.health_check_interval_s > 0:
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop(), name="trenvx-health")
        if self._use_pools:
            for name in self.config.pool.templates or [self.config.default_template]:
                pool = TemplatePool(
                    name, self.restorer, self.templates, self.config.pool,
                    has_room=self.admission.has_memory_for, kill_with_owner=not self.vms_outlive,
                    track_inflight=self.store is not None,
                )
                self.pools[name] = pool
                pool.start()

    def pool_stats(self) -> list[PoolStats]:
        return [p.stats() for p in self.pools.values()]

    async def close(self) -> None:
        """Stop the reaper; kill every sandbox and remove its files (or leave them, with ``keep``)."""
        if self._closed:
            return
        self._closed = True
        await self.reaper.stop()
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        await asyncio.gather(*(p.close() for p in self.pools.values()), return_exceptions=True)
        if self._creating:
            await asyncio.gather(*self._creating, return_exceptions=True)
        # Auto-pauses in flight complete first: their sandboxes are then paused, kept for the next
        # server below (auto-resumes in flight complete too; one that completes now ends with the server).
        while self._auto_pausing or self._waking:
            await asyncio.gather(*self._auto_pausing.values(), *self._waking.values(), return_exceptions=True)
        kept_slots: set[int] = set()
        if self.store is not None:
            # Paused sandboxes are a record and files: the next server resumes them, whatever --keep says.
            for sb in [sb for sb in self._sandboxes.values() if sb.pause_info is not None and not sb.ending]:
                self._sandboxes.pop(sb.id, None)
                with contextlib.suppress(Exception):
                    self.store.put(sb.record())
        if self.keep:
            for sb in list(self._sandboxes.values()):
                await self._detach(sb)
                if sb.restored.slot is not None:
                    kept_slots.add(sb.restored.slot.index)
            log.info("left %d sandboxes running for the next server (--keep)", len(self._sandboxes))
            self._sandboxes.clear()
        else:
            ids = list(self._sandboxes)
            await asyncio.gather(*(self.kill(i, reason="shutdown") for i in ids), return_exceptions=True)
        while self._finishing:  # kills in flight (reaper, death watchers) complete before we go
            await asyncio.gather(*list(self._finishing), return_exceptions=True)
        if self.network is not None:
            await self.network.close(keep=kept_slots)
        jail = self.restorer.jail
        if jail is not None:
            await asyncio.to_thread(jail.release)
        if self.store is not None:
            self.store.close()

    async def _detach(self, sb: Sandbox) -> None:
        if sb._watcher is not None:
            sb._watcher.cancel()
        with contextlib.suppress(Exception):
            await sb.agent.aclose()
        await adopt.release(sb.restored.vm)
        if self.store is not None:
            self.store.put(sb.record())

    # -- create ---------------------------------------------------------------------------

    async def create(
        self,
        template: str | None = None,
        *,
        env_vars: dict[str, str] | None = None,
        metadata: dict[str, str] | None = None,
        timeout_s: float | None = None,
        egress: EgressPolicy | None = None,
        allow_public_traffic: bool = True,
        allow_internet_access: bool | None = None,
        mask_request_host: str | None = None,
        lifecycle: LifecyclePolicy | None = None,
    ) -> Sandbox:
        """Restore a new sandbox from the current build of ``template`` (default: the config's).

        The keywords are :class:`SandboxOptions`'s: ``egress``: what it may reach outside (default:
        everything the operator does not block); ``allow_public_traffic=False``: its ports answer
        only requests carrying its ``traffic_access_token``; ``lifecycle``: what its timeout does
        (default: kill it).

        Raises :class:`TemplateNotFound`, :class:`InvalidTimeout`, :class:`LimitReached`,
        :class:`OutOfMemory`, :class:`ManagerClosed`, :class:`PauseUnsupported` (an auto-pause its
        VMM cannot do), or the restore's error.
        The restore is shielded from the caller's cancellation: a sandbox that was started is
        always registered (and ends by its timeout) rather than leaked.
        """
        if self._closed:
            raise ManagerClosed("the sandbox manager is shutting down; no new sandboxes")
        await self.start()
        name = self.template_name(template or self.config.default_template)
        options = SandboxOptions(
            env_vars=dict(env_vars or {}), metadata=dict(metadata or {}), timeout_s=timeout_s, egress=egress,
            allow_public_traffic=allow_public_traffic, allow_internet_access=allow_internet_access,
            mask_request_host=mask_request_host, lifecycle=lifecycle or LifecyclePolicy(),
        )
        self._check_timeout(options)
        build = self.templates.current(name)
        return await self.create_from_build(build, name, options)

    def template_name(self, name: str) -> str:
        """The template ``name`` is an alias of (the config's aliases, then those recorded in the
        current builds: a server without the template's table still knows them), else ``name``."""
        canonical = self.config.canonical_template(name)
        if canonical != name or name in self.config.template:
            return canonical
        names = self.templates.names()
        if name in names:
            return name
        for other in names:
            try:
                aliases = self.templates.current(other).manifest.config.get("aliases") or []
            except TemplateNotFound:
                continue
            if name in aliases:
                return other
        return name

    def _check_timeout(self, options: SandboxOptions) -> float:
        orch = self.config.orchestrator
        return check_timeout(orch.default_timeout_s if options.timeout_s is None else options.timeout_s,
                             orch.max_timeout_s)

    async def create_from_build(self, build: TemplateBuild, template: str, options: SandboxOptions) -> Sandbox:
        """:meth:`create` from ``build`` (a template's current build, or a fork's snapshot), reported
        as a sandbox of ``template``. Refusals (timeout, network mode, an auto-pause the VMM cannot
        do, egress rules the network cannot enforce) come before any work."""
        if self._closed:
            raise ManagerClosed("the sandbox manager is shutting down; no new sandboxes")
        await self.start()
        timeout = self._check_timeout(options)
        self.restorer.check_network(build)  # TemplateNetworkMismatch
        if options.lifecycle.auto_pause:
            self.suspender.check_supported(build)  # PauseUnsupported
        if options.egress is not None:
            self._check_enforceable(options.egress)
        task = asyncio.get_running_loop().create_task(
            self._create(build, template, dataclasses.replace(options, timeout_s=timeout))
        )
        self._creating.add(task)
        task.add_done_callback(self._creating.discard)
        return await asyncio.shield(task)

    async def _create(self, build: TemplateBuild, name: str, options: SandboxOptions) -> Sandbox:
        """The create itself (``options.timeout_s`` checked and set)."""
        assert options.timeout_s is not None
        timeout, egress = options.timeout_s, options.egress or DEFAULT_POLICY
        t0 = time.perf_counter()
        source = "cold"
        try:
            self.admission.check(name, self.admission.reserve_mb(name, build.machine.mem_mb))
        except OutOfMemory:
            try:
                await self.reclaim_for_memory()  # then admission decides again, below
            except Exception:  # noqa: BLE001 - the refusal below must still reach the client
                log.exception("reclaiming memory before refusing a sandbox of %s failed", name)
        except AdmissionError:
            pass  # refused below, with its event recorded
        try:
            with self.admission.starting(name, build.machine.mem_mb):
                restored = await self._restore(build, name, options.env_vars, egress)
                source = restored.source
        except BaseException as e:
            self._observe(CreateEvent(name, source, {}, time.perf_counter() - t0, type(e).__name__))
            raise
        now = time.time()
        sb = Sandbox(
            restored, template=name, created_at=now, metadata=dict(options.metadata), env_vars=dict(options.env_vars),
            end_at=deadline_after(timeout, now),
            pid_started_at=adopt.process_started_at(restored.vm.pid) or time.time(),
            egress=egress, allow_public_traffic=options.allow_public_traffic,
            traffic_access_token="" if options.allow_public_traffic else secrets.token_urlsafe(24),
            allow_internet_access=options.allow_internet_access, mask_request_host=options.mask_request_host,
            lifecycle=dataclasses.replace(options.lifecycle, timeout_s=timeout),  # what an auto-paused one resumes with
        )
        write_network_state(sb.restored.workdir, sb.network_state())
        self._register(sb)
        total = time.perf_counter() - t0
        self._observe(CreateEvent(name, source, dict(restored.times), total, "ok"))
        log.info(
            "sandbox %s created from %s/%s (%s) in %.1f ms %s", sb.id, name, build.build_id, source,
            total * 1000, {k: round(v * 1000, 1) for k, v in restored.times.items()},
        )
        if self._closed and not self.keep:
            await self.kill(sb.id, reason="shutdown")
        return sb

    async def _restore(
        self, build: TemplateBuild, name: str, env_vars: dict[str, str], egress: EgressPolicy = DEFAULT_POLICY,
    ) -> RestoredVm:
        """From the pool (hot: identity only; warm: load, resume, identity) or, when empty, from scratch.

        The sandbox's egress rules are in place before its VM runs on the create path."""
        pool = self.pools.get(name)
        item = pool.take(build) if pool is not None and build.name == name else None  # not a fork's child
        if item is not None:
            item.prepared.times.clear()  # stages done ahead of the create are not on its path
            try:
                await SnapshotRestore.apply_egress(item.prepared.slot, egress, item.prepared.times)
                if item.tier == "warm":
                    await self.restorer.start(build, item.prepared)
                else:
                    t0 = time.perf_counter()
                    await item.vm.resume()
                    item.prepared.times["resume"] = time.perf_counter() - t0
                restored = await self.restorer.activate(build, item.sandbox_id, item.prepared, env_vars)
                restored.source = item.tier
                return restored
            except Exception as e:  # noqa: BLE001 - the slow path still gives the caller a sandbox
                log.warning("a %s pooled VM of %s failed (%s); restoring into a new VMM process", item.tier, name, e)
                with contextlib.suppress(Exception):
                    await item.discard()
        sandbox_id = new_sandbox_id()
        self._mark_inflight(sandbox_id)
        try:
            return await self.restorer.restore(build, sandbox_id=sandbox_id, env_vars=env_vars,
                                               kill_with_owner=not self.vms_outlive, egress=egress)
        except BaseException:
            self._clear_inflight(sandbox_id)
            raise

    def _mark_inflight(self, sandbox_id: str) -> None:
        """A VM that outlives this process is about to be made for ``sandbox_id``: a successor ends
        it if this process dies before it is recorded (:mod:`.inflight`)."""
        if self.store is not None:
            inflight.mark(self.data_root.run, sandbox_id)

    def _clear_inflight(self, sandbox_id: str) -> None:
        if self.store is not None:
            inflight.clear(self.data_root.run, sandbox_id)

    def _reap_inflight(self) -> None:
        """End the VMs that a dead process (a previous server) was making when it died: a create, a
        resume or a pool refill that never got recorded. Their network slots go with the sweep."""
        assert self.store is not None
        for sid in inflight.reap_stale(self.data_root, self._recorded_state):
            log.warning("sandbox %s was being made when the previous server died: its VM and files were removed", sid)

    def _recorded_state(self, sandbox_id: str) -> str | None:
        rec = self.store.get(sandbox_id) if self.store is not None else None
        return None if rec is None else (PAUSED if rec.pause else rec.state)


    def _observe(self, event: CreateEvent) -> None:
        for observer in self.observers:
            try:
                observer(event)
            except Exception:  # noqa: BLE001 - metrics must never break a create
                log.exception("create observer failed")

    def _register(self, sb: Sandbox) -> None:
        self._sandboxes[sb.id] = sb
        self.admission.add_running(sb.template)
        if self.store is not None:
            self.store.put(sb.record())
            inflight.clear(self.data_root.run, sb.id)  # recorded: adopted, not reaped, after a crash
        sb._watcher = asyncio.get_running_loop().create_task(self._watch(sb), name=f"watch-{sb.id}")

    # -- find -----------------------------------------------------------------------------

    def get(self, sandbox_id: str) -> Sandbox:
        try:
            return self._sandboxes[sandbox_id]
        except KeyError:
            ended = self._ended.get(sandbox_id)
            if ended is None and self.store is not None and isinstance(sandbox_id, str):
                ended = self.store.get(sandbox_id)
            reason = describe_end(ended.end_reason, ended.ended_at) if ended and ended.state != RUNNING else ""
            raise SandboxNotFound(sandbox_id, reason) from None

    def list(self) -> list[Sandbox]:
        """The running sandboxes, oldest first."""
        return sorted(self._sandboxes.values(), key=lambda s: (s.created_at, s.id))

    def ended(self) -> list[SandboxRecord]:
        """Sandboxes that ended within ``ended_retention_s`` (at most ``ended_retention_max`` of them),
        oldest first. Filtered here too, so that a reaper pass held up (by a slow kill) never lets a
        listing show what it is about to prune."""
        since = time.time() - self.config.orchestrator.ended_retention_s
        if self.store is not None:
            return self.store.ended(since=since)
        recent = [r for r in self._ended.values() if (r.ended_at or 0) >= since]
        return sorted(recent, key=lambda r: (r.created_at, r.id))

    # -- timeouts -------------------------------------------------------------------------

    def set_timeout(self, sandbox_id: str, timeout_s: float) -> Sandbox:
        """The sandbox ends ``timeout_s`` seconds from now (sooner or later than before); a paused
        one gets ``timeout_s`` seconds left for when it runs again."""
        sb = self.get(sandbox_id)
        seconds = check_timeout(timeout_s, self.config.orchestrator.max_timeout_s)
        self._set_end(sb, deadline_after(seconds))
        return sb

    def refresh(self, sandbox_id: str, duration_s: float) -> Sandbox:
        """Keep the sandbox alive for at least ``duration_s`` more seconds (never shortens)."""
        sb = self.get(sandbox_id)
        seconds = check_timeout(duration_s, self.config.orchestrator.max_timeout_s, "duration")
        self._set_end(sb, extended_deadline(sb.shown_end_at, seconds))
        return sb

    def _set_end(self, sb: Sandbox, end_at: float) -> None:
        if sb.pause_info is not None:  # paused: what is left of its timeout, counted once it runs
            sb.pause_info.timeout_left = max(0.0, end_at - time.time())
            if self.store is not None:
                self.store.put(sb.record())
            return
        sb.end_at = end_at
        if self.store is not None:
            self.store.set_end_at(sb.id, end_at)

    def _due(self, now: float) -> list[str]:
        """Running sandboxes past their deadline, and paused ones kept past ``paused_retention_s``."""
        return [i for i, sb in self._sandboxes.items()
                if not sb.ending and i not in self._auto_pausing
                and (self._retention_over(sb, now) if sb.paused else sb.end_at <= now)]

    def _retention_over(self, sb: Sandbox, now: float) -> bool:
        keep = self.config.orchestrator.paused_retention_s
        return bool(keep) and sb.pause_info is not None and sb.pause_info.paused_at + keep <= now

    async def _expire(self, sandbox_id: str) -> None:
        """What the reaper does to a sandbox that is due: its lifecycle's auto-pause, else a kill."""
        sb = self._sandboxes.get(sandbox_id)
        if sb is None or sb.ending:
            return
        now = time.time()
        if sb.paused:
            if self._retention_over(sb, now):
                log.info("sandbox %s was paused longer than %d s: killing it", sandbox_id,
                         self.config.orchestrator.paused_retention_s)
                await self.kill(sandbox_id, reason="paused_retention_expired")
            return
        if sb.end_at > now:
            return
        if sb.lifecycle.auto_pause:
            # In a task of its own: a pause takes seconds, the reaper goes on meanwhile (and a
            # stopping manager waits for it, see close).
            if sandbox_id not in self._auto_pausing:
                task = asyncio.get_running_loop().create_task(self._auto_pause(sb), name=f"auto-pause-{sandbox_id}")
                self._auto_pausing[sandbox_id] = task
                task.add_done_callback(lambda _t: self._auto_pausing.pop(sandbox_id, None))
            return
        log.info("sandbox %s timed out", sandbox_id)
        await self.kill(sandbox_id, reason="timeout")

    async def _auto_pause(self, sb: Sandbox) -> None:
        """Pause a timed-out sandbox to disk (its lifecycle's ``on_timeout: pause``). Its record says
        why (its pause's reason ``timeout``); a resume gives it its create's timeout again. A pause
        that fails ends it as a timeout would, the failure in its end reason."""
        policy = sb.lifecycle
        async with sb._state_lock:
            if sb.ending or sb.paused or sb.id not in self._sandboxes or sb.end_at > time.time():
                return  # killed, paused or given more time meanwhile
            log.info("sandbox %s timed out: pausing it (%s)", sb.id,
                     "with its memory" if policy.auto_pause_memory else "its filesystem only")
            try:
                await self._pause_locked(sb, memory=policy.auto_pause_memory, strict=False,
                                         timeout_left=policy.timeout_s or self.config.orchestrator.default_timeout_s,
                                         reason="timeout")
                return
            except Exception as e:  # noqa: BLE001 - said in its end reason
                log.warning("sandbox %s: its auto-pause failed (%s: %s); killing it", sb.id, type(e).__name__, e)
                failure = f"{type(e).__name__}: {e}"
        with contextlib.suppress(SandboxNotFound):
            await self.kill(sb.id, reason=f"timeout: its auto-pause failed ({failure})")

    async def _sweep_jails(self) -> None:
        """Remove the cgroups and uid claims of VMMs that died while no server watched them."""
        policy = self.restorer.jail
        if policy is None:
            return
        groups, uids = await asyncio.to_thread(policy.sweep, set(self._sandboxes))
        if groups or uids:
            log.info("removed the jails of %d dead VMMs (cgroups %s, uids %s)", max(len(groups), len(uids)), groups, uids)

    def _housekeeping(self, now: float) -> None:
        """The reaper's work besides timeouts, every pass."""
        self._prune_ended(now)

    def _prune_ended(self, now: float) -> None:
        """Forget ended sandboxes (in memory and in the state) that ended more than
        ``ended_retention_s`` ago, and all but the ``ended_retention_max`` that ended last. Run by
        every reaper pass, at start (a restarted server's state, a lowered limit) and whenever a
        sandbox ends, so that neither bound waits for a restart or an hour to pass."""
        orch = self.config.orchestrator
        cutoff = now - orch.ended_retention_s
        kept = sorted((r for r in self._ended.values() if (r.ended_at or 0) >= cutoff),
                      key=lambda r: (r.ended_at or 0, r.id))
        last = kept[max(0, len(kept) - orch.ended_retention_max):] if orch.ended_retention_max else []
        keep = {r.id for r in last}
        for i in [i for i in self._ended if i not in keep]:
            del self._ended[i]
        if self.store is not None:
            self.store.prune_ended(cutoff, keep=orch.ended_retention_max)

    def set_lifecycle(self, sandbox_id: str, lifecycle: LifecyclePolicy) -> Sandbox:
        """Replace what the sandbox's timeout does (E2B's deprecated resume sets ``autoPause``); its
        create's timeout stays what an auto-paused sandbox resumes with. Raises
        :class:`PauseUnsupported` for an auto-pause its VMM cannot do."""
        sb = self.get(sandbox_id)
        if lifecycle.auto_pause:
            self.suspender.check_supported(sb.build)
        sb.lifecycle = dataclasses.replace(lifecycle, timeout_s=lifecycle.timeout_s or sb.lifecycle.timeout_s)
        if self.store is not None:
            self.store.put(sb.record())
        return sb

    # -- network --------------------------------------------------------------------------

    async def set_network(
        self, sandbox_id: str, egress: EgressPolicy, *, allow_internet_access: bool | None = None,
    ) -> Sandbox:
        """Replace the egress rules of a running (or paused) sandbox (``PUT /sandboxes/{id}/network``).

        Raises :class:`SandboxNotFound`, or :class:`NetworkUnavailable` where rules cannot be enforced.
        """
        sb = self.get(sandbox_id)
        async with sb._net_lock:
            await self._apply_egress(sb, egress)
            sb.egress, sb.allow_internet_access = egress, allow_internet_access
            write_network_state(sb.restored.workdir, sb.network_state())
        return sb

    def _check_enforceable(self, egress: EgressPolicy) -> None:
        """Without network slots sandboxes have no egress at all: rules that only take away are
        kept (and true), an ``allowOut`` cannot be honoured (:class:`NetworkUnavailable`)."""
        if self.network is None and (egress.allow_cidrs or egress.allow_domains):
            raise NetworkUnavailable(
                "this server runs sandboxes on QEMU user networking, isolated: they have no egress at all, so "
                f"allowOut cannot be honoured (network namespaces are not available here: {self.network_reason}; "
                "see trenvx doctor)"
            )

    async def _apply_egress(self, sb: Sandbox, egress: EgressPolicy) -> None:
        slot = sb.restored.slot
        if slot is None:
            self._check_enforceable(egress)
            return
        await slot.apply(egress)

    # -- pause and resume -----------------------------------------------------------------

    async def pause(self, sandbox_id: str, *, memory: bool = True, strict: bool = False) -> Sandbox:
        """Pause to disk: save the sandbox (with its memory, or only its filesystem) and end its VMM.

        Its timeout stops; it counts for no limit. Raises :class:`SandboxConflict` (409) if it is
        paused already, :class:`PauseRefused` (503) when its agent does not freeze and ``strict`` or
        ``memory=False`` asks for one that does, :class:`PauseUnsupported` for VMMs that cannot; a
        failed pause leaves it running.
        """
        sb = self.get(sandbox_id)
        async with sb._state_lock:
            self._check_live(sb)
            if sb.paused:
                raise SandboxConflict(f"sandbox {sandbox_id} is already paused")
            await self._pause_locked(sb, memory=memory, strict=strict, timeout_left=sb.timeout_left,
                                     reason="requested")
        return sb

    async def _pause_locked(self, sb: Sandbox, *, memory: bool, strict: bool, timeout_left: float,
                            reason: str) -> None:
        """Pause ``sb`` (running; its state lock held): ``timeout_left`` seconds are its timeout when it
        resumes, ``reason`` is recorded with its pause."""
        kind = "memory" if memory else "filesystem"
        t0 = time.perf_counter()
        self.suspender.check_supported(sb.build)
        if sb._watcher is not None:  # the VMM's end is ours, not a death
            sb._watcher.cancel()
            sb._watcher = None
        try:
            restored, info = await self.suspender.pause(sb.restored, memory=memory, strict=strict,
                                                        timeout_left=timeout_left)
        except BaseException as e:
            self._watch_vm(sb)
            self._observe_suspend(SuspendEvent("pause", sb.template, kind, time.perf_counter() - t0, type(e).__name__,
                                              reason=reason))
            if isinstance(e, Exception) and not sb.restored.vm.is_alive():
                raise VmExited(sb.id, f"its VM exited during the pause ({type(e).__name__}: {e})") from e
            raise
        info.reason = reason
        sb.restored, sb.pause_info, sb.paused = restored, info, True
        self.admission.remove_running(sb.template)
        if self.store is not None:
            self.store.put(sb.record())
        self._observe_suspend(SuspendEvent("pause", sb.template, kind, info.seconds, "ok", info.stored_bytes, reason))

    async def resume(self, sandbox_id: str, *, timeout_s: float | None = None, memory: bool = True,
                     reason: str = "requested") -> Sandbox:
        """Bring a paused sandbox back (same id, token, files; with its memory, its processes;
        ``memory=False``: booted from its disk). Its timeout runs again from what was left of it,
        extended to ``timeout_s`` from now if that is later. 409 if it is running. ``reason``: for
        the metrics (``traffic``: an auto-resume)."""
        sb = self.get(sandbox_id)
        seconds = None if timeout_s is None else check_timeout(timeout_s, self.config.orchestrator.max_timeout_s)
        async with sb._state_lock:
            self._check_live(sb)
            if not sb.paused:
                raise SandboxConflict(f"sandbox {sandbox_id} is running, not paused")
            info = sb.pause_info
            if info is None:  # paused in memory by a server of before pauses to disk
                await sb.restored.vm.resume()
                sb.paused = False
                if self.store is not None:
                    self.store.set_state(sb.id, RUNNING)
                return sb
            kind = "memory" if memory and info.kind == "memory" else "boot"
            t0 = time.perf_counter()
            try:
                if self._closed:
                    raise ManagerClosed("the sandbox manager is shutting down; no resumes")
                self._mark_inflight(sb.id)
                with self.admission.starting(sb.template, sb.build.machine.mem_mb):
                    restored = await self.suspender.resume(
                        sb.restored, info, memory=memory, egress=sb.egress, env_vars=sb.env_vars,
                        kill_with_owner=not self.vms_outlive)
            except BaseException as e:
                self._clear_inflight(sb.id)
                self._observe_suspend(SuspendEvent("resume", sb.template, kind, time.perf_counter() - t0, type(e).__name__,
                                                  reason=reason))
                raise
            now = time.time()
            left = info.timeout_left
            sb.restored, sb.pause_info, sb.paused = restored, None, False
            sb.end_at = max(now + left, now + seconds) if seconds is not None else now + left
            sb.pid_started_at = adopt.process_started_at(restored.vm.pid) or now
            sb.ports = {}  # forwards belonged to the VMM that is gone
            sb.answered_at = time.monotonic()
            write_network_state(sb.restored.workdir, sb.network_state())
            self.admission.add_running(sb.template)
            if self.store is not None:
                self.store.put(sb.record())
                self._clear_inflight(sb.id)
            self._watch_vm(sb)
            self._observe_suspend(SuspendEvent("resume", sb.template, kind, time.perf_counter() - t0, "ok", reason=reason))
            if self._closed:  # the manager closed while it resumed: it would outlive the server
                sb.ending = True
                await asyncio.shield(self._start_finish(sb, "shutdown"))
        return sb

    async def connect(self, sandbox_id: str, timeout_s: float, *, memory: bool = True) -> tuple[Sandbox, bool]:
        """E2B's connect: resume the sandbox if it is paused, and make it live at least ``timeout_s``
        more seconds (never shortened). (sandbox, whether it was resumed)."""
        sb = self.get(sandbox_id)
        seconds = check_timeout(timeout_s, self.config.orchestrator.max_timeout_s)
        resumed = False
        if sb.paused:
            try:
                await self.resume(sandbox_id, timeout_s=seconds, memory=memory)
                resumed = True
            except SandboxConflict:
                pass  # resumed by a concurrent call meanwhile
        sb = self.get(sandbox_id)
        if sb.paused:  # paused again by a concurrent call: its timeout is frozen, keep it
            return sb, resumed
        self._set_end(sb, extended_deadline(sb.end_at, seconds))
        return sb, resumed

    async def wake(self, sandbox_id: str) -> Sandbox:
        """Auto-resume: bring back a paused sandbox whose lifecycle says ``auto_resume``, for traffic
        that reached it. Concurrent callers share one resume, which completes even if they stop
        waiting. A running sandbox is returned as it is. Raises :class:`SandboxConflict` when it is
        paused without auto-resume, or without its memory (a resume boots it: its processes are gone,
        so traffic does not wake it), :class:`SandboxNotFound`, or the resume's error (it stays paused)."""
        sb = self.get(sandbox_id)
        if not sb.paused:
            return sb
        if not sb.lifecycle.auto_resume:
            raise SandboxConflict(f"sandbox {sandbox_id} is paused and was not created with auto-resume; resume "
                                  f"it with POST /sandboxes/{sandbox_id}/connect")
        if sb.pause_info is None or sb.pause_info.kind != "memory" or sb.pause_info.envd_unresponsive:
            raise SandboxConflict(f"sandbox {sandbox_id} is paused without its memory (a resume boots it), which "
                                  f"traffic does not wake; resume it with POST /sandboxes/{sandbox_id}/connect")
        task = self._waking.get(sandbox_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._wake(sandbox_id), name=f"wake-{sandbox_id}")
            self._waking[sandbox_id] = task
            task.add_done_callback(lambda _t: self._waking.pop(sandbox_id, None))
        return await asyncio.shield(task)

    async def _wake(self, sandbox_id: str) -> Sandbox:
        """Resume for traffic: it runs for at least its create's timeout (E2B's auto-resume), so a
        sandbox paused with a moment left does not end again at once."""
        log.info("sandbox %s: auto-resume for traffic that reached it", sandbox_id)
        try:
            return await self.resume(sandbox_id, timeout_s=self.get(sandbox_id).lifecycle.timeout_s or None,
                                     reason="traffic")
        except SandboxConflict:  # resumed by someone else meanwhile
            return self.get(sandbox_id)

    def _check_live(self, sb: Sandbox) -> None:
        if sb.ending or sb.id not in self._sandboxes:
            raise SandboxNotFound(sb.id, "it is being killed")

    def _watch_vm(self, sb: Sandbox) -> None:
        if sb.pause_info is None and (sb._watcher is None or sb._watcher.done()):
            sb._watcher = asyncio.get_running_loop().create_task(self._watch(sb), name=f"watch-{sb.id}")

    def _observe_suspend(self, event: SuspendEvent) -> None:
        for observer in self.suspend_observers:
            try:
                observer(event)
            except Exception:  # noqa: BLE001 - metrics must never break a pause
                log.exception("pause/resume observer failed")

    # -- memory -----------------------------------------------------------------------------

    async def reclaim(self, sandbox_id: str) -> Reclaimed:
        """Give back the memory a running sandbox holds in caches (see :mod:`.reclaim`).

        409 if it is paused or ending, or if its VMM does not take freed guest memory back.
        """
        sb = self.get(sandbox_id)
        if sb.paused or sb.ending:
            raise SandboxConflict(f"sandbox {sandbox_id} is {'paused' if sb.paused else 'ending'}; "
                                  "only a running sandbox can give memory back")
        if not self.restorer.driver(sb.build).free_page_reporting:
            raise SandboxConflict(f"sandbox {sandbox_id} runs on {sb.vmm_type}, whose guests do not give freed "
                                  "memory back to the host (free page reporting is set up with QEMU only)")
        sb.reclaimed_at = time.monotonic()  # also when it fails: a pass does not retry it at once
        result = await reclaim(sb)
        log.info("reclaimed %.1f MiB from sandbox %s in %.1f s", result.freed / MiB, sb.id, result.seconds)
        return result

    async def reclaim_for_memory(self, parallel: int = 8) -> int:
        """Reclaim the running sandboxes not reclaimed in the last ``RECLAIM_AGAIN_S``, for at most
        ``PASS_DEADLINE_S``; bytes freed. Called before a create is refused for memory; concurrent
        callers wait for one pass.
        """
        async with self._reclaiming:
            now = time.monotonic()
            due = [sb for sb in self._sandboxes.values()
                   if not sb.paused and not sb.ending and now - sb.reclaimed_at > RECLAIM_AGAIN_S
                   and self.restorer.driver(sb.build).free_page_reporting]
            if not due:
                return 0
            sem = asyncio.Semaphore(parallel)
            freed: list[int] = []

            async def one(sb: Sandbox) -> None:
                async with sem:
                    try:
                        freed.append((await self.reclaim(sb.id)).freed)
                    except Exception as e:  # noqa: BLE001 - a sandbox that ended or does not answer
                        log.info("could not reclaim memory of sandbox %s: %s", sb.id, e)

            tasks = [asyncio.ensure_future(one(sb)) for sb in due]
            _, late = await asyncio.wait(tasks, timeout=PASS_DEADLINE_S)
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            log.warning("memory was short: reclaimed %.0f MiB from %d of %d sandboxes",
                        sum(freed) / MiB, len(freed), len(due))
            return sum(freed)

    # -- ports ----------------------------------------------------------------------------

    async def port_endpoint(self, sandbox_id: str, port: int) -> AgentEndpoint:
        """Where the host reaches ``port`` inside the sandbox.

        The agent's port: the VM's agent endpoint (QEMU: the host port forwarded to it from the
        start; Firecracker, Cloud Hypervisor: the hybrid vsock socket). Any other port: a QEMU
        forward on 127.0.0.1 added on first use (``hostfwd_add``) and reused afterwards. VMs reached
        over vsock have no network device yet (no tap networking), so their other ports raise
        :class:`PortUnavailable`.
        """
        sb = self.get(sandbox_id)
        if sb.paused:
            raise SandboxConflict(f"sandbox {sandbox_id} is paused; resume it (POST /sandboxes/{sandbox_id}/resume)")
        if port == AGENT_PORT:
            return sb.agent_endpoint
        if not 1 <= port <= 65535:
            raise PortUnavailable(f"port {port} is not a TCP port (1-65535)")
        if sb.restored.slot is not None:
            return TcpEndpoint(sb.restored.slot.guest_address, port)  # DNAT to the guest in its namespace
        if port in sb.ports:
            return TcpEndpoint("127.0.0.1", sb.ports[port])
        if isinstance(sb.agent_endpoint, HybridVsockEndpoint):
            raise PortUnavailable(
                f"sandbox {sandbox_id} runs on {sb.vmm_type}, whose VMs have no network device yet (no tap "
                f"networking): only the agent's port {AGENT_PORT} is reachable, over vsock. To reach other ports, "
                f"use a template with vmm_type = \"qemu\""
            )
        forward = getattr(sb.restored.vm, "forward_port", None)
        if forward is None:
            raise PortUnavailable(f"the VMM of sandbox {sandbox_id} cannot forward ports at runtime")
        async with sb._port_lock:
            if port not in sb.ports:
                try:
                    sb.ports[port] = await forward(port)
                except Exception as e:  # noqa: BLE001 - reported to the client
                    raise PortUnavailable(f"cannot reach port {port} of sandbox {sandbox_id}: {e}") from e
                if self.store is not None and sb.id in self._sandboxes:
                    self.store.set_ports(sb.id, sb.ports)
        return TcpEndpoint("127.0.0.1", sb.ports[port])

    # -- kill and death -------------------------------------------------------------------

    async def kill(self, sandbox_id: str, *, reason: str = "killed") -> None:
        """Kill the sandbox's VM and remove its files (a paused one's saved state too). Raises
        :class:`SandboxNotFound`. Waits for a pause or resume in progress."""
        sb = self.get(sandbox_id)
        if sb.ending:
            await sb._ended.wait()
            return
        async with sb._state_lock:
            if sb.ending:
                await sb._ended.wait()
                return
            sb.ending = True
            await asyncio.shield(self._start_finish(sb, reason))
        log.info("sandbox %s ended: %s", sandbox_id, reason)

    def _start_finish(self, sb: Sandbox, reason: str) -> asyncio.Task[None]:
        """Forget the sandbox now; destroy it in a task that completes even if the caller is cancelled."""
        self._forget(sb, reason)
        task = asyncio.get_running_loop().create_task(self._destroy(sb), name=f"end-{sb.id}")
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
        return task

    def _forget(self, sb: Sandbox, reason: str) -> None:
        """At once: the sandbox is no longer running (listed as ended, its slot freed)."""
        self._sandboxes.pop(sb.id, None)
        if sb.pause_info is None:
            self.admission.remove_running(sb.template)
        rec = sb.record()
        now = time.time()
        rec.state, rec.end_reason, rec.ended_at = EXITED, reason, now
        rec.access_token, rec.env_vars = "", {}
        self._ended[sb.id] = rec
        if self.store is not None:
            try:
                self.store.mark_ended(sb.id, reason, now)
            except Exception as e:  # noqa: BLE001 - e.g. the data root full: ending it is what frees space
                log.warning("sandbox %s: its end could not be recorded in the state database (%s); it is ended "
                            "all the same (a restarted server finds it gone)", sb.id, e)
        self._prune_ended(now)

    async def _destroy(self, sb: Sandbox) -> None:
        """Kill the VM and remove the sandbox's files."""
        if sb.pause_info is None:
            with contextlib.suppress(Exception):
                self.admission.observe_cost(sb.template, sb.memory()[1])
        try:
            current = asyncio.current_task()
            if sb._watcher is not None and sb._watcher is not current:
                sb._watcher.cancel()
            await self.restorer.destroy(sb.restored)
        finally:
            sb._ended.set()
            self.snapshots.sandbox_ended()  # the snapshot it started from may be needed no more

    async def _watch(self, sb: Sandbox) -> None:
        """Wait for the VMM process to end; if nobody asked for it, the sandbox died."""
        try:
            code = await sb.restored.vm.wait_exit()
        except asyncio.CancelledError:
            return
        except Exception:  # noqa: BLE001
            log.exception("watching the VMM of sandbox %s failed", sb.id)
            return
        if sb.ending or sb.id not in self._sandboxes:
            return
        sb.ending = True
        detail = f"exit status {code}" if code not in (None, -1) else "exit status unknown"
        tail = sb.restored.vm.console_tail(5) if hasattr(sb.restored.vm, "console_tail") else ""
        log.warning("sandbox %s: its VMM (pid %d) exited on its own, %s; console: %s", sb.id, sb.pid, detail, tail)
        await asyncio.shield(self._start_finish(sb, f"died: {detail}"))

    # -- health -----------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        interval = self.config.orchestrator.health_check_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_health()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the next pass tries again
                log.exception("health check pass failed")

    async def check_health(self) -> list[str]:
        """One pass: ask the agent of every running sandbox ``/health``; end those whose agent has not
        answered for ``health_check_grace_s`` (their ids are returned). Paused sandboxes are skipped,
        and so is one whose state is changing (a pause, resume, snapshot or kill holds its state
        lock: its agent may be frozen on purpose); that counts as an answer.

        A hung guest is one sandbox's fault; many silent at once is the host's (measured: 200 TCG
        sandboxes on 2 cores, where agents took minutes to answer and the check ended 80 of them).
        So when more than :data:`HEALTH_OVERLOAD_SILENT` and more than a quarter of the probed
        sandboxes are silent in one pass, none is ended: the pass is logged as an overloaded host,
        and a guest that really hangs is ended at the first pass after the load passes."""
        orch = self.config.orchestrator
        timeout = min(orch.health_check_interval_s or HEALTH_PROBE_MAX_S, HEALTH_PROBE_MAX_S)
        sem = asyncio.Semaphore(HEALTH_PARALLEL)

        async def probe(sb: Sandbox) -> tuple[Sandbox, bool]:
            if not sb._state_lock.locked():
                async with sem:
                    answered = await self._probe(sb, timeout)
            else:
                answered = True
            if answered or sb._state_lock.locked():
                sb.answered_at = time.monotonic()
                return sb, True
            return sb, False

        probed = await asyncio.gather(*(probe(sb) for sb in list(self._sandboxes.values())
                                        if not sb.paused and not sb.ending))
        silent = [sb for sb, answered in probed if not answered]
        if len(silent) > HEALTH_OVERLOAD_SILENT and len(silent) * 4 > len(probed):
            log.warning("%d of %d sandboxes did not answer /health in %.0f s: the host is overloaded, not "
                        "that many guests hung; none is ended", len(silent), len(probed), timeout)
            return []
        ended: list[str] = []
        for sb in silent:
            quiet = time.monotonic() - sb.answered_at
            if quiet < orch.health_check_grace_s or sb.ending or sb.paused or sb.id not in self._sandboxes:
                log.info("sandbox %s: its agent did not answer /health (silent for %.0f s of %.0f s allowed)",
                         sb.id, quiet, orch.health_check_grace_s)
                continue
            log.warning("sandbox %s: its agent has not answered /health for %.0f s: ending it", sb.id, quiet)
            ended.append(sb.id)
            with contextlib.suppress(SandboxNotFound):
                await self.kill(sb.id, reason=f"unresponsive: its agent did not answer /health for {quiet:.0f} s")
        return ended

    @staticmethod
    async def _probe(sb: Sandbox, timeout: float) -> bool:
        try:
            async with AgentClient.for_endpoint(sb.agent_endpoint, timeout=timeout) as probe:
                return await asyncio.wait_for(probe.health(), timeout + 1)
        except Exception as e:  # noqa: BLE001 - any failure to answer is a missed health check
            log.debug("health probe of sandbox %s failed: %r", sb.id, e)
            return False

    # -- recovery after a restart ---------------------------------------------------------

    async def _recover(self) -> None:
        assert self.store is not None
        for rec in self.store.paused():
            try:
                sb = self._paused_from_record(rec)
            except Exception as e:  # noqa: BLE001
                log.warning("sandbox %s: paused, but cannot be taken back (%s); removing it", rec.id, e)
                self._cleanup_record(rec, f"lost_paused: {e}")
                continue
            self._sandboxes[sb.id] = sb
            self.recovered_paused.append(sb.id)
            log.info("sandbox %s: paused (%s), %.1f MiB stored, %.0f s of its timeout left", sb.id,
                     sb.pause_info.kind if sb.pause_info else "?",
                     (sb.pause_info.stored_bytes if sb.pause_info else 0) / MiB, sb.timeout_left)
        for rec in self.store.running():
            if not adopt.is_our_vmm(rec.pid, rec.pid_started_at, adopt.process_marker(rec.vmm_type, rec.id)):
                self._cleanup_record(rec, "died_while_down")
                continue
            try:
                sb = await self._adopt(rec)
            except Exception as e:  # noqa: BLE001
                log.warning("sandbox %s: cannot re-attach to its VM (pid %d): %s; killing it", rec.id, rec.pid, e)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(rec.pid, signal.SIGKILL)
                self._cleanup_record(rec, f"lost: {e}")
                continue
            self._register(sb)
            self.adopted.append(sb.id)
            log.info("sandbox %s adopted (%s pid %d, agent at %s, %.0f s left)", sb.id, rec.vmm_type, sb.pid,
                     sb.agent_endpoint.describe(), sb.timeout_left)
        self._sweep_orphans()

    @staticmethod
    def _build_of(rec: SandboxRecord) -> TemplateBuild:
        """The build a recorded sandbox was restored from, with the sandbox recorded (again) as its
        user: sandboxes of older versions had no entry, and prune keeps only builds in use."""
        path = Path(rec.build_path)
        build = TemplateBuild(path, TemplateManifest.model_validate_json((path / MANIFEST).read_text()))
        add_user(build, rec.id, Path(rec.workdir))
        return build

    async def _adopt(self, rec: SandboxRecord) -> Sandbox:
        build = self._build_of(rec)
        vmm = adopt.recorded_vmm(rec.vmm_type)
        if build.manifest.vmm_type != vmm.value:
            raise RuntimeError(
                f"it is recorded as a {vmm.value} VM but its template build {build.path} was made with "
                f"{build.manifest.vmm_type}"
            )
        workdir = Path(rec.workdir)
        net = read_network_state(workdir)
        slot: NetworkSlot | None = None
        if net.slot is not None:
            if self.network is None:
                raise RuntimeError(f"it runs in network slot {net.slot} but this server has no network namespaces")
            slot = await self.network.adopt(net.slot, net.egress)
        elif self.restorer.uses_slot(build):
            raise RuntimeError("it runs on QEMU user networking but this server runs sandboxes in network namespaces")
        try:
            spec = self.restorer.vm_spec(build, rec.id, workdir, kill_with_owner=False, slot=slot)
            vm = await adopt.attach(vmm, spec, rec.pid, rec.agent_port)
        except BaseException:
            if slot is not None:
                await slot.close_services()
            raise
        try:
            # A paused sandbox's agent cannot answer (its vCPUs are stopped): the VMM answering its
            # control socket (attach) is the check for it.
            if rec.state != PAUSED:
                async with AgentClient.for_endpoint(vm.agent_endpoint, timeout=ADOPT_HEALTH_TIMEOUT_S) as probe:
                    if not await probe.health():
                        raise RuntimeError(f"its agent does not answer /health at {vm.agent_endpoint.describe()}")
        except BaseException:
            await adopt.release(vm)
            if slot is not None:
                await slot.close_services()
            raise
        restored = RestoredVm(
            sandbox_id=rec.id, build=build, vm=vm, agent=AgentClient.for_endpoint(vm.agent_endpoint, access_token=rec.access_token),
            access_token=rec.access_token, workdir=workdir, slot=slot, times=dict(rec.start_times), source="adopted",
        )
        return Sandbox(
            restored, template=rec.template, created_at=rec.created_at, metadata=dict(rec.metadata),
            env_vars=dict(rec.env_vars), end_at=rec.end_at, pid_started_at=rec.pid_started_at, adopted=True,
            ports=dict(rec.ports), paused=rec.state == PAUSED, egress=net.egress,
            allow_public_traffic=net.allow_public_traffic, traffic_access_token=net.traffic_access_token,
            allow_internet_access=net.allow_internet_access, mask_request_host=net.mask_request_host,
            lifecycle=LifecyclePolicy.from_json(rec.lifecycle),
        )

    def _paused_from_record(self, rec: SandboxRecord) -> Sandbox:
        """A sandbox paused to disk, from its record: no process to adopt, its files checked."""
        build = self._build_of(rec)
        info = PauseInfo.from_json(rec.pause)
        workdir = Path(rec.workdir)
        missing = stored_files_present(workdir, info)
        if missing:
            raise RuntimeError(missing)
        net = read_network_state(workdir)
        spec = self.restorer.vm_spec(build, rec.id, workdir, kill_with_owner=False)
        endpoint = TcpEndpoint(spec.guest_address or "127.0.0.1", rec.agent_port or AGENT_PORT)
        vm = StoppedVm(spec, endpoint, rec.agent_port)
        restored = RestoredVm(
            sandbox_id=rec.id, build=build, vm=vm, agent=AgentClient.for_endpoint(endpoint, access_token=rec.access_token),
            access_token=rec.access_token, workdir=workdir, slot=None, times=dict(rec.start_times), source="paused",
        )
        return Sandbox(
            restored, template=rec.template, created_at=rec.created_at, metadata=dict(rec.metadata),
            env_vars=dict(rec.env_vars), end_at=rec.end_at, pid_started_at=0.0, adopted=True, ports={},
            paused=True, pause_info=info, egress=net.egress, allow_public_traffic=net.allow_public_traffic,
            traffic_access_token=net.traffic_access_token, allow_internet_access=net.allow_internet_access,
            mask_request_host=net.mask_request_host, lifecycle=LifecyclePolicy.from_json(rec.lifecycle),
        )

    def _cleanup_record(self, rec: SandboxRecord, reason: str) -> None:
        shutil.rmtree(rec.workdir, ignore_errors=True)
        assert self.store is not None
        now = time.time()
        self.store.mark_ended(rec.id, reason, now)
        rec.state, rec.end_reason, rec.ended_at = EXITED, reason, now
        self._ended[rec.id] = rec
        self._prune_ended(now)
        self.cleaned.append(rec.id)
        log.info("sandbox %s: %s; its files were removed", rec.id, describe_end(reason, None))

    def _sweep_orphans(self) -> None:
        """Remove sandbox directories nobody owns: not in the state, VMM gone, not recent."""
        known = {r.id for r in self.store.all()} if self.store is not None else set()
        now = time.time()
        try:
            entries = list(self.data_root.sandboxes.iterdir())
        except OSError:
            return
        for d in entries:
            if d.name in known or d.name in self._sandboxes:
                continue
            try:
                age = now - d.stat().st_mtime
                pid_text = (d / "vm" / "vmm.pid").read_text().strip()
            except FileNotFoundError:
                pid_text = ""
                age = now - d.stat().st_mtime if d.exists() else 0
            except OSError:
                continue
            if age < ORPHAN_MIN_AGE_S:
                continue
            if pid_text.isdigit() and pid_alive(int(pid_text)):
                continue
            shutil.rmtree(d, ignore_errors=True)
            log.info("removed orphaned sandbox directory %s", d)
