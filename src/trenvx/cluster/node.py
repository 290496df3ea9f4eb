"""This node in a cluster: its registration under a lease, its sandboxes' entries, what it knows of
the other nodes, and where a sandbox lives.

- **Registration.** :meth:`ClusterNode.start` grants a lease of ``lease_ttl_s`` and puts the node's
  record under it; a task renews the lease every third of the TTL and rewrites the record when its
  capacity, templates or pools change. A node whose process dies stops renewing: its record goes
  with its lease, and every node then reports its sandboxes lost. A renewal that finds the lease
  gone (etcd was unreachable for longer than the TTL) registers again.
- **Entries.** The node writes an entry for each sandbox it runs or keeps paused, when it changes
  (:meth:`sync`: after every API call that changed one, and every refresh), and marks it exited
  when it ends; exited entries are deleted after ``ended_retention_s``.
- **Reconciling.** At start, and after registering again, entries of this node whose sandbox is
  gone are marked exited, and sandboxes the cluster ended meanwhile (killed through another node
  while this one was away) are killed.
- **Without etcd** the node goes on: its sandboxes run and are reachable on it; what needs the
  cluster (placement, lookups of other nodes' sandboxes, cluster-wide lists) raises
  :class:`ClusterUnavailable` (the API's 503), and registration is retried by the refresh task.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import Config
from .etcd import EtcdClient, EtcdError, parse_etcd_url
from ..sandbox.handover import PausedHandover
from ..template.store import TemplateNotFound
from .records import LOST_REASON, KeyLayout, NodeCapacity, NodeRecord, SandboxEntry
from .template_copy import TemplateCopier, TemplateCopyError
from .watched import WatchedPrefix

if TYPE_CHECKING:
    from ..sandbox.manager import Sandbox, SandboxManager
    from ..sandbox.state import SandboxRecord

log = logging.getLogger(__name__)

SECRET_ENV = "TRENVX_CLUSTER_SECRET"
SERVER_STOPPED = "server_stopped"
"""The end reason written for a stopping node's sandboxes (unless it keeps them)."""
OWNER_CACHE_S = 5.0
"""How long where a sandbox lives is remembered (ids do not move but on a resume elsewhere)."""
COPY_RETRY_S = 60.0
"""A template whose background copy failed is tried again after this."""
NODES_MAX_AGE_S = 1.0
"""Placement reads the node records again when what it holds is older than this."""


class ClusterUnavailable(RuntimeError):
    """etcd cannot be reached: what needs the cluster cannot be done now (the API's 503)."""


@dataclass
class Location:
    """Where a sandbox of the cluster is: its entry and its node (None: the node is dead)."""

    entry: SandboxEntry
    node: NodeRecord | None


def cluster_secret(config: Config) -> str:
    """What nodes prove to each other on internal requests: ``TRENVX_CLUSTER_SECRET``, else
    ``[cluster] secret``, else one derived from the API key; empty without any (loopback only)."""
    env = os.environ.get(SECRET_ENV, "").strip()
    if env:
        return env
    if config.cluster.secret:
        return config.cluster.secret
    key = config.orchestrator.api_key
    return hashlib.sha256(f"trenvx-cluster\0{key}".encode()).hexdigest() if key else ""


def node_name(config: Config) -> str:
    return config.cluster.name or f"{socket.gethostname()}-{config.orchestrator.port}"


def advertise_url(config: Config) -> str:
    if config.cluster.advertise_url:
        return config.cluster.advertise_url.rstrip("/")
    host = config.orchestrator.host
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{config.orchestrator.port}"


class ClusterNode:
    """This node's part in the cluster (see the module's text).

    ``describe(sandbox)`` and ``describe_ended(record)`` give a sandbox as the node's own list shows
    it (the server's E2B shape): the cluster stores it in the sandbox's entry and never reads into it
    but for ``state``, ``endAt`` and ``trenvx``."""

    def __init__(self, config: Config, manager: "SandboxManager", *,
                 describe: Callable[["Sandbox"], dict[str, Any]],
                 describe_ended: Callable[["SandboxRecord"], dict[str, Any]],
                 etcd: EtcdClient | None = None, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.cfg = config.cluster
        self.manager = manager
        self.describe = describe
        self.describe_ended = describe_ended
        self.etcd = etcd or EtcdClient(parse_etcd_url(self.cfg.etcd), timeout_s=self.cfg.etcd_timeout_s)
        self.clock = clock
        self.name = node_name(config)
        self.url = advertise_url(config)
        self.secret = cluster_secret(config)
        self.keys = KeyLayout(self.cfg.prefix)
        self.started_at = clock()
        self.accepting = True
        self.lease = 0
        self.registered = False
        self.etcd_ok = False
        """Whether etcd answered the last refresh (while not, nothing is placed on what was read before)."""
        self._record_json = ""
        self._nodes_at = 0.0
        self._nodes_read: dict[str, NodeRecord] = {}
        """The node records as last read (used while the watch of them is down)."""
        self._node_watch = WatchedPrefix(self.etcd, self.keys.nodes, NodeRecord.model_validate_json, "node records")
        """The node records, followed: each node reads each change once, instead of every record
        every second (which grows with the square of the nodes: 6 MB/s of etcd reads at 100 nodes,
        measured). A dead node's record goes with its lease, and the watch sees it."""
        self._written: dict[str, str] = {}
        """Sandbox id -> the entry this node last wrote for it (JSON)."""
        self._fingerprints: dict[str, tuple[Any, ...]] = {}
        """Sandbox id -> what its entry last showed of it that can change (see :meth:`sync`)."""
        self._exited: dict[str, float] = {}
        """Sandbox id -> when it ended, for entries written as exited (deleted after the retention)."""
        self._located: dict[str, tuple[Location, float]] = {}
        self._sync_lock = asyncio.Lock()
        self._entry_watch = WatchedPrefix(self.etcd, self.keys.sandboxes, SandboxEntry.model_validate_json,
                                          "sandbox entries")
        """Every sandbox entry, followed (lists read it; see :meth:`entries`)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._copying: asyncio.Task[None] | None = None
        self._copy_failed: dict[str, float] = {}
        """Template -> when its last background copy failed (``time.monotonic()``)."""
        self.handover = PausedHandover(manager)
        """This node's paused sandboxes handed to other nodes (:mod:`trenvx.sandbox.handover`)."""
        self.copier = TemplateCopier(manager.templates, manager.data_root, self.internal_headers(),
                                     keep_builds=manager.config.template_manager.keep_builds)

    def internal_headers(self) -> dict[str, str]:
        """What this node sends on requests to other nodes (see :mod:`trenvx.server.cluster_routing`)."""
        headers = {"X-Trenvx-Node": self.name, "X-Trenvx-Cluster": self.secret}
        if self.config.orchestrator.api_key:  # the nodes of a cluster share the API key
            headers["X-API-Key"] = self.config.orchestrator.api_key
        return headers

    @property
    def _nodes(self) -> dict[str, NodeRecord]:
        """The live nodes' records: the watched copy while the watch runs, else as last read."""
        watched = self._node_watch.items
        return watched if watched is not None else self._nodes_read

    # -- life -------------------------------------------------------------------------------------

    @property
    def renew_every_s(self) -> float:
        return max(0.5, self.cfg.lease_ttl_s / 3)

    async def start(self) -> None:
        """Register, reconcile, start renewing. etcd being down does not stop the node: it
        registers when etcd answers again."""
        try:
            await self._register()
            await self.reconcile()
            await self.sync()
            await self.refresh_nodes()
        except EtcdError as e:
            log.warning("cluster: etcd cannot be reached (%s); this node serves its own sandboxes and registers "
                        "when etcd answers", e)
        self._tasks.append(asyncio.create_task(self._renew_loop(), name="cluster-renew"))
        self._tasks.append(asyncio.create_task(self._refresh_loop(), name="cluster-refresh"))
        self._tasks.append(asyncio.create_task(self._entry_watch.run(), name="cluster-watch-entries"))
        self._tasks.append(asyncio.create_task(self._node_watch.run(), name="cluster-watch-nodes"))

    def stop_accepting(self) -> None:
        """No new creates are placed here (the node is stopping); written with the next refresh."""
        self.accepting = False

    async def close(self) -> None:
        """Write the last state of the node's sandboxes, then leave: the lease is revoked, so the node
        is gone from the cluster at once (not a TTL later)."""
        if self._closed:
            return
        self._closed = True
        if self._copying is not None:
            self._tasks.append(self._copying)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        with contextlib.suppress(EtcdError):
            if not self.manager.keep:
                await self._end_all(SERVER_STOPPED)
            if self.lease:
                await self.etcd.revoke(self.lease)
        await self.etcd.aclose()

    async def _end_all(self, reason: str) -> None:
        """The node stopped and its sandboxes with it (the manager is closed: its records are not
        read again): every entry it wrote that is not exited says so now. With ``keep`` nothing is
        written: the sandboxes run on, reported lost until the node is back and registers them."""
        now = self.clock()
        for sid in list(self._written):
            kv = await self.etcd.get(self.keys.sandbox(sid))
            if kv is None:
                continue
            entry = SandboxEntry.model_validate_json(kv.value)
            if entry.state == "exited" or entry.node != self.name:
                continue
            await self.etcd.put(kv.key, entry.model_copy(update={
                "state": "exited", "end_reason": reason, "ended_at": now, "updated_at": now,
                "info": {**entry.info, "state": "exited"}}).model_dump_json())

    async def _register(self) -> None:
        self.lease = await self.etcd.grant(self.cfg.lease_ttl_s)
        self._record_json = ""
        await self._put_record()
        self.registered = True
        log.info("cluster: node %s (%s) registered under lease %x (TTL %d s)", self.name, self.url, self.lease,
                 self.cfg.lease_ttl_s)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.renew_every_s)
            try:
                if not self.registered or not self.lease:
                    await self._register()
                    await self.reconcile()
                    continue
                if await self.etcd.keepalive(self.lease) <= 0:
                    log.warning("cluster: the lease of node %s expired (etcd was out of reach for longer than %d s); "
                                "registering again", self.name, self.cfg.lease_ttl_s)
                    self.registered = False
                    await self._register()
                    await self.reconcile()
            except EtcdError as e:
                log.warning("cluster: renewing node %s failed: %s", self.name, e)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must go on
                log.exception("cluster: renewing node %s failed", self.name)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.renew_every_s))
            try:
                if self.registered:
                    await self._put_record()
                    await self.sync()
                    if self._node_watch.items is None:
                        await self.refresh_nodes()
                    self.etcd_ok = True
                    self._copy_missing_templates()
            except EtcdError as e:
                self.etcd_ok = False
                log.debug("cluster: refresh failed: %s", e)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("cluster: refresh failed")

    # -- this node's record -------------------------------------------------------------------------

    def record(self) -> NodeRecord:
        m = self.manager
        templates: dict[str, str] = {}
        builds: dict[str, str] = {}
        aliases: dict[str, str] = {}
        snapshots: list[str] = []
        for name in m.templates.names():
            with contextlib.suppress(Exception):
                manifest = m.templates.current(name).manifest
                if manifest.snapshot is not None:
                    if not manifest.snapshot.ephemeral:
                        snapshots.append(name)
                else:
                    templates[name] = manifest.input_digest
                    builds[name] = manifest.build_id
                    for alias in manifest.config.get("aliases") or []:
                        aliases[str(alias)] = name
        pools = {s.template: s.warm + s.hot for s in m.pool_stats()}
        import psutil

        return NodeRecord(
            name=self.name, url=self.url, started_at=self.started_at, updated_at=self.clock(),
            capacity=NodeCapacity(
                cpus=os.cpu_count() or 1, mem_total_mb=psutil.virtual_memory().total >> 20,
                mem_headroom_mb=m.admission.headroom_mb(), sandboxes=m.admission.total,
                max_sandboxes=m.config.orchestrator.max_sandboxes,
            ),
            templates=templates, builds=builds, aliases=aliases, snapshots=snapshots, pools=pools,
            accepting=self.accepting,
        )

    async def _put_record(self) -> None:
        rec = self.record()
        # Rewritten when something placement weighs changed (memory in 64 MiB steps), not each second.
        key = rec.model_copy(update={"updated_at": 0.0, "capacity": rec.capacity.model_copy(update={
            "mem_headroom_mb": rec.capacity.mem_headroom_mb // 64})}).model_dump_json()
        if key == self._record_json:
            return
        await self.etcd.put(self.keys.node(self.name), rec.model_dump_json(), lease=self.lease)
        self._record_json = key
        self._nodes[self.name] = rec

    # -- the other nodes ----------------------------------------------------------------------------

    async def refresh_nodes(self) -> dict[str, NodeRecord]:
        kvs = await self.etcd.range(self.keys.nodes)
        nodes: dict[str, NodeRecord] = {}
        for kv in kvs:
            try:
                n = NodeRecord.model_validate_json(kv.value)
            except ValueError:
                log.warning("cluster: ignoring a node record that does not parse: %s", kv.key)
                continue
            nodes[n.name] = n
        self._nodes_read, self._nodes_at = nodes, time.monotonic()
        return nodes

    async def live_nodes(self, max_age_s: float = NODES_MAX_AGE_S) -> dict[str, NodeRecord]:
        """The nodes whose lease is alive: the watched copy while the watch runs (a record comes
        and goes with its node's lease, and the watch sees it), else read again when older than
        ``max_age_s`` (0: read now). Raises :class:`ClusterUnavailable`."""
        if self._node_watch.items is not None and self.etcd_ok and max_age_s > 0:
            return self._nodes
        if time.monotonic() - self._nodes_at > max_age_s or not self.etcd_ok:
            try:
                await self.refresh_nodes()
                self.etcd_ok = True
            except EtcdError as e:
                self.etcd_ok = False
                raise ClusterUnavailable(f"the cluster's store (etcd) cannot be reached: {e}") from None
        return self._nodes

    async def check_store(self) -> None:
        """One small read: etcd answers now (a create is placed only where it can be recorded).
        Raises :class:`ClusterUnavailable`."""
        try:
            await self.etcd.get(self.keys.node(self.name))
            self.etcd_ok = True
        except EtcdError as e:
            self.etcd_ok = False
            raise ClusterUnavailable(f"the cluster's store (etcd) cannot be reached: {e}") from None

    def note_placed(self, name: str, mem_mb: int) -> None:
        """A create was placed on node ``name``: until its record is read again, count the sandbox
        in what this node knows of it, so a burst through one node spreads before records catch up."""
        n = self._nodes.get(name)
        if n is None:
            return
        cap = n.capacity.model_copy(update={"mem_headroom_mb": max(0, n.capacity.mem_headroom_mb - mem_mb),
                                            "sandboxes": n.capacity.sandboxes + 1})
        self._nodes[name] = n.model_copy(update={"capacity": cap})

    # -- sandboxes' entries ---------------------------------------------------------------------------

    def _entry_of(self, sb: "Sandbox") -> SandboxEntry:
        info = _stable(self.describe(sb))
        return SandboxEntry(id=sb.id, node=self.name, template=sb.template, state=sb.state,
                            created_at=sb.created_at, metadata=dict(sb.metadata), info=info)

    def _entry_of_ended(self, rec: "SandboxRecord") -> SandboxEntry:
        return SandboxEntry(id=rec.id, node=self.name, template=rec.template, state="exited",
                            created_at=rec.created_at, metadata=dict(rec.metadata),
                            info=_stable(self.describe_ended(rec)), end_reason=rec.end_reason,
                            ended_at=rec.ended_at)

    async def sync(self, full: bool = True, touched: str = "") -> int:
        """Write the entries of this node's sandboxes that changed since the last write; returns how
        many were written. Raises :class:`EtcdError`.

        Cheap when little changed (it runs every second, and after every API call): a sandbox is
        described again only when what its entry shows of it may have changed (state, deadline,
        VMM, pause), and the ended ones are read from the manager only when a sandbox left. Not
        ``full`` (after an API call): only the sandbox ``touched``, new ones and gone ones are
        looked at, so a call costs the same with 10 or 3,000 sandboxes here (the refresh, every
        second, looks at all of them)."""
        async with self._sync_lock:
            now = self.clock()
            local = {sb.id: sb for sb in self.manager.list()}
            written = 0
            if full:
                looked_at = local
            else:
                looked_at = {sid: sb for sid, sb in local.items() if sid == touched or sid not in self._written}
            for sid, sb in looked_at.items():
                fingerprint = (sb.state, sb.shown_end_at, sb.pid, id(sb.pause_info), len(sb.metadata))
                if sid in self._written and self._fingerprints.get(sid) == fingerprint:
                    continue
                written += await self._write(self._entry_of(sb), now)
                self._fingerprints[sid] = fingerprint
                self._exited.pop(sid, None)
            gone = [sid for sid in self._written if sid not in local]
            if not gone:
                return written
            ended = ({rec.id: rec for rec in self.manager.ended()}
                     if any(sid not in self._exited for sid in gone) else {})
            retention = self.manager.config.orchestrator.ended_retention_s
            for sid in gone:
                self._fingerprints.pop(sid, None)
                if sid in self._exited:
                    if now - self._exited[sid] > retention:
                        await self.etcd.delete(self.keys.sandbox(sid))
                        self._written.pop(sid, None)
                        self._exited.pop(sid, None)
                    continue
                rec = ended.get(sid)
                if rec is None:  # forgotten here (past the retention)
                    await self.etcd.delete(self.keys.sandbox(sid))
                    self._written.pop(sid, None)
                    continue
                written += await self._write(self._entry_of_ended(rec), now)
                self._exited[sid] = rec.ended_at or now
            return written

    async def _write(self, entry: SandboxEntry, now: float) -> int:
        """Put ``entry`` unless it is what was written last; 1 if it was put."""
        text = entry.model_dump_json(exclude={"updated_at"})
        if self._written.get(entry.id) == text:
            return 0
        entry.updated_at = now
        await self.etcd.put(self.keys.sandbox(entry.id), entry.model_dump_json())
        self._written[entry.id] = text
        self._located.pop(entry.id, None)
        return 1

    async def sync_soon(self, touched: str = "") -> None:
        """:meth:`sync` after an API call that may have changed ``touched`` (or made or ended
        sandboxes), its failure logged (the call itself succeeded)."""
        try:
            await self.sync(full=False, touched=touched)
        except EtcdError as e:
            log.warning("cluster: the entries of this node's sandboxes could not be written now: %s", e)

    async def reconcile(self) -> None:
        """Entries of this node whose sandbox is gone are marked exited; sandboxes the cluster ended
        while this node was away are killed."""
        local = {sb.id: sb for sb in self.manager.list()}
        ended = {rec.id: rec for rec in self.manager.ended()}
        for kv in await self.etcd.range(self.keys.sandboxes):
            try:
                entry = SandboxEntry.model_validate_json(kv.value)
            except ValueError:
                continue
            if entry.node != self.name:
                continue
            if entry.state == "exited":
                if entry.ended_by_cluster and entry.id in local:
                    log.info("cluster: killing sandbox %s, which the cluster ended while this node was away (%s)",
                             entry.id, entry.end_reason)
                    with contextlib.suppress(KeyError):
                        await self.manager.kill(entry.id, reason=entry.end_reason or "killed")
                    local.pop(entry.id, None)
                self._written[entry.id] = entry.model_dump_json(exclude={"updated_at"})
                self._exited[entry.id] = entry.ended_at or self.clock()
                continue
            if entry.id in local:
                continue
            rec = ended.get(entry.id)
            gone = entry.model_copy(update={
                "state": "exited", "end_reason": rec.end_reason if rec else LOST_REASON,
                "ended_at": (rec.ended_at if rec else None) or self.clock(), "updated_at": self.clock(),
                "info": {**entry.info, "state": "exited"},
            })
            await self.etcd.put(kv.key, gone.model_dump_json())
            self._written[entry.id] = gone.model_dump_json(exclude={"updated_at"})
            self._exited[entry.id] = gone.ended_at or self.clock()
            log.info("cluster: sandbox %s of this node is gone (%s); its entry says so now", entry.id, gone.end_reason)

    # -- paused sandboxes moving between nodes ------------------------------------------------------

    def moved_away(self, sandbox_id: str) -> None:
        """The sandbox now lives on another node: its entry is that node's to write (not deleted
        here as a sandbox this node forgot)."""
        self._written.pop(sandbox_id, None)
        self._fingerprints.pop(sandbox_id, None)
        self._exited.pop(sandbox_id, None)
        self.forget(sandbox_id)

    async def pull(self, sandbox_id: str, source: str) -> float:
        """Move the paused ``sandbox_id`` here from node ``source`` (its entry then names this node).
        Raises :class:`SandboxMoveError`."""
        from .sandbox_move import SandboxMoveError, pull_paused

        try:
            giver = (await self.live_nodes(max_age_s=0)).get(source)
        except ClusterUnavailable as e:
            raise SandboxMoveError(str(e)) from None
        if giver is None:
            raise SandboxMoveError(f"node {source}, which holds sandbox {sandbox_id}, is not alive: its files cannot "
                                   "be reached")
        seconds = await pull_paused(self, sandbox_id, giver)
        self.forget(sandbox_id)
        await self.sync_soon()
        return seconds

    # -- templates -------------------------------------------------------------------------------

    def _copy_missing_templates(self) -> None:
        """Start copying, in the background and one at a time, a template whose newest build another
        node holds and this one lacks (the default template first): templates are everywhere without
        a user step, and a rebuild reaches every node. A create that needs one sooner copies it
        itself (:meth:`ensure_template`). A copy that failed is tried again after
        :data:`COPY_RETRY_S`."""
        if self._copying is not None and not self._copying.done():
            return
        newest: dict[str, str] = {}
        for n in self._nodes.values():
            if n.name == self.name:
                continue
            for name, build_id in n.builds.items():
                if build_id > newest.get(name, ""):
                    newest[name] = build_id
        now = time.monotonic()
        default = self.config.default_template
        for name in sorted(newest, key=lambda t: (t != default, t)):
            if now - self._copy_failed.get(name, -COPY_RETRY_S) < COPY_RETRY_S:
                continue
            try:
                have = self.manager.templates.current(name).manifest.build_id
            except TemplateNotFound:
                have = ""
            if have < newest[name]:
                self._copying = asyncio.create_task(self._copy_in_background(name, newest[name]),
                                                    name=f"cluster-copy-{name}")
                return

    async def _copy_in_background(self, name: str, build_id: str) -> None:
        try:
            await self.ensure_template(name, build_id)
        except (TemplateCopyError, ClusterUnavailable) as e:
            self._copy_failed[name] = time.monotonic()
            log.warning("cluster: template %s was not copied here (tried again in %.0f s): %s", name, COPY_RETRY_S, e)

    async def ensure_template(self, name: str, build_id: str | None = None) -> None:
        """Make ``name``'s build available here, copied from a live node that holds it, when this
        node has none (or, with ``build_id``, none as new); a template nobody holds is left to the
        create's own 404. Raises :class:`TemplateCopyError`, :class:`ClusterUnavailable`."""
        try:
            have = self.manager.templates.current(name).manifest.build_id
            if build_id is None or have >= build_id:
                return
        except TemplateNotFound:
            pass
        nodes = await self.live_nodes()
        holders = [n for n in nodes.values() if name in n.templates and n.name != self.name
                   and (build_id is None or n.builds.get(name, "") >= build_id)]
        if not holders:
            return
        holders.sort(key=lambda n: (n.builds.get(name, ""), n.capacity.mem_headroom_mb), reverse=True)
        errors = []
        for source in holders:
            try:
                await self.copier.copy(name, source.url, source.name, build_id)
                self._record_json = ""  # the record says it holds the template now
                return
            except TemplateCopyError as e:
                errors.append(str(e))
                log.warning("cluster: copying template %s from node %s failed: %s", name, source.name, e)
        raise TemplateCopyError(f"template {name} could not be copied to node {self.name}: " + "; ".join(errors))

    def template_named_set(self) -> set[str]:
        """Every template some live node holds."""
        return {t for n in self._nodes.values() for t in n.templates}

    def template_named(self, name: str) -> str:
        """The template an alias names, as any live node's builds record it (else ``name``)."""
        for n in self._nodes.values():
            if name in n.aliases:
                return n.aliases[name]
        return name

    # -- where sandboxes are --------------------------------------------------------------------------

    async def locate(self, sandbox_id: str) -> Location | None:
        """Where ``sandbox_id`` is (None: the cluster does not know it). Raises
        :class:`ClusterUnavailable` when etcd cannot be reached and the answer is not remembered."""
        hit = self._located.get(sandbox_id)
        if hit is not None and time.monotonic() - hit[1] < OWNER_CACHE_S and (
                hit[0].node is None or hit[0].node.name in self._nodes):  # its node still alive, as last read
            return hit[0]
        try:
            kv = await self.etcd.get(self.keys.sandbox(sandbox_id))
            if kv is None:
                self._located.pop(sandbox_id, None)
                return None
            entry = SandboxEntry.model_validate_json(kv.value)
            nodes = await self.live_nodes()
        except (EtcdError, ClusterUnavailable) as e:
            if hit is not None:
                return hit[0]  # stale, but the best there is: the sandbox most likely still runs there
            raise ClusterUnavailable(f"the cluster's store (etcd) cannot be reached: {e}") from None
        loc = Location(self.as_seen(entry, nodes), nodes.get(entry.node))
        self._located[sandbox_id] = (loc, time.monotonic())
        if len(self._located) > 10_000:
            self._located.clear()
        return loc

    def forget(self, sandbox_id: str) -> None:
        self._located.pop(sandbox_id, None)

    def as_seen(self, entry: SandboxEntry, nodes: dict[str, NodeRecord]) -> SandboxEntry:
        """The entry as the cluster reports it: a sandbox of a dead node is lost (exited)."""
        if entry.state == "exited" or entry.node in nodes:
            return entry
        info = dict(entry.info)
        info["state"] = "exited"
        info["trenvx"] = {**(info.get("trenvx") or {}), "endReason": LOST_REASON, "node": entry.node}
        return entry.model_copy(update={"state": "exited", "end_reason": LOST_REASON, "info": info})

    async def entries(self) -> list[SandboxEntry]:
        """Every sandbox of the cluster, as reported. Raises :class:`ClusterUnavailable`.

        Read from the node's watched copy of the entries when that copy has seen the latest put
        (one small request tells: the highest revision under the prefix), so a list costs the
        same at 10 and at 10,000 sandboxes and still shows a create answered a moment ago by
        another node; else (the watch is behind or down) read from etcd."""
        try:
            nodes = await self.live_nodes()
            cached = await self._fresh_entries()
            if cached is None:
                kvs = await self.etcd.range(self.keys.sandboxes)
                cached = {}
                for kv in kvs:
                    with contextlib.suppress(ValueError):
                        e = SandboxEntry.model_validate_json(kv.value)
                        cached[e.id] = e
        except EtcdError as e:
            raise ClusterUnavailable(f"the cluster's store (etcd) cannot be reached: {e}") from None
        return [self.as_seen(e, nodes) for e in cached.values()]

    async def _fresh_entries(self, wait_s: float = 0.2) -> dict[str, SandboxEntry] | None:
        watch = self._entry_watch
        if watch.items is None:
            return None
        latest = await self.etcd.latest_mod_revision(self.keys.sandboxes)
        deadline = time.monotonic() + wait_s
        while watch.items is not None and watch.revision < latest:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.005)  # the watch is a moment behind
        return dict(watch.items) if watch.items is not None else None


    async def end_elsewhere(self, entry: SandboxEntry, reason: str) -> None:
        """Mark a sandbox of a dead node ended (a kill through this node); its node kills it if it
        comes back. Raises :class:`ClusterUnavailable`."""
        ended = entry.model_copy(update={
            "state": "exited", "end_reason": reason, "ended_at": self.clock(), "ended_by_cluster": True,
            "updated_at": self.clock(), "info": {**entry.info, "state": "exited"},
        })
        try:
            await self.etcd.put(self.keys.sandbox(entry.id), ended.model_dump_json())
        except EtcdError as e:
            raise ClusterUnavailable(f"the cluster's store (etcd) cannot be reached: {e}") from None
        self.forget(entry.id)


def _stable(info: dict[str, Any]) -> dict[str, Any]:
    """A sandbox's description without what changes every second (its remaining timeout, memory):
    an entry is rewritten when the sandbox changes, not as time passes."""
    info = dict(info)
    tr = info.get("trenvx")
    if isinstance(tr, dict):
        info["trenvx"] = {k: v for k, v in tr.items() if k not in ("timeoutLeft", "rssBytes", "pssBytes")}
    return info
