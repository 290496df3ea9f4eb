"""An advisory lock on a file (flock) that asyncio code waits for without blocking the loop.

Used where several processes may build the same cached thing at once (a kernel download, the
debootstrap base): the second waits for the first and then finds the result cached.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path


class AsyncFileLock:
    def __init__(self, path: Path, poll_s: float = 0.2) -> None:
        self.path = path
        self.poll_s = poll_s
        self.fd: int | None = None

    async def __aenter__(self) -> "AsyncFileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(self.poll_s)
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
