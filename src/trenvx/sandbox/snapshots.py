"""Snapshots and forks of running sandboxes: a sandbox's state made something new sandboxes start
from, exactly as they start from a template.

A **snapshot** of a running sandbox S is a build in the template store
(``data_root/templates/<snapshot id>/<build id>/``, directory 0700, root's) made by
:func:`trenvx.vmm.qemu_checkpoint.checkpoint`: S stops, its disk becomes an immutable qcow2 layer
under a new overlay of its own, its RAM is migrated into ONE full memory file (its template's
memory file with S's pages written over it), then S runs on, with its id, token and timeout.
The build holds:

- ``memory`` (0400), ``vmstate`` (0600): what every copy maps ``share=off`` and loads;
- ``layer.qcow2``: S's disk as it was (a second name of the layer S's own overlay now stands on:
  no copy); its backing file is S's template's image, or the layer of the snapshot S came from;
- ``rootfs.ext4`` (and ``upper.ext4`` in overlay mode): second names of the template's images;
- ``agent.token`` (0600): the token S's agent holds in that memory, which a copy's first request
  (``/init``, where it gets its own identity and token) must carry;
- ``manifest.json``: the template's, with ``snapshot`` (:class:`~trenvx.template.store.SnapshotOrigin`):
  the source sandbox and template, and the build directories its layer refers to by path
  (``requires``), which must outlive it whatever happens to their template (a rebuild publishes a
  new build and keeps the old ones; :meth:`TemplateStore.prune` keeps what snapshots require).

A copy (``Sandbox.create(snapshot_id)``, a pool of the snapshot's name, a fork's child) is restored
like a template's sandbox: its own overlay on the layer, the memory file mapped privately (pages
shared with every other copy in the host's page cache, copied on write), its own network slot, and
``/init`` with its own id, hostname, machine id, fresh entropy (RNDADDENTROPY + reseed; QEMU's
vmgenid changes too) and tokens. A copy shares nothing writable with its siblings or its source.

A **fork** is a snapshot that no one names (``ephemeral``: never listed, never published under a
name) and ``count`` creates from it, each answered separately; the source keeps running.

**Lifetimes.** Deleting a snapshot (``DELETE /templates/{id}``) unpublishes it at once (no new
copy starts from it); its files stay while a sandbox (running or paused to disk) was started from
it or another snapshot requires it, and go with the last of them (:meth:`Snapshots.collect`, run
when a sandbox ends and after every snapshot operation). A fork's snapshot goes the same way once
its children have ended. The source sandbox never depends on a snapshot of it: its own disk chain
has its own names.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import VmmType
from ..template import build_users
from ..template.build_users import has_users
from ..template.store import (
    AGENT_TOKEN, MANIFEST, ROOTFS, UPPER, SnapshotOrigin, TemplateBuild, TemplateManifest, TemplateNotFound,
)
from ..vmm.base import VmmError

if TYPE_CHECKING:
    from ..vmm.qemu_checkpoint import Checkpoint
    from .manager import Sandbox, SandboxManager

log = logging.getLogger(__name__)

MAX_FORK_COUNT = 100
"""Children one fork may ask for (E2B's limit)."""
FORK_PARALLEL = 8
"""Children of a fork restored at once (the rest wait for a turn)."""
DEFAULT_TAG = "default"
"""E2B's tag of a snapshot's one build: ids and names are reported as ``<id>:default``."""
TAGS = (DEFAULT_TAG, "latest")
"""Tags a template or snapshot id may carry (trenvx keeps one build per name: its current one)."""
SNAPSHOT_NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,63}"
_NAME_RE = re.compile(rf"^{SNAPSHOT_NAME_PATTERN}$")


class SnapshotError(RuntimeError):
    """A snapshot or fork could not be made; the message says why."""


class SnapshotNameTaken(RuntimeError):
    """The name asked for a snapshot is a template's (409: a conflict, not a malformed request)."""


class InvalidSnapshotRequest(ValueError):
    """A request the API answers with 400 (a bad name, count or tag)."""


class SnapshotUnsupported(SnapshotError):
    """This sandbox cannot be snapshotted (its VMM has no checkpoint)."""


class SnapshotNotFound(KeyError):
    def __init__(self, snapshot_id: str, detail: str = "") -> None:
        super().__init__(snapshot_id)
        self.snapshot_id = snapshot_id
        self.detail = detail

    def __str__(self) -> str:
        return self.detail or f"snapshot {self.snapshot_id!r} does not exist"


@dataclass(frozen=True)
class SnapshotEvent:
    """One snapshot or fork, as the metrics see it."""

    op: str
    """``snapshot`` (named or not) or ``fork``."""
    template: str
    """The source sandbox's template."""
    seconds: float
    """The whole operation (a fork: until every child answered or failed)."""
    outcome: str
    """``ok``, or the exception's class name."""
    stopped_s: float = 0.0
    """How long the source's vCPUs were stopped."""
    stored_bytes: int = 0
    children: int = 0
    """A fork: children asked for."""
    children_ok: int = 0


def split_tag(template_id: str) -> tuple[str, str | None]:
    """``name:tag`` -> (name, tag); a name without a tag -> (name, None)."""
    name, sep, tag = template_id.partition(":")
    return name, (tag if sep else None)


def template_name_of(template_id: str) -> str:
    """The template (or snapshot) name of an id E2B's SDK sends, e.g. a snapshot id ``abc:default``.
    Raises :class:`InvalidSnapshotRequest` for tags trenvx does not keep."""
    name, tag = split_tag(template_id)
    if tag is not None and tag.strip().lower() not in TAGS:
        raise InvalidSnapshotRequest(
            f"tag {tag!r} of {template_id!r}: trenvx keeps one build per template or snapshot, tagged "
            f"{DEFAULT_TAG!r}; use {name}:{DEFAULT_TAG} or {name}")
    return name


def parse_snapshot_name(name: str) -> str:
    """A snapshot name as E2B's SDK sends it (``my-snap`` or ``my-snap:default``) -> ``my-snap``."""
    base, tag = split_tag(name.strip())
    base = base.lower()
    if "/" in base:
        raise InvalidSnapshotRequest(
            f"snapshot name {name!r}: trenvx has no team namespaces; give the name without 'namespace/'")
    if tag is not None and tag.lower() not in TAGS:
        raise InvalidSnapshotRequest(
            f"snapshot name {name!r}: tag {tag!r} is not kept by trenvx (one build per snapshot name, "
            f"tagged {DEFAULT_TAG!r}); leave the tag out")
    if not _NAME_RE.match(base):
        raise InvalidSnapshotRequest(
            f"snapshot name {name!r}: use 1-64 lowercase letters, digits, '-' and '_', starting with a letter or digit")
    return base


def snapshot_id_of(build: TemplateBuild) -> str:
    """What E2B calls the snapshot's id: its name (or generated id) with the default tag."""
    return f"{build.name}:{DEFAULT_TAG}"


def new_snapshot_id() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return secrets.choice(alphabet[:26]) + "".join(secrets.choice(alphabet) for _ in range(19))


def add_user(build: TemplateBuild, key: str, alive: Path) -> None:
    """Record that ``alive`` uses the build (a template's or a snapshot's; see
    :mod:`~trenvx.template.build_users`). Raises :class:`SnapshotNotFound` if a snapshot's build
    was removed meanwhile, :class:`TemplateNotFound` if a template's was."""
    try:
        build_users.add_user(build.path, key, alive, manifest=MANIFEST)
    except PermissionError as e:
        if build.is_snapshot:
            raise
        # a templates directory this process may not write (only another, e.g. the builder, does):
        # the build is then kept by keep_builds alone
        log.warning("template %s: cannot record sandbox %s as a user of build %s: %s", build.name, key,
                    build.build_id, e)
    except build_users.BuildGone:
        if build.is_snapshot:
            raise SnapshotNotFound(build.name, f"snapshot {build.name!r} was deleted (build {build.path} is gone)") from None
        raise TemplateNotFound(f"template {build.name!r}: build {build.build_id} was removed (a newer one replaced "
                               "it); try again") from None


def remove_user(build: TemplateBuild, key: str) -> None:
    build_users.remove_user(build.path, key)


def requirements_of(build: TemplateBuild) -> list[str]:
    """The build directories a snapshot taken of a sandbox of ``build`` refers to: ``build``
    itself (its images, or its layer) and what it requires in turn."""
    own = [_real(build.path)]
    if build.manifest.snapshot is not None:
        own += [r for r in build.manifest.snapshot.requires if r not in own]
    return own


class Snapshots:
    """Snapshots and forks of the sandboxes of one :class:`SandboxManager` (``manager.snapshots``)."""

    def __init__(self, manager: "SandboxManager") -> None:
        self.manager = manager
        self.observers: list[Callable[[SnapshotEvent], None]] = []
        """Called after every snapshot and fork (the server's metrics)."""
        self._pinned: dict[str, str] = {}
        """Build directories in use by an operation in progress (a fork's creates), by key."""
        self._collecting = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def store(self):  # noqa: ANN201 - TemplateStore
        return self.manager.templates

    # -- take -----------------------------------------------------------------------------------

    async def take(self, sandbox_id: str, *, name: str | None = None, ephemeral: bool = False) -> TemplateBuild:
        """Snapshot the running sandbox ``sandbox_id`` (it runs on). With ``name``, the snapshot is
        published under that name (a new build of it if it exists); without, under a new id.
        ``ephemeral`` (a fork's): published under no name, removed once no sandbox uses it.

        Raises :class:`SandboxNotFound`, :class:`SandboxConflict` (paused), :class:`InvalidSnapshotRequest`
        (a name a template has), :class:`SnapshotUnsupported`, :class:`SnapshotError`."""
        t0 = time.perf_counter()
        sb = self.manager.get(sandbox_id)
        template = sb.template
        try:
            build, stopped, stored = await self._take(sb, name, ephemeral)
        except BaseException as e:
            if not ephemeral:
                self._observe(SnapshotEvent("snapshot", template, time.perf_counter() - t0, type(e).__name__))
            raise
        if not ephemeral:
            self._observe(SnapshotEvent("snapshot", template, time.perf_counter() - t0, "ok", stopped, stored))
        return build

    def _vmm(self, sb: "Sandbox") -> tuple[Any, Any]:
        """The QEMU driver and VM of ``sb``; :class:`SnapshotUnsupported` for other VMMs."""
        from ..vmm.qemu import QemuDriver, QemuVm

        source = sb.build
        driver = self.manager.restorer.driver(source)
        vm = sb.restored.vm
        if source.manifest.vmm_type != VmmType.qemu.value or not isinstance(driver, QemuDriver) \
                or not isinstance(vm, QemuVm):
            raise SnapshotUnsupported(
                f"sandbox {sb.id} runs on {source.manifest.vmm_type}: snapshots and forks of running sandboxes "
                "are made with QEMU only (its templates have vmm_type = \"qemu\")")
        return driver, vm

    async def _checkpoint(self, driver: Any, vm: Any, source: TemplateBuild, staging: Path) -> "Checkpoint":
        """The VMM's checkpoint into ``staging``, shielded: a caller that goes away does not leave
        the sandbox stopped halfway."""
        from ..vmm.qemu_checkpoint import checkpoint

        task = asyncio.ensure_future(checkpoint(driver, vm, base_memory=source.snapshot.memory_file, dest=staging))
        return await asyncio.shield(task)

    async def _take(self, sb: "Sandbox", name: str | None, ephemeral: bool) -> tuple[TemplateBuild, float, int]:
        from .manager import SandboxConflict, SandboxNotFound

        snap_name = parse_snapshot_name(name) if name is not None else None
        if snap_name is not None:
            self._check_name_free(snap_name)
        async with sb._state_lock:  # one change of its state at a time: no pause or kill meanwhile
            if sb.ending or self.manager.get(sb.id) is not sb:
                raise SandboxNotFound(sb.id, "it is being killed")
            if sb.paused:
                raise SandboxConflict(f"sandbox {sb.id} is paused and cannot be snapshotted or forked; resume it "
                                      f"first (POST /sandboxes/{sb.id}/connect)")
            source = sb.build
            driver, vm = self._vmm(sb)
            snapshot_name = snap_name or (f".fork-{new_snapshot_id()}" if ephemeral else new_snapshot_id())
            build_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(4)
            tdir = self.store.data_root.template_dir(snapshot_name)
            tdir.mkdir(mode=0o700, parents=True, exist_ok=True)
            staging = tdir / f".{build_id}.partial"
            staging.mkdir(mode=0o700)
            pin = self._pin(source)
            try:
                try:
                    cp = await self._checkpoint(driver, vm, source, staging)
                except VmmError as e:
                    raise SnapshotError(f"the snapshot of sandbox {sb.id} failed: {e}") from e
                for image in (ROOTFS, *([UPPER] if source.overlay else [])):
                    _link(source.path / image, staging / image)
                token = staging / AGENT_TOKEN
                fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(sb.access_token)
                manifest = self._manifest(sb, source, snapshot_name, build_id, cp, ephemeral,
                                          [snap_name] if snap_name else [])
                if ephemeral:
                    (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2))
                    final = tdir / build_id
                    os.rename(staging, final)
                    build = TemplateBuild(final, manifest)
                else:
                    build = self.store.publish(snapshot_name, staging, manifest)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                with contextlib.suppress(OSError):
                    tdir.rmdir()  # a new name's directory, if nothing else is in it
                raise
            finally:
                self._unpin(source, pin)
        sizes = build.manifest.sizes
        stored = sizes["memory_bytes"] + sizes["vmstate_bytes"]
        log.info("snapshot %s of sandbox %s: %.0f MiB memory file, %d pages of RAM merged, %.1f MiB disk layer; "
                 "the sandbox stopped for %.0f ms %s, then gave back %.0f MiB its migration had read",
                 snapshot_name, sb.id, sizes["memory_bytes"] / (1 << 20), cp.stats.merged_pages,
                 sizes["layer_bytes"] / (1 << 20), cp.stopped_s * 1000, {k: round(v * 1000) for k, v in cp.times.items()},
                 cp.released_bytes / (1 << 20))
        if not ephemeral:
            await self.collect()  # a named snapshot's older builds nobody uses
        return build, cp.stopped_s, stored

    def _manifest(self, sb: "Sandbox", source: TemplateBuild, name: str, build_id: str, cp, ephemeral: bool,
                  names: list[str]) -> TemplateManifest:
        m = source.manifest
        sizes = {k: v for k, v in m.sizes.items() if k in ("rootfs_bytes", "upper_bytes")}
        sizes.update(memory_bytes=cp.memory_file.stat().st_size, vmstate_bytes=cp.vmstate.stat().st_size,
                     layer_bytes=cp.layer.stat().st_size, merged_pages=cp.stats.merged_pages)
        # integrity: the template's hashes describe the template's files, not this snapshot's memory,
        # state and layer; a snapshot is not hashed (its files were written a moment ago by this
        # process, and hashing the memory file would lengthen every fork).
        return m.model_copy(update=dict(
            name=name, build_id=build_id, created_at=dt.datetime.now(dt.UTC).isoformat(), integrity=None,
            sizes=sizes, stage_seconds={**{k: round(v, 4) for k, v in cp.times.items()}, "stopped": round(cp.stopped_s, 4)},
            snapshot=SnapshotOrigin(
                source_sandbox=sb.id, source_template=sb.template, source_build=_real(source.path),
                requires=requirements_of(source), names=names, ephemeral=ephemeral,
            ),
        ))

    def _check_name_free(self, name: str) -> None:
        """A name is a snapshot's (a new build of it) or nobody's; a template's is refused."""
        if name in self.manager.config.template:
            raise SnapshotNameTaken(f"snapshot name {name!r} is the name of a configured template; choose another")
        try:
            current = self.store.current(name)
        except TemplateNotFound:
            if self.store.builds(name) and not any(b.manifest.snapshot for b in self.store.published(name)):
                raise SnapshotNameTaken(f"snapshot name {name!r} is the name of a template; choose another") from None
            return
        if current.manifest.snapshot is None:
            raise SnapshotNameTaken(f"snapshot name {name!r} is the name of a template; choose another")

    # -- fork -------------------------------------------------------------------------------------

    async def fork(self, sandbox_id: str, *, count: int = 1, timeout_s: float | None = None) -> list["Sandbox | Exception"]:
        """Snapshot the running sandbox once and start ``count`` sandboxes from it; one entry per
        child, each a sandbox or the exception that kept it from starting. The children inherit the
        source's template name, metadata, environment, network rules and lifecycle; each has its own identity.

        Raises (nothing started): :class:`InvalidSnapshotRequest` (count), ``InvalidTimeout``,
        :class:`SandboxNotFound`, :class:`SandboxConflict` (paused), :class:`SnapshotUnsupported`,
        :class:`SnapshotError`."""
        from .lifecycle import check_timeout

        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_FORK_COUNT:
            raise InvalidSnapshotRequest(f"count must be an integer from 1 to {MAX_FORK_COUNT} (got {count!r})")
        orch = self.manager.config.orchestrator
        timeout = check_timeout(orch.default_timeout_s if timeout_s is None else timeout_s, orch.max_timeout_s)
        t0 = time.perf_counter()
        sb = self.manager.get(sandbox_id)
        template = sb.template
        try:
            build, stopped, stored = await self._take(sb, None, ephemeral=True)
        except BaseException as e:
            self._observe(SnapshotEvent("fork", template, time.perf_counter() - t0, type(e).__name__, children=count))
            raise
        pin = self._pin(build)
        try:
            sem = asyncio.Semaphore(FORK_PARALLEL)

            async def child() -> "Sandbox":
                async with sem:
                    return await self.manager.create_from_build(build, template, sb.options_for_copy(timeout))

            results = await asyncio.gather(*(child() for _ in range(count)), return_exceptions=True)
        finally:
            self._unpin(build, pin)
        out: list[Sandbox | Exception] = []
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r  # cancellation: the children started are registered and end by their timeout
            out.append(r)
        ok = sum(1 for r in out if not isinstance(r, Exception))
        for r in out:
            if isinstance(r, Exception):
                log.warning("a child of the fork of %s failed to start: %s: %s", sandbox_id, type(r).__name__, r)
        log.info("fork of %s: %d of %d children started in %.0f ms (the source stopped for %.0f ms)", sandbox_id, ok,
                 count, (time.perf_counter() - t0) * 1000, stopped * 1000)
        self._observe(SnapshotEvent("fork", template, time.perf_counter() - t0, "ok", stopped, stored, count, ok))
        await self.collect()  # nothing started from it: it goes at once
        return out

    # -- list and delete ----------------------------------------------------------------------------

    def list(self, *, sandbox_id: str | None = None, name: str | None = None) -> list[TemplateBuild]:
        """Published snapshots (their current builds), newest first; of the source sandbox
        ``sandbox_id``, and/or whose id or name is ``name`` (tag-qualified or not)."""
        wanted = split_tag(name)[0].lower() if name else None
        out = []
        for n in self.store.names():
            try:
                build = self.store.current(n)
            except TemplateNotFound:
                continue
            origin = build.manifest.snapshot
            if origin is None or origin.ephemeral:
                continue
            if sandbox_id is not None and origin.source_sandbox != sandbox_id:
                continue
            if wanted is not None and wanted != build.name and wanted not in origin.names:
                continue
            out.append(build)
        out.sort(key=lambda b: (b.manifest.created_at, b.name), reverse=True)
        return out

    def get(self, snapshot_id: str) -> TemplateBuild:
        """The published snapshot ``snapshot_id`` (``id``, ``id:default``, or its name)."""
        try:
            name = template_name_of(snapshot_id)
        except InvalidSnapshotRequest as e:
            raise SnapshotNotFound(snapshot_id, str(e)) from None
        try:
            build = self.store.current(name)
        except (TemplateNotFound, OSError, ValueError):
            raise SnapshotNotFound(snapshot_id) from None
        if build.manifest.snapshot is None:
            raise SnapshotNotFound(snapshot_id, f"{name!r} is a template, not a snapshot")
        return build

    async def delete(self, snapshot_id: str) -> TemplateBuild:
        """Unpublish the snapshot: no sandbox starts from it any more. Its files go now, or with
        the last sandbox started from it (running or paused) or snapshot that requires them.
        Raises :class:`SnapshotNotFound` (also for a template: templates are not deleted here)."""
        build = self.get(snapshot_id)
        link = self.store.data_root.template_current(build.name)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        log.info("snapshot %s deleted", build.name)
        await self.collect()
        return build

    # -- what stays on disk ---------------------------------------------------------------------------

    def in_use(self) -> set[str]:
        """Build directories this manager's sandboxes (running, paused) and operations in progress
        use. (:meth:`collect` adds those any VM of this ``data_root`` stands on, whatever process
        runs it: the backing chains of the disks under ``sandboxes/``.)"""
        return set(self._pinned.values()) | {_real(sb.build.path) for sb in self.manager.list()}

    async def collect(self) -> list[Path]:
        """Remove the snapshot builds nothing needs: not published (a deleted snapshot, an older
        build of a name, a fork's), used by no sandbox (running or paused), required by no kept
        snapshot. Returns the directories removed."""
        async with self._collecting:
            return await asyncio.to_thread(self._collect_sync, self.in_use())

    def _collect_sync(self, in_use: set[str]) -> list[Path]:
        root = self.store.data_root.templates
        if not root.is_dir():
            return []
        in_use = set(in_use) | self.store.under_sandbox_disks()
        snapshots: dict[str, TemplateManifest] = {}
        published: set[str] = set()
        for tdir in root.iterdir():
            if not tdir.is_dir():
                continue
            current = tdir / "current"
            with contextlib.suppress(OSError):
                if current.is_symlink():
                    published.add(str(current.resolve(strict=True)))
            for manifest in tdir.glob(f"*/{MANIFEST}"):
                if manifest.parent.name.startswith(".") or manifest.parent.is_symlink():
                    continue  # a staging directory, the current link
                try:
                    m = TemplateManifest.model_validate_json(manifest.read_text())
                except (OSError, ValueError):
                    continue
                if m.snapshot is not None:
                    snapshots[_real(manifest.parent)] = m
        used = {p for p in snapshots if has_users(Path(p))}  # (also drops the entries of ended users)
        keep = {p for p in snapshots if p in published or p in in_use or p in used}
        todo = list(keep)
        while todo:  # what kept snapshots require is kept too
            for r in snapshots[todo.pop()].snapshot.requires:  # type: ignore[union-attr]
                if r in snapshots and r not in keep:
                    keep.add(r)
                    todo.append(r)
        removed = []
        for path in sorted(set(snapshots) - keep):
            p = Path(path)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
            parent = p.parent
            if not (parent / "current").is_symlink() and not any(
                    c for c in parent.iterdir() if c.name != ".build.lock"):
                shutil.rmtree(parent, ignore_errors=True)
            log.info("removed snapshot build %s (no sandbox or snapshot needs it)", p)
        return removed

    def sandbox_ended(self) -> None:
        """A sandbox ended: the snapshot it started from may be needed no more."""
        task = asyncio.get_running_loop().create_task(self._collect_quietly())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _collect_quietly(self) -> None:
        try:
            await self.collect()
        except Exception:  # noqa: BLE001 - a failed sweep is retried by the next one
            log.exception("removing unused snapshots failed")

    def _pin(self, build: TemplateBuild) -> str:
        """Keep ``build`` while an operation of this process uses it (see :mod:`~trenvx.template.build_users`)."""
        key = f"op-{os.getpid()}-{secrets.token_hex(4)}"
        add_user(build, key, Path(f"/proc/{os.getpid()}"))
        self._pinned[key] = _real(build.path)
        return key

    def _unpin(self, build: TemplateBuild, key: str) -> None:
        remove_user(build, key)
        self._pinned.pop(key, None)

    def _observe(self, event: SnapshotEvent) -> None:
        for observer in self.observers:
            try:
                observer(event)
            except Exception:  # noqa: BLE001 - metrics must never break a snapshot
                log.exception("snapshot observer failed")


def _real(path: Path) -> str:
    """A build directory as snapshots record and compare it: its real path (data_root's templates
    may be reached through a symlink)."""
    try:
        return str(path.resolve())
    except OSError:
        return str(path)


def _link(src: Path, dst: Path) -> None:
    """``dst`` as a second name of the read-only image ``src`` (no copy); a symlink across filesystems."""
    try:
        os.link(src, dst)
    except OSError:
        os.symlink(src, dst)
