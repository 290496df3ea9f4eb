"""Which pages of a VM's RAM file mapping a VMM process has in memory, and giving back those it
faulted in only to read them.

A sandbox's guest RAM is its template's memory file mapped privately: a page it only reads is the
file's page in the host's page cache, a page it writes becomes its own (anonymous). A migration
of that RAM (a checkpoint: a snapshot or a fork) reads every page, so afterwards the VMM maps all
of the file, ~200 MiB more of it for a 256 MiB guest, pages no one else maps and the guest never
needed. :func:`file_pages_present` (``/proc/<pid>/pagemap``: present, and a file page, not an
anonymous one) taken before and after tells which; :func:`page_out` gives them back with
``process_madvise(MADV_PAGEOUT)``, which reclaims only pages no other process maps. The pages
the guest wrote are anonymous and never in the set.

Linux 5.10+ (process_madvise); elsewhere :func:`page_out` raises ``OSError`` and the caller goes on.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PRESENT = 1 << 63
FILE_OR_SHARED = 1 << 61
SYS_PROCESS_MADVISE = 440  # x86-64 and aarch64 (the generic table)
MADV_PAGEOUT = 21
IOV_MAX = 1024
_READ_ENTRIES = 1 << 15


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def mapping_of(pid: int, path: Path) -> tuple[int, int] | None:
    """(start address, length) of the process's mapping of the file ``path``, or None."""
    want = {str(path), str(path.resolve())}
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n").removesuffix(" (deleted)") in want:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    return start, end - start
    except OSError:
        return None
    return None


def file_pages_present(pid: int, start: int, length: int) -> bytearray:
    """One byte per page of [start, start+length): 1 where the process maps a page of the file
    (present, not anonymous), else 0."""
    pages = length // PAGE_SIZE
    out = bytearray(pages)
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
        index = 0
        while index < pages:
            n = min(_READ_ENTRIES, pages - index)
            f.seek((start // PAGE_SIZE + index) * 8)
            data = f.read(n * 8)
            for i, (entry,) in enumerate(struct.iter_unpack("<Q", data)):
                if entry & PRESENT and entry & FILE_OR_SHARED:
                    out[index + i] = 1
            index += len(data) // 8
            if not data:
                break
    return out


def page_out(pid: int, start: int, pages: bytearray) -> int:
    """``MADV_PAGEOUT`` on the runs of pages set in ``pages`` (of the mapping at ``start``) of the
    process ``pid``; bytes advised. Raises ``OSError``."""
    runs: list[tuple[int, int]] = []
    i, n = 0, len(pages)
    while i < n:
        if not pages[i]:
            i += 1
            continue
        j = i
        while j < n and pages[j]:
            j += 1
        runs.append((start + i * PAGE_SIZE, (j - i) * PAGE_SIZE))
        i = j
    if not runs:
        return 0
    pidfd = os.pidfd_open(pid)
    done = 0
    try:
        for k in range(0, len(runs), IOV_MAX):
            batch = runs[k:k + IOV_MAX]
            iov = (_Iovec * len(batch))(*(_Iovec(a, size) for a, size in batch))
            r = _libc.syscall(SYS_PROCESS_MADVISE, pidfd, iov, len(batch), MADV_PAGEOUT, 0)
            if r < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"process_madvise(MADV_PAGEOUT) on pid {pid}: {os.strerror(err)}")
            done += r
    finally:
        os.close(pidfd)
    return done
