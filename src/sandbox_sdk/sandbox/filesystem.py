"""TrEnv-X's filesystem API (``sandbox.filesystem``)."""

from __future__ import annotations

import inspect
import posixpath
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, List, Optional

from ..e2b._async import AsyncFilesystem, AsyncWatchHandle
from ..models import EntryInfo, FilesystemEventType
from ..models import FilesystemEvent as _CoreEvent


@dataclass
class FileInfo:
    """An entry of a directory listing."""

    is_dir: bool
    name: str
    path: str = ""
    size: int = 0


class FilesystemOperation(str, Enum):
    Create = "Create"
    Write = "Write"
    Remove = "Remove"
    Rename = "Rename"
    Chmod = "Chmod"


_OPERATIONS = {
    FilesystemEventType.CREATE: FilesystemOperation.Create,
    FilesystemEventType.WRITE: FilesystemOperation.Write,
    FilesystemEventType.REMOVE: FilesystemOperation.Remove,
    FilesystemEventType.RENAME: FilesystemOperation.Rename,
    FilesystemEventType.CHMOD: FilesystemOperation.Chmod,
}


@dataclass
class FilesystemEvent:
    """A change under a watched directory: ``path`` (absolute), ``name``, ``operation``,
    ``timestamp`` (ns, when it was received), ``is_dir`` (None: not reported)."""

    path: str
    name: str
    operation: Optional[FilesystemOperation]
    timestamp: int
    is_dir: Optional[bool] = None


class DirWatcher:
    """Watches one directory: add listeners, ``await start()``, ``await stop()``.

    Example::

        w = sandbox.filesystem.watch_dir("/tmp")
        w.add_event_listener(lambda e: print(e.operation, e.path))
        await w.start()
        await sandbox.filesystem.write("/tmp/x", "1")
        await w.stop()
    """

    def __init__(self, files: AsyncFilesystem, path: str, timeout: Optional[float], user: Optional[str]) -> None:
        self._files = files
        self.path = path
        self._timeout = timeout
        self._user = user
        self._listeners: List[Callable[[FilesystemEvent], Any]] = []
        self._handle: Optional[AsyncWatchHandle] = None

    def add_event_listener(self, listener: Callable[[FilesystemEvent], Any]) -> Callable[[], None]:
        """Register ``listener(event)``; returns a function that removes it."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    async def _on_event(self, event: _CoreEvent) -> None:
        ev = FilesystemEvent(
            path=posixpath.join(self.path, event.name) if event.name else self.path,
            name=event.name,
            operation=_OPERATIONS.get(event.type) if event.type else None,
            timestamp=time.time_ns(),
        )
        for listener in list(self._listeners):
            result = listener(ev)
            if inspect.isawaitable(result):
                await result

    async def start(self) -> None:
        """Start watching; returns once the watch is active."""
        if self._handle is None:
            self._handle = await self._files.watch_dir(
                self.path, on_event=self._on_event, user=self._user, request_timeout=self._timeout, timeout=0
            )

    async def stop(self) -> None:
        """Stop watching."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            await handle.stop()


class FilesystemManager:
    """Read, write, list and watch files in the sandbox (``sandbox.filesystem``).

    Every method takes ``timeout`` (seconds for the request; default 30, 0 = no limit).
    """

    def __init__(self, files: AsyncFilesystem, user: Optional[str] = None) -> None:
        self._files = files
        self._user = user

    async def read(self, path: str, timeout: Optional[float] = None) -> str:
        """A file's content as text. Example: ``text = await sandbox.filesystem.read("/etc/hostname")``"""
        return await self._files.read(path, "text", user=self._user, request_timeout=timeout)

    async def read_bytes(self, path: str, timeout: Optional[float] = None) -> bytes:
        """A file's content as bytes. Example: ``data = await sandbox.filesystem.read_bytes("/bin/ls")``"""
        return bytes(await self._files.read(path, "bytes", user=self._user, request_timeout=timeout))

    async def write(self, path: str, content: str, timeout: Optional[float] = None) -> None:
        """Write text to a file (parents created). Example: ``await sandbox.filesystem.write("/tmp/a", "hi")``"""
        await self._files.write(path, content, user=self._user, request_timeout=timeout)

    async def write_bytes(self, path: str, content: bytes, timeout: Optional[float] = None) -> None:
        """Write bytes to a file. Example: ``await sandbox.filesystem.write_bytes("/tmp/b", b"\\x00")``"""
        await self._files.write(path, bytes(content), user=self._user, request_timeout=timeout)

    async def list(self, path: str, timeout: Optional[float] = None) -> List[FileInfo]:
        """A directory's entries. Example: ``[f.name for f in await sandbox.filesystem.list("/")]``"""
        entries: List[EntryInfo] = await self._files.list(path, 1, user=self._user, request_timeout=timeout)
        return [FileInfo(is_dir=e.is_dir, name=e.name, path=e.path, size=e.size) for e in entries]

    async def remove(self, path: str, timeout: Optional[float] = None) -> None:
        """Remove a file or directory (with its contents); a path that does not exist is not an
        error. Example: ``await sandbox.filesystem.remove("/tmp/a")``"""
        await self._files.remove(path, user=self._user, request_timeout=timeout)

    async def make_dir(self, path: str, timeout: Optional[float] = None) -> None:
        """Create a directory and its parents. Example: ``await sandbox.filesystem.make_dir("/tmp/a/b")``"""
        await self._files.make_dir(path, user=self._user, request_timeout=timeout)

    async def exists(self, path: str, timeout: Optional[float] = None) -> bool:
        """Whether ``path`` exists. Example: ``await sandbox.filesystem.exists("/tmp/a")``"""
        return await self._files.exists(path, user=self._user, request_timeout=timeout)

    async def rename(self, old_path: str, new_path: str, timeout: Optional[float] = None) -> None:
        """Move a file. Example: ``await sandbox.filesystem.rename("/tmp/a", "/tmp/b")``"""
        await self._files.rename(old_path, new_path, user=self._user, request_timeout=timeout)

    def watch_dir(self, path: str, timeout: Optional[float] = None) -> DirWatcher:
        """A watcher for ``path`` (call ``await watcher.start()``); see :class:`DirWatcher`."""
        return DirWatcher(self._files, path, timeout, self._user)
