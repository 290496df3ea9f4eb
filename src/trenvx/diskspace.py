"""Free space on the data root, and errors that say when the data root is full.

Everything trenvx writes lives under ``data_root`` (template builds, sandboxes' disks, paused
sandboxes' memory): when its filesystem fills up, writes fail with ``ENOSPC`` in many places
(a Python ``write``, ``mkfs.ext4``'s stderr, a QEMU process killed by ``SIGBUS`` when its shared
RAM file cannot grow). The builder and the pause ask :func:`space_problem` after a failure and,
when the data root is (nearly) full, report that, with the free space and what was needed,
instead of the symptom.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

MiB = 1 << 20
NEARLY_FULL_BYTES = 16 * MiB
"""Below this much free space, a failed write is taken for a full data root whatever its symptom."""
NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "database or disk is full")


class DataRootFull(Exception):
    """The data root's filesystem has no room for what was asked; the message says how much is free
    and about how much was needed. Nothing was left half-written."""


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of ``path`` (0 if it cannot be read)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def mib(n: int) -> str:
    return f"{max(n, 0) / MiB:.0f} MiB"


def is_enospc(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it came from) is a write that found no space."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(e) for t in NO_SPACE_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def space_problem(exc: BaseException, root: Path) -> bool:
    """Whether a failure ``exc`` of work on ``root`` is the data root being full: an ENOSPC, or
    any failure while under :data:`NEARLY_FULL_BYTES` are free (a QEMU process killed by SIGBUS
    says nothing about space)."""
    return is_enospc(exc) or free_bytes(root) < NEARLY_FULL_BYTES


def full_message(root: Path, what: str, need_bytes: int | None) -> str:
    """``the data root /x is full (3 MiB free): <what> needs about N MiB; free space there ...``"""
    need = f" needs about {mib(need_bytes)}" if need_bytes else " did not fit"
    return (f"the data root {root} is full ({mib(free_bytes(root))} free): {what}{need}; "
            "free space there (remove sandboxes, old template builds) or give data_root a larger filesystem")
