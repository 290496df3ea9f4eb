"""Directory watching: inotify through ctypes, with a polling fallback.

A :class:`DirWatcher` yields ``(name, type)`` pairs, ``name`` relative to the watched
directory and ``type`` one of envd's ``EVENT_TYPE_*`` names, mapped like fsnotify (which
envd uses): create/moved-to -> CREATE, modify -> WRITE, delete -> REMOVE,
moved-from -> RENAME, attrib -> CHMOD. Under a recursive watch, what a new directory already
holds when its watch is added is reported as created, once, as envd's fsnotify does (see
:meth:`InotifyWatcher.read`); the polling watcher finds it by comparing snapshots.

:func:`network_filesystem` tells whether a directory lives on a network filesystem (by the
``statfs(2)`` magic numbers envd checks), where inotify misses changes made elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import stat
import struct
import time
from collections import deque
from typing import Protocol

log = logging.getLogger("trenvx_agent.watch")

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000

WATCH_MASK = IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF

_EVENT_HEADER = struct.Struct("iIII")
_MAX_EVENT_SIZE = _EVENT_HEADER.size + 256  # a name is at most NAME_MAX (255) bytes and a NUL
_READ_SIZE = 64 * 1024

#: (inotify bit, envd event type), in the order envd reports several ops of one event.
_MAPPING = (
    (IN_CREATE | IN_MOVED_TO, "EVENT_TYPE_CREATE"),
    (IN_MOVED_FROM | IN_MOVE_SELF, "EVENT_TYPE_RENAME"),
    (IN_ATTRIB, "EVENT_TYPE_CHMOD"),
    (IN_MODIFY, "EVENT_TYPE_WRITE"),
    (IN_DELETE | IN_DELETE_SELF, "EVENT_TYPE_REMOVE"),
)

FsEvent = tuple[str, str]


class DirWatcher(Protocol):
    """Something that reports filesystem events under one directory."""

    root: str

    def read(self, timeout: float) -> list[FsEvent]:
        """Events that happened, waiting up to ``timeout`` seconds for the first one."""
        ...

    def close(self) -> None: ...


class _Libc:
    """The inotify functions of libc, or None when unavailable."""

    _lib: ctypes.CDLL | None = None
    _loaded = False

    @classmethod
    def get(cls) -> ctypes.CDLL | None:
        if not cls._loaded:
            cls._loaded = True
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                lib.inotify_init1.argtypes = [ctypes.c_int]
                lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
                lib.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
                lib.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
                cls._lib = lib
            except (OSError, AttributeError):
                cls._lib = None
        return cls._lib


#: ``statfs(2)`` ``f_type`` of the filesystems envd calls network mounts (linux/magic.h).
NETWORK_FS_MAGIC = {
    0x6969: "nfs",
    0xFF534D42: "cifs",
    0x517B: "smb",
    0xFE534D42: "smb2",
    0x65735546: "fuse",
}
#: Larger than ``struct statfs`` on every Linux ABI (120 bytes on x86_64 and aarch64).
_STATFS_SIZE = 256


def filesystem_magic(path: str) -> int | None:
    """The ``f_type`` of the filesystem holding ``path``; None when libc cannot be used."""
    lib = _Libc.get()
    if lib is None:
        return None
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if lib.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"statfs {path}: {os.strerror(err)}")
    # f_type is the first member, a C long (__fsword_t); magic numbers are 32-bit.
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def network_filesystem(path: str) -> str | None:
    """The kind of network filesystem (``nfs``, ``cifs``, ``smb``, ``smb2``, ``fuse``) holding ``path``, else None."""
    magic = filesystem_magic(path)
    return NETWORK_FS_MAGIC.get(magic) if magic is not None else None


class InotifyWatcher:
    """Watches a directory (and, if recursive, its subdirectories) with inotify."""

    def __init__(self, root: str, recursive: bool) -> None:
        lib = _Libc.get()
        if lib is None:
            raise OSError(errno.ENOSYS, "inotify is not available")
        self._lib = lib
        self.root = root
        self.recursive = recursive
        fd = lib.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self._fd = fd
        self._dirs: dict[int, str] = {}
        try:
            self._add(root)
            if recursive:
                self._add_tree(root)
        except OSError:
            os.close(fd)
            raise

    def _add(self, path: str) -> None:
        wd = self._lib.inotify_add_watch(self._fd, os.fsencode(path), WATCH_MASK | IN_ONLYDIR)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot watch {path}: {os.strerror(err)}")
        self._dirs[wd] = path

    def _add_tree(self, top: str) -> list[str]:
        """Watch every directory under ``top`` (not ``top`` itself); return every entry found.

        Top-down, so each directory is watched before it is listed: what appears in it after
        the listing is reported by inotify, what was there before by the caller."""
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(top):
            for name in dirnames:
                path = os.path.join(dirpath, name)
                found.append(path)
                if os.path.islink(path):
                    continue  # os.walk does not descend into it either
                try:
                    self._add(path)
                except OSError as exc:
                    log.debug("not watching %s: %s", path, exc)
            found.extend(os.path.join(dirpath, name) for name in filenames)
        return found

    def _read_raw(self) -> list[tuple[int, int, str]]:
        """The events queued now, as ``(wd, mask, name)``, without waiting."""
        raw: list[tuple[int, int, str]] = []
        while True:
            try:
                buf = os.read(self._fd, _READ_SIZE)
            except OSError:  # BlockingIOError: the queue is empty
                return raw
            offset = 0
            while offset + _EVENT_HEADER.size <= len(buf):
                wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(buf, offset)
                offset += _EVENT_HEADER.size
                raw.append((wd, mask, os.fsdecode(buf[offset:offset + length].rstrip(b"\x00"))))
                offset += length
            if len(buf) < _READ_SIZE - _MAX_EVENT_SIZE:  # the next event would have fit: none is left
                return raw

    def read(self, timeout: float) -> list[FsEvent]:
        """Events since the last call.

        Under a recursive watch, a new directory (made or moved in) gets watches for itself and
        its subdirectories, and every entry already inside it is reported as created, as envd's
        fsnotify does: ``mkdir -p a/b/c && touch a/b/c/f`` reports ``a``, ``a/b``, ``a/b/c``
        and ``a/b/c/f``, however far the commands got before the watches were added. An entry
        made between a watch's addition and the listing that found it is also in inotify's
        queue; that second create is dropped (``reported``): each such walk is followed by a
        read of everything queued until then, processed in this same call."""
        if self._fd < 0:
            return []
        try:
            ready, _, _ = select.select([self._fd], [], [], max(0.0, timeout))
        except (OSError, ValueError):
            return []
        if not ready:
            return []
        pending = deque(self._read_raw())
        reported: set[str] = set()  # entries reported from a walk in this call
        events: list[FsEvent] = []
        while pending:
            wd, mask, name = pending.popleft()
            if mask & IN_Q_OVERFLOW:
                log.warning("inotify queue overflow under %s; events were lost", self.root)
                continue
            if mask & IN_IGNORED:
                self._dirs.pop(wd, None)
                continue
            directory = self._dirs.get(wd)
            if directory is None:
                continue
            path = os.path.join(directory, name) if name else directory
            if not name and directory != self.root:
                continue  # a subdirectory's own delete/move is reported by its parent
            if mask & (IN_DELETE | IN_MOVED_FROM):
                reported.discard(path)  # a create after this one is a new entry
            new_dir = self.recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO)
            if mask & (IN_CREATE | IN_MOVED_TO) and path in reported:
                mask &= ~(IN_CREATE | IN_MOVED_TO)  # reported from a walk already
            rel = os.path.relpath(path, self.root)
            events.extend((rel, kind) for bit, kind in _MAPPING if mask & bit)
            if new_dir:
                found: list[str] = []
                try:
                    self._add(path)
                    found = self._add_tree(path)
                except OSError:
                    pass  # gone again already: its removal follows in the queue
                for entry in found:
                    if entry not in reported:
                        reported.add(entry)
                        events.append((os.path.relpath(entry, self.root), "EVENT_TYPE_CREATE"))
                pending.extend(self._read_raw())
        return events

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1


class PollingWatcher:
    """Watches by comparing directory snapshots (when inotify is not available)."""

    def __init__(self, root: str, recursive: bool, interval: float = 0.2) -> None:
        self.root = root
        self.recursive = recursive
        self.interval = interval
        self._closed = False
        self._snapshot = self._scan()

    def _scan(self) -> dict[str, tuple[int, int, int, int]]:
        snap: dict[str, tuple[int, int, int, int]] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                snap[os.path.relpath(path, self.root)] = (st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode)
            if not self.recursive:
                break
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        return snap

    def read(self, timeout: float) -> list[FsEvent]:
        deadline = time.monotonic() + max(0.0, timeout)
        while not self._closed:
            current = self._scan()
            events: list[FsEvent] = []
            for name, info in current.items():
                old = self._snapshot.get(name)
                if old is None or old[0] != info[0]:
                    events.append((name, "EVENT_TYPE_CREATE"))
                else:
                    if old[1] != info[1] or old[2] != info[2]:
                        if not stat.S_ISDIR(info[3]):
                            events.append((name, "EVENT_TYPE_WRITE"))
                    if old[3] != info[3]:
                        events.append((name, "EVENT_TYPE_CHMOD"))
            for name in self._snapshot:
                if name not in current:
                    events.append((name, "EVENT_TYPE_REMOVE"))
            self._snapshot = current
            if events:
                return events
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            time.sleep(min(self.interval, remaining))
        return []

    def close(self) -> None:
        self._closed = True


def open_watcher(root: str, recursive: bool, *, force_polling: bool = False) -> DirWatcher:
    """An inotify watcher, or a polling one when inotify cannot be used (``PermissionError`` when
    the caller may not read ``root``)."""
    if not force_polling:
        try:
            return InotifyWatcher(root, recursive)
        except PermissionError:
            raise  # the caller may not read ``root``: polling would see nothing either
        except OSError as exc:
            log.warning("inotify unavailable for %s (%s); falling back to polling", root, exc)
    return PollingWatcher(root, recursive)
