"""Pools: VMs made ahead of creates, so a create does only what cannot be done earlier.

One :class:`TemplatePool` per pooled template holds two tiers (see :class:`trenvx.config.PoolConfig`):

- **warm** items: a VMM process waiting for the snapshot, its QMP connected, its disk overlay
  made (:meth:`SnapshotRestore.prepare`);
- **hot** items: a warm item that was also started (snapshot loaded, resumed) and warmed up: its
  agent answered and ``hot_warmup_cmd`` ran once, so the guest code of the request path is
  already translated (TCG) and paged in; then paused (vCPU stopped) until taken, so that idle
  pooled VMs cost no CPU.

:meth:`TemplatePool.take` hands out the best item at once or ``None``: a create never waits for a
refill. A background task refills each tier to ``clamp(min, recent demand, max)``, one batch of
``refill_parallelism`` at a time, and only while the host keeps its memory headroom. Items of a
build that is no longer the template's current one, and items whose VMM died, are discarded.

Every pooled VM has an owner: the pool kills it on :meth:`TemplatePool.close`, and a file
``pooled`` in its sandbox directory marks it so that a server restarting after a crash kills
what a previous pool left (:func:`reap_stale_pooled`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import INTERPRETER_PORT, PoolConfig
from ..guest.client import AgentClient
from ..layout import DataRoot
from ..template.store import TemplateBuild, TemplateNotFound, TemplateStore
from ..vmm.base import Vm
from ..vmm.jail import set_background
from ..vmm.process import set_priority
from . import adopt, inflight
from .restore import PreparedVm, SnapshotRestore, new_sandbox_id

log = logging.getLogger(__name__)

Tier = Literal["warm", "hot"]
POOLED_MARKER = inflight.POOLED_MARKER
HOT_HEALTH_TIMEOUT_S = 30.0
WARMUP_TIMEOUT_S = 60.0
RETRY_AFTER_FAILURE_S = 5.0
REFILL_DELAY_S = 0.1
REFILL_NICE = 10
"""Pooled VMs are made (and hot ones warmed up) at this ``nice``: under load, creates come first.
Measured: with refills at normal priority, hot creates during a sequential run took 84 ms at p50
instead of ~30 ms."""


INTERPRETER_WARMUP_CELL = (
    "exec('from IPython.display import display\\ndisplay(1 + 1)\\n"
    "import matplotlib.pyplot as plt\\nplt.figure(figsize=(1, 1)); plt.plot([0, 1]); plt.show()', {})"
)
"""What a hot code-interpreter VM runs once, as a silent cell (no execution count, no history):
a result through IPython's formatters and a small matplotlib figure through the inline backend, in
a namespace of its own (the user's gets no names). A silent ``1+1`` alone left a pooled sandbox's
first ``run_code`` ~100 ms slower and its first chart ~0.5 s slower under TCG: the display and
plotting paths were not yet translated."""
INTERPRETER_WARMUP = (
    "python3 -c " + shlex.quote(
        "import json, urllib.request as u; "
        f"u.urlopen(u.Request('http://127.0.0.1:{INTERPRETER_PORT}/execute', "
        f"data=json.dumps({{'code': {INTERPRETER_WARMUP_CELL!r}, 'silent': True}}).encode(), "
        "headers={'Content-Type': 'application/json'}), timeout=60).read()")
)
"""The command that sends :data:`INTERPRETER_WARMUP_CELL` to the interpreter, inside the guest."""


@dataclass(eq=False)
class PooledVm:
    """A VM made ahead of a create. ``prepared`` carries the VMM, the sandbox directory and stage times."""

    build: TemplateBuild
    sandbox_id: str
    prepared: PreparedVm
    tier: Tier
    restorer: SnapshotRestore
    made_at: float = field(default_factory=time.monotonic)

    @property
    def vm(self):  # noqa: ANN201 - trenvx.vmm.Vm
        return self.prepared.vm

    @property
    def workdir(self) -> Path:
        return self.prepared.workdir

    def mark(self) -> None:
        """Write the ``pooled`` marker (pid and start time), so a crashed server's successor can reap it."""
        started = adopt.process_started_at(self.vm.pid) or 0.0
        (self.workdir / POOLED_MARKER).write_text(json.dumps({"pid": self.vm.pid, "started_at": started}))

    def unmark(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.workdir / POOLED_MARKER).unlink()

    async def discard(self) -> None:
        try:
            await self.restorer.discard(self.prepared)
        finally:
            inflight.clear(self.restorer.data_root.run, self.sandbox_id)


@dataclass
class PoolStats:
    template: str
    warm: int
    hot: int
    target_warm: int
    target_hot: int
    hits: dict[str, int]
    misses: int
    made: dict[str, int]
    discarded: int
    failures: int


class TemplatePool:
    """The warm and hot VMs of one template, and the task that refills them."""

    def __init__(
        self,
        name: str,
        restorer: SnapshotRestore,
        templates: TemplateStore,
        config: PoolConfig,
        *,
        has_room: Callable[[int], bool],
        kill_with_owner: bool = True,
        track_inflight: bool = False,
    ) -> None:
        self.name = name
        self.restorer = restorer
        self.templates = templates
        self.config = config
        self.has_room = has_room
        """``has_room(mem_mb)``: may one more VM of ``mem_mb`` start without eating the headroom?"""
        self.kill_with_owner = kill_with_owner
        self.track_inflight = track_inflight
        """Each pooled VM has an :mod:`.inflight` file until a create records it as a sandbox (or it is
        discarded): its VMM outlives this process (``kill_with_owner`` False), so a successor must
        find it if this process dies first."""
        self.items: dict[Tier, collections.deque[PooledVm]] = {"warm": collections.deque(), "hot": collections.deque()}
        self._making: dict[Tier, int] = {"warm": 0, "hot": 0}
        self._demand: collections.deque[float] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.hits: dict[str, int] = {"warm": 0, "hot": 0}
        self.misses = 0
        self.made: dict[str, int] = {"warm": 0, "hot": 0}
        self.discarded = 0
        self.failures = 0
        self._last_failure = 0.0
        self._orphans: set[asyncio.Task[None]] = set()
        self._last_take = 0.0

    # -- the create path ------------------------------------------------------------------

    def take(self, build: TemplateBuild) -> PooledVm | None:
        """The best ready item of ``build`` (hot, else warm), or None. Never waits."""
        self._note_demand()
        for tier in ("hot", "warm"):
            q = self.items[tier]  # type: ignore[index]
            while q:
                item = q.popleft()
                if item.build.path != build.path or not item.vm.is_alive():
                    self._discard_later(item)
                    continue
                item.unmark()
                self._set_refill_priority(item.vm, False)
                self.hits[tier] += 1
                self._last_take = time.monotonic()
                self._wake.set()
                return item
        self.misses += 1
        self._last_take = time.monotonic()
        self._wake.set()
        return None

    def _set_refill_priority(self, vm: Vm, background: bool) -> None:
        """A VM being made or kept for the pool runs at ``refill_priority``; a taken one at normal."""
        policy = self.config.refill_priority
        if policy == "idle":
            set_background(vm, background)
        elif policy == "nice":
            set_priority(vm.pid, REFILL_NICE if background else 0)

    def _note_demand(self) -> None:
        now = time.monotonic()
        self._demand.append(now)
        self._trim_demand(now)

    def _trim_demand(self, now: float) -> None:
        while self._demand and self._demand[0] < now - self.config.demand_window_s:
            self._demand.popleft()

    def targets(self) -> tuple[int, int]:
        """(warm, hot) sizes to refill to: recent demand, within [min, max] of each tier."""
        self._trim_demand(time.monotonic())
        demand = len(self._demand)
        c = self.config
        hot = min(max(c.hot_min, demand), c.hot_max)
        warm = min(max(c.warm_min, demand), c.warm_max)
        return warm, hot

    # -- refilling ------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"pool-{self.name}")

    async def _run(self) -> None:
        while not self._closed:
            try:
                # Let a create that just took an item have the CPU for its own few milliseconds
                # first: on a 2-core host a refill started at once (QEMU start-up, disk) slowed the
                # create it replaces by ~10 ms.
                while time.monotonic() - self._last_take < REFILL_DELAY_S:
                    await asyncio.sleep(REFILL_DELAY_S)
                await self._refill_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a refill failure must not end the pool
                log.exception("pool %s: refill failed", self.name)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            self._wake.clear()

    def _current(self) -> TemplateBuild | None:
        try:
            return self.templates.current(self.name)
        except TemplateNotFound:
            return None

    async def _refill_once(self) -> None:
        build = self._current()
        await self._drop_stale(build)
        if build is None or self._closed:
            return
        if self._last_failure and time.monotonic() - self._last_failure < RETRY_AFTER_FAILURE_S:
            return
        warm_target, hot_target = self.targets()
        await self._shrink({"warm": warm_target, "hot": hot_target})
        mem_mb = build.machine.mem_mb
        while not self._closed:
            want_hot = hot_target - len(self.items["hot"]) - self._making["hot"]
            want_warm = warm_target - len(self.items["warm"]) - self._making["warm"]
            if want_hot <= 0 and want_warm <= 0:
                return
            batch: list[Tier] = []
            for tier, want in (("hot", want_hot), ("warm", want_warm)):
                batch += [tier] * max(0, want)  # type: ignore[list-item]
            batch = batch[: self.config.refill_parallelism]
            batch = [t for i, t in enumerate(batch) if self.has_room(mem_mb * (i + 1))]
            if not batch:
                return  # no memory to spare: the pool stays as it is until some is freed
            results = await asyncio.gather(*(self._make(build, t) for t in batch), return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    self.failures += 1
                    self._last_failure = time.monotonic()
                    log.warning("pool %s: cannot make a pooled VM: %s", self.name, r)
                    return
            if self._current() is None or self._current().path != build.path:  # type: ignore[union-attr]
                return

    async def _make(self, build: TemplateBuild, tier: Tier) -> None:
        self._making[tier] += 1
        try:
            sid = new_sandbox_id()
            if self.track_inflight:
                inflight.mark(self.restorer.data_root.run, sid)
            try:
                prepared = await self.restorer.prepare(build, sid, kill_with_owner=self.kill_with_owner)
            except BaseException:
                inflight.clear(self.restorer.data_root.run, sid)
                raise
            self._set_refill_priority(prepared.vm, True)
            item = PooledVm(build, sid, prepared, "warm", self.restorer)
            try:
                item.mark()
                if tier == "hot":
                    await self._heat(item)
            except BaseException:
                await item.discard()
                raise
            if self._closed:
                await item.discard()
                return
            self.items[tier].append(item)
            self.made[tier] += 1
        finally:
            self._making[tier] -= 1

    async def _heat(self, item: PooledVm) -> None:
        """Restore and resume a warm item, then run the request path once so it is translated."""
        await self.restorer.start(item.build, item.prepared)
        item.tier = "hot"
        async with AgentClient.for_endpoint(item.vm.agent_endpoint, timeout=HOT_HEALTH_TIMEOUT_S) as agent:
            await agent.wait_healthy(HOT_HEALTH_TIMEOUT_S)
            # The init path once, without a token: the create's real /init then runs translated code.
            await agent.init(sandbox_id=item.sandbox_id, env_vars={}, access_token=None, hostname=item.sandbox_id)
            if self.config.hot_warmup_cmd:
                res = await asyncio.wait_for(agent.run(self.config.hot_warmup_cmd), WARMUP_TIMEOUT_S)
                if res.exit_code != 0:
                    raise RuntimeError(
                        f"pool.hot_warmup_cmd {self.config.hot_warmup_cmd!r} exited with {res.exit_code}: "
                        f"{res.stderr[-300:].decode(errors='replace')}"
                    )
            if item.build.manifest.config.get("code_interpreter"):
                res = await asyncio.wait_for(agent.run(INTERPRETER_WARMUP, user="root"), WARMUP_TIMEOUT_S)
                if res.exit_code != 0:
                    raise RuntimeError(f"the code interpreter's warm-up cell failed (exit {res.exit_code}): "
                                       f"{res.stderr[-300:].decode(errors='replace')}")
            await agent.health()
        # Paused while it waits: an idle guest under TCG still costs ~5% of a core (timer ticks,
        # the agent's polls), which 100 pooled VMs turned into a saturated host. Resuming takes ~1 ms
        # and keeps the translated code.
        await item.vm.pause()

    async def _shrink(self, targets: dict[Tier, int]) -> None:
        """Demand fell: discard the oldest items above each tier's target (they only hold memory)."""
        extra: list[PooledVm] = []
        for tier, target in targets.items():
            q = self.items[tier]
            while len(q) > target:
                extra.append(q.popleft())
        if extra:
            self.discarded += len(extra)
            await asyncio.gather(*(i.discard() for i in extra), return_exceptions=True)

    async def _drop_stale(self, build: TemplateBuild | None) -> None:
        stale: list[PooledVm] = []
        for q in self.items.values():
            keep = [i for i in q if build is not None and i.build.path == build.path and i.vm.is_alive()]
            stale += [i for i in q if i not in keep]
            q.clear()
            q.extend(keep)
        if stale:
            log.info("pool %s: discarding %d VMs (template rebuilt or VMM exited)", self.name, len(stale))
            self.discarded += len(stale)
            await asyncio.gather(*(i.discard() for i in stale), return_exceptions=True)

    def _discard_later(self, item: PooledVm) -> None:
        self.discarded += 1
        task = asyncio.get_running_loop().create_task(item.discard())
        self._orphans.add(task)
        task.add_done_callback(self._orphans.discard)

    # -- stop -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop refilling; kill every pooled VM and remove its files."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        items = [i for q in self.items.values() for i in q]
        for q in self.items.values():
            q.clear()
        await asyncio.gather(*(i.discard() for i in items), return_exceptions=True)
        if self._orphans:
            await asyncio.gather(*list(self._orphans), return_exceptions=True)

    def stats(self) -> PoolStats:
        warm, hot = self.targets()
        return PoolStats(
            template=self.name, warm=len(self.items["warm"]), hot=len(self.items["hot"]), target_warm=warm,
            target_hot=hot, hits=dict(self.hits), misses=self.misses, made=dict(self.made),
            discarded=self.discarded, failures=self.failures,
        )


def reap_stale_pooled(data_root: DataRoot) -> list[str]:
    """Kill the VMs and remove the directories that a previous server's pools left (after a crash).

    Run before this server makes pools of its own: every ``pooled`` marker found then is stale.
    """
    removed: list[str] = []
    for d, pid, started in inflight.pooled_vms(data_root.sandboxes):
        if pid and adopt.is_our_vmm(pid, started, f"trenvx-{d.name}"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d.name)
    if removed:
        log.info("removed %d pooled VMs left by a previous server", len(removed))
    return removed


__all__ = ["POOLED_MARKER", "PoolStats", "PooledVm", "TemplatePool", "reap_stale_pooled"]
