"""An advisory lock on a file (flock) that asyncio code waits for without blocking the loop.

Used where several processes may build the same cached thing at once (a kernel download, the
debootstrap base, a template): the second waits for the first and then finds the result cached.
The holder writes its pid into the file, so that a waiter can say whom it waits for. The kernel
releases a flock when its holder dies, however it dies, so a crashed holder blocks no one; the
descriptor is close-on-exec, so processes the holder starts (a VMM) do not keep the lock.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Callable
from pathlib import Path


def lock_holder(path: Path) -> int | None:
    """The pid written by the lock's last holder (None if none is written)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class AsyncFileLock:
    """``async with AsyncFileLock(path, on_wait=...)``: exclusive across processes (and across
    instances in one process). ``on_wait(pid)`` is called once, with the holder's pid, when the
    lock is taken and this one has to wait; ``waited`` tells afterwards whether it did."""

    def __init__(self, path: Path, poll_s: float = 0.2, on_wait: Callable[[int | None], None] | None = None) -> None:
        self.path = path
        self.poll_s = poll_s
        self.on_wait = on_wait
        self.fd: int | None = None
        self.waited = False

    async def __aenter__(self) -> "AsyncFileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not self.waited:
                        self.waited = True
                        if self.on_wait is not None:
                            self.on_wait(lock_holder(self.path))
                    await asyncio.sleep(self.poll_s)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
