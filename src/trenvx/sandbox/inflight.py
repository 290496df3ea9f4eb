"""VMs being made: one small file per VM under ``data_root/run/inflight/``, naming the process making it.

A sandbox's VMM outlives the server that started it (a server that crashes leaves its sandboxes
running for the next one to adopt, see :mod:`.orphan_watchdog`). A VM that is not yet recorded
in the state store -- a create, a resume or a pool refill in progress -- has nobody to adopt it
if that process dies meanwhile. This file says whose it was: the next server (or the orphan
watchdog) ends the VMM of every file whose writer is gone and removes what it was making
(:func:`stale`, :func:`end_vmm`). The writer removes its file once the VM is recorded, or gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..layout import DataRoot

import psutil

INFLIGHT = "inflight"
POOLED_MARKER = "pooled"
"""The file in a pooled VM's directory (a VM made ahead of creates, not yet a sandbox): its VMM's
``pid`` and ``started_at``, written by :mod:`.pool`."""


def pooled_vms(sandboxes_dir: Path) -> Iterator[tuple[Path, int, float]]:
    """``(directory, pid, started_at)`` of every pooled VM's directory under ``sandboxes_dir``
    (pid 0 when its marker cannot be read)."""
    try:
        dirs = list(sandboxes_dir.iterdir())
    except OSError:
        return
    for d in dirs:
        marker = d / POOLED_MARKER
        if not marker.is_file():
            continue
        try:
            info = json.loads(marker.read_text())
            yield d, int(info["pid"]), float(info["started_at"])
        except (OSError, ValueError, KeyError, TypeError):
            yield d, 0, 0.0


@lru_cache(maxsize=4)
def _started_at(pid: int) -> float:
    return psutil.Process(pid).create_time()


def _path(run_dir: Path, sandbox_id: str) -> Path:
    return run_dir / INFLIGHT / sandbox_id


def mark(run_dir: Path, sandbox_id: str) -> None:
    """This process starts making the VM of ``sandbox_id`` (before its VMM is spawned)."""
    pid = os.getpid()
    started = _started_at(pid)
    path = _path(run_dir, sandbox_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "started_at": started}))


def clear(run_dir: Path, sandbox_id: str) -> None:
    """The VM of ``sandbox_id`` is recorded (or gone): nothing for a successor to clean."""
    with contextlib.suppress(FileNotFoundError):
        _path(run_dir, sandbox_id).unlink()


def _writer_alive(info: dict[str, object]) -> bool:
    try:
        p = psutil.Process(int(info["pid"]))  # type: ignore[call-overload]
        return p.status() != psutil.STATUS_ZOMBIE and abs(p.create_time() - float(info["started_at"])) <= 1.0  # type: ignore[arg-type]
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def stale(run_dir: Path) -> list[str]:
    """Sandbox ids whose maker is gone (its process ended, or its pid is another process's now)."""
    try:
        entries = list((run_dir / INFLIGHT).iterdir())
    except OSError:
        return []
    out = []
    for p in entries:
        try:
            info = json.loads(p.read_text())
        except (OSError, ValueError):
            info = {}
        if not _writer_alive(info if isinstance(info, dict) else {}):
            out.append(p.name)
    return sorted(out)


def vmm_of(workdir: Path, sandbox_id: str) -> psutil.Process | None:
    """The live VMM process recorded in ``workdir/vm/vmm.pid`` if its command line names
    ``sandbox_id`` (QEMU's ``-name trenvx-<id>``, the other VMMs' socket paths): never another process
    that got the pid."""
    try:
        pid = int((workdir / "vm" / "vmm.pid").read_text().strip())
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        if any(sandbox_id in arg for arg in p.cmdline()):
            return p
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def end_process(p: psutil.Process, wait_s: float = 5.0) -> bool:
    """SIGKILL ``p`` and wait up to ``wait_s`` for it to be gone (reaped by whoever is its parent)."""
    with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
        p.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def end_vmm(workdir: Path, sandbox_id: str, wait_s: float = 5.0) -> bool:
    """End the VMM of ``sandbox_id`` in ``workdir`` if one runs; whether one was ended."""
    p = vmm_of(workdir, sandbox_id)
    if p is None:
        return False
    end_process(p, wait_s)
    return True


def reap_stale(
    data_root: DataRoot,
    state_of: Callable[[str], str | None],
    before_remove: Callable[[Path], None] | None = None,
) -> list[str]:
    """Clean up after every VM whose maker is gone; the ids cleaned.

    ``state_of(id)`` is the sandbox's recorded state (``running``, ``paused``, ``exited``, or None
    when it was never recorded). A running one was recorded just before its maker died: it is
    left to be adopted. Otherwise its VMM is ended; a paused one keeps its files (an interrupted
    resume: it stays paused), any other loses its directory (``before_remove(workdir)`` first,
    e.g. to release its network slot).
    """
    run_dir = data_root.run
    cleaned = []
    for sid in stale(run_dir):
        state = state_of(sid)
        if state == "running":
            clear(run_dir, sid)
            continue
        workdir = data_root.sandbox_dir(sid)
        end_vmm(workdir, sid)
        if state != "paused":
            if before_remove is not None:
                with contextlib.suppress(Exception):
                    before_remove(workdir)
            shutil.rmtree(workdir, ignore_errors=True)
        clear(run_dir, sid)
        cleaned.append(sid)
    return cleaned
