"""A sandbox paused to disk handed from one manager to another (a cluster's node to another node).

A paused sandbox is its template's build plus its directory (its disk overlay, its saved device
state and changed pages, its network settings) and its record: the files can move, so the sandbox
can. The giving manager:

1. :meth:`PausedHandover.hold`: the sandbox must be paused to disk; its state lock is taken (no
   resume, kill or second handover meanwhile) until :meth:`release` or :meth:`abort`, or
   :data:`HOLD_S` passes (then it is the giver's again, untouched). Returns its record and files.
2. The taker copies the files (and the template's build, if it lacks it) and calls
   :func:`adopt_paused`; then the giver's :meth:`release` forgets the sandbox (no end: it lives
   on elsewhere) and removes its directory. A taker that fails calls :meth:`abort` instead.

The taker's copy of the disk names the giver's template image as its backing file: :func:`adopt_paused`
points it at the same build's image in the taker's store before the record is taken over.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from ..template.store import TemplateBuild
from ..vmm.qemu_img import qcow2_backing_name, qemu_img
from .state import SandboxRecord

if TYPE_CHECKING:
    from .manager import Sandbox, SandboxManager

log = logging.getLogger(__name__)

HOLD_S = 300.0
"""How long a handover may take before the giver takes the sandbox back."""


class HandoverRefused(RuntimeError):
    """The sandbox cannot be handed over now (not paused to disk, or already being handed over)."""


class PausedHandover:
    """The giving side, for one manager."""

    def __init__(self, manager: "SandboxManager") -> None:
        self.manager = manager
        self._held: dict[str, asyncio.Task[None]] = {}
        self._released: dict[str, asyncio.Event] = {}

    async def hold(self, sandbox_id: str) -> tuple[SandboxRecord, list[Path]]:
        """Hold a paused sandbox for a handover: its record and its files (regular files under its
        directory). Raises :class:`SandboxNotFound`, :class:`HandoverRefused`."""
        sb = self.manager.get(sandbox_id)
        if sandbox_id in self._held:
            raise HandoverRefused(f"sandbox {sandbox_id} is already being handed over")
        if sb.pause_info is None:
            raise HandoverRefused(f"sandbox {sandbox_id} is {sb.state}: only a sandbox paused to disk can move "
                                  "to another node (pause it first)")
        acquired = asyncio.Event()
        done = self._released[sandbox_id] = asyncio.Event()

        async def holder() -> None:
            async with sb._state_lock:
                acquired.set()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(done.wait(), HOLD_S)

        task = asyncio.create_task(holder(), name=f"handover-{sandbox_id}")
        self._held[sandbox_id] = task
        task.add_done_callback(lambda _t: (self._held.pop(sandbox_id, None), self._released.pop(sandbox_id, None)))
        await acquired.wait()
        if sb.ending or sb.pause_info is None or sandbox_id not in {s.id for s in self.manager.list()}:
            self.abort(sandbox_id)
            raise HandoverRefused(f"sandbox {sandbox_id} changed while the handover began; ask again")
        workdir = sb.restored.workdir
        files = sorted(p for p in workdir.rglob("*") if p.is_file() and not p.is_symlink()
                       and stat.S_ISREG(p.lstat().st_mode))
        return sb.record(), files

    def is_held(self, sandbox_id: str) -> bool:
        return sandbox_id in self._held

    def abort(self, sandbox_id: str) -> None:
        """The handover failed: the sandbox is this manager's again, as it was."""
        ev = self._released.get(sandbox_id)
        if ev is not None:
            ev.set()

    async def release(self, sandbox_id: str) -> None:
        """The taker has the sandbox: forget it here (not an end) and remove its directory."""
        sb = self.manager.get(sandbox_id)
        if sandbox_id not in self._held:
            raise HandoverRefused(f"sandbox {sandbox_id} is not being handed over")
        self.manager._sandboxes.pop(sandbox_id, None)
        if self.manager.store is not None:
            self.manager.store.delete(sandbox_id)
        self.abort(sandbox_id)
        await asyncio.to_thread(shutil.rmtree, sb.restored.workdir, True)
        log.info("sandbox %s was handed over to another node; its files here are removed", sandbox_id)


async def adopt_paused(manager: "SandboxManager", record: SandboxRecord, build: TemplateBuild) -> "Sandbox":
    """Take over a paused sandbox whose files were put in ``record.workdir`` (this manager's
    ``data_root/sandboxes/<id>``), of ``build`` in this manager's store: its disk's backing file
    pointed at ``build``'s image, its record stored, the sandbox listed as paused here."""
    workdir = Path(record.workdir)
    old_build = Path(record.build_path)
    for image in sorted(workdir.rglob("*.qcow2")):
        name = qcow2_backing_name(image)
        if not name or not name.startswith("/"):
            continue  # a relative name stays right in the new directory
        old = Path(name)
        if old.parent != old_build and not old.is_relative_to(old_build):
            continue
        new = build.path / old.relative_to(old_build)
        fmt = "qcow2" if new.suffix == ".qcow2" else "raw"
        await qemu_img("rebase", "-u", "-f", "qcow2", "-F", fmt, "-b", str(new), str(image))
    rec = dataclasses.replace(record, build_path=str(build.path), pid=0, pid_started_at=0.0)
    sb = manager._paused_from_record(rec)
    manager._sandboxes[sb.id] = sb
    if manager.store is not None:
        manager.store.put(sb.record())
    log.info("sandbox %s: taken over paused from another node (%s)", sb.id, sb.pause_info.kind if sb.pause_info else "?")
    return sb
