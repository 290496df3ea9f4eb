"""envd's ``filesystem.Filesystem`` service: Stat, ListDir, MakeDir, Move, Remove, watches.

Operations run with the request's user's filesystem identity (:func:`.users.acting_as`), in
the request's thread and in a CreateWatcher's collecting thread: the guest kernel refuses what
the user may not touch (``permission_denied``), and what they create is the user's. Paths
resolve like envd (see :mod:`.users`); entries carry absolute paths and the entry's user
metadata (``user.e2b.*`` xattrs, :mod:`.xattrs`). Watches send each event's entry when asked
(``includeEntry``) and refuse directories on network filesystems (NFS, SMB/CIFS, FUSE) unless
the request allows them (``allowNetworkMounts``), like envd 0.6.4.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import shutil
import stat
import threading
import time
import uuid
from typing import Any

from . import pbjson, xattrs
from .connect import ConnectError, RpcContext, ServerStream, StreamClosed
from .state import AgentState
from .users import User, acting_as, ensure_dirs, lookup_user, resolve_path
from .watch import DirWatcher, FsEvent, network_filesystem, open_watcher

log = logging.getLogger("trenvx_agent.filesystem")

#: Events kept per CreateWatcher watcher between two GetWatcherEvents calls.
MAX_PENDING_EVENTS = 10000


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _type_name(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "FILE_TYPE_DIRECTORY"
    if stat.S_ISLNK(mode):
        return "FILE_TYPE_SYMLINK"
    return "FILE_TYPE_FILE"


def entry_info(path: str, st: os.stat_result | None = None) -> dict[str, Any]:
    """The ``EntryInfo`` of ``path`` (not following a final symlink for the entry itself).

    A symlink reports its target's type when the target exists (so links to directories
    list as directories), ``symlinkTarget`` and ``isSymlink``. ``metadata`` is the
    ``user.e2b.*`` set of the file (of a symlink's target, as envd reads it), when there is one.
    """
    if st is None:
        st = os.lstat(path)
    info: dict[str, Any] = {
        "name": os.path.basename(path.rstrip("/")) or "/",
        "type": _type_name(st.st_mode),
        "path": path,
        "size": str(st.st_size),
        "mode": stat.S_IMODE(st.st_mode) & 0o777,
        "permissions": stat.filemode(st.st_mode),
        "owner": _owner(st.st_uid),
        "group": _group(st.st_gid),
        "modifiedTime": pbjson.timestamp(st.st_mtime_ns),
    }
    if stat.S_ISLNK(st.st_mode):
        info["isSymlink"] = True
        try:
            info["symlinkTarget"] = os.path.realpath(path)
            target = os.stat(path)
            info["type"] = _type_name(target.st_mode)
        except OSError:
            pass
    metadata = xattrs.read(path)
    if metadata:
        info["metadata"] = metadata
    return pbjson.prune(info)


def _not_found(path: str, what: str = "path") -> ConnectError:
    return ConnectError("not_found", f"{what} not found: {path}")


def _os_error(exc: OSError, path: str) -> ConnectError:
    if isinstance(exc, FileNotFoundError):
        return _not_found(path)
    if isinstance(exc, PermissionError):
        return ConnectError("permission_denied", f"permission denied: {path}")
    if isinstance(exc, NotADirectoryError):
        return ConnectError("invalid_argument", f"a path component is not a directory: {path}")
    if isinstance(exc, FileExistsError):
        return ConnectError("already_exists", f"already exists: {path}")
    return ConnectError("internal", f"{exc.strerror or exc}: {path}")


class _PendingWatcher:
    """A CreateWatcher watcher: a thread collecting events for GetWatcherEvents."""

    def __init__(self, watcher: DirWatcher, include_entry: bool, user: User) -> None:
        self.watcher = watcher
        self.user = user
        self.include_entry = include_entry
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._collect, name="watcher", daemon=True)
        self.thread.start()

    def _collect(self) -> None:
        # The watcher adds watches on new directories and reads entries as it goes: as the user.
        try:
            with acting_as(self.user):
                self._collect_events()
        except Exception:
            log.exception("watcher of %s stopped", self.watcher.root)

    def _collect_events(self) -> None:
        while not self.stopped.is_set():
            batch = self.watcher.read(0.5)
            if not batch:
                continue
            with self.lock:
                for event in batch:
                    if len(self.events) < MAX_PENDING_EVENTS:
                        self.events.append(_fs_event(self.watcher.root, event, self.include_entry))

    def take(self) -> list[dict[str, Any]]:
        with self.lock:
            events, self.events = self.events, []
        return events

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=2)
        self.watcher.close()


def _fs_event(root: str, event: FsEvent, include_entry: bool) -> dict[str, Any]:
    name, kind = event
    out: dict[str, Any] = {"name": name, "type": kind}
    if include_entry:
        try:
            out["entry"] = entry_info(os.path.normpath(os.path.join(root, name)))
        except OSError:
            pass
    return out


class FilesystemService:
    """envd's ``filesystem.Filesystem`` service."""

    def __init__(self, state: AgentState, *, force_polling: bool = False) -> None:
        self.state = state
        self.force_polling = force_polling
        self._watchers: dict[str, _PendingWatcher] = {}
        self._lock = threading.Lock()

    def _user(self, ctx: RpcContext) -> User:
        return lookup_user(ctx.basic_user or self.state.default_user)

    def _path(self, ctx: RpcContext, req: dict[str, Any], field: str = "path") -> tuple[str, User]:
        user = self._user(ctx)
        raw = pbjson.get_str(req, field)
        return resolve_path(raw, user, self.state.default_workdir), user

    # ------------------------------------------------------------------ unary RPCs
    def stat(self, ctx: RpcContext, req: dict[str, Any]) -> dict[str, Any]:
        path, user = self._path(ctx, req)
        with acting_as(user):
            return self._stat(path)

    def _stat(self, path: str) -> dict[str, Any]:
        try:
            return {"entry": entry_info(path)}
        except OSError as exc:
            raise _os_error(exc, path) from None

    def list_dir(self, ctx: RpcContext, req: dict[str, Any]) -> dict[str, Any]:
        path, user = self._path(ctx, req)
        depth = pbjson.get_int(req, "depth", 0) or 1
        if depth < 0:
            raise ConnectError("invalid_argument", "depth must not be negative")
        with acting_as(user):
            return self._list_dir(path, depth)

    def _list_dir(self, path: str, depth: int) -> dict[str, Any]:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise _not_found(path, "directory") from None
        except OSError as exc:
            raise _os_error(exc, path) from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConnectError("invalid_argument", f"path is not a directory: {path}")
        real = os.path.realpath(path)
        entries: list[dict[str, Any]] = []
        try:
            self._walk(real, path, depth, entries)
        except PermissionError:
            raise ConnectError("permission_denied", f"permission denied: cannot read directory {path}") from None
        except OSError as exc:
            raise ConnectError("internal", f"error reading directory {path}: {exc.strerror or exc}") from None
        return pbjson.prune({"entries": entries})

    def _walk(self, real_dir: str, shown_dir: str, depth: int, out: list[dict[str, Any]]) -> None:
        with os.scandir(real_dir) as it:
            items = sorted(it, key=lambda e: e.name)
        for item in items:
            shown = os.path.join(shown_dir, item.name)
            try:
                st = item.stat(follow_symlinks=False)
            except OSError:
                continue
            out.append(entry_info(shown, st))
            if depth > 1 and stat.S_ISDIR(st.st_mode):
                try:
                    self._walk(item.path, shown, depth - 1, out)
                except PermissionError:
                    continue

    def make_dir(self, ctx: RpcContext, req: dict[str, Any]) -> dict[str, Any]:
        path, user = self._path(ctx, req)
        with acting_as(user):
            return self._make_dir(path)

    def _make_dir(self, path: str) -> dict[str, Any]:
        if os.path.lexists(path):
            if os.path.isdir(path):
                raise ConnectError("already_exists", f"directory already exists: {path}")
            raise ConnectError("invalid_argument", f"path already exists but is not a directory: {path}")
        ensure_dirs(path)
        return {"entry": entry_info(path)}

    def move(self, ctx: RpcContext, req: dict[str, Any]) -> dict[str, Any]:
        user = self._user(ctx)
        source = resolve_path(pbjson.get_str(req, "source"), user, self.state.default_workdir)
        destination = resolve_path(pbjson.get_str(req, "destination"), user, self.state.default_workdir)
        with acting_as(user):
            return self._move(source, destination)

    def _move(self, source: str, destination: str) -> dict[str, Any]:
        try:
            os.lstat(source)
        except FileNotFoundError:
            raise _not_found(source, "source") from None
        except OSError as exc:
            raise _os_error(exc, source) from None
        ensure_dirs(os.path.dirname(destination))
        try:
            os.rename(source, destination)
        except OSError as exc:
            if exc.errno == 18:  # EXDEV: across filesystems
                try:
                    shutil.move(source, destination)
                except OSError as exc2:
                    raise _os_error(exc2, source) from None
            else:
                raise _os_error(exc, destination) from None
        return {"entry": entry_info(destination)}

    def remove(self, ctx: RpcContext, req: dict[str, Any]) -> dict[str, Any]:
        # Like envd (os.RemoveAll): removing a path that does not exist succeeds, and so does
        # losing a race with another remover. The answer carries no entry then.
        path, user = self._path(ctx, req)
        with acting_as(user):
            return self._remove(path)

    def _remove(self, path: str) -> dict[str, Any]:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise _os_error(exc, path) from None
        entry = entry_info(path, st)
        try:
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _os_error(exc, path) from None
        return {"entry": entry}

    # ------------------------------------------------------------------ watches
    def _open_watch(self, path: str, req: dict[str, Any]) -> DirWatcher:
        """A watcher of ``path``; called inside :func:`acting_as` (inotify needs read access)."""
        try:
            st = os.stat(path)
            if stat.S_ISDIR(st.st_mode):
                os.close(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))  # may the user read it?
        except OSError as exc:
            raise _os_error(exc, path) from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConnectError("invalid_argument", f"path is not a directory: {path}")
        try:
            network = network_filesystem(path)
        except OSError as exc:
            raise ConnectError("internal", f"cannot tell which filesystem holds {path}: {exc}") from None
        if network and not pbjson.get_bool(req, "allowNetworkMounts"):
            raise ConnectError(
                "invalid_argument",
                f"cannot watch {path}: it is on a network filesystem ({network}), where events may be late or "
                "missing; pass allow_network_mounts=True to watch it anyway",
            )
        try:
            return open_watcher(path, pbjson.get_bool(req, "recursive"), force_polling=self.force_polling)
        except PermissionError:
            raise ConnectError("permission_denied", f"permission denied: cannot watch {path}") from None
        except OSError as exc:
            raise ConnectError("internal", f"cannot watch {path}: {exc}") from None

    def watch_dir(self, ctx: RpcContext, req: dict[str, Any], stream: ServerStream) -> None:
        path, user = self._path(ctx, req)
        with acting_as(user):
            self._watch_dir(path, ctx, req, stream)

    def _watch_dir(self, path: str, ctx: RpcContext, req: dict[str, Any], stream: ServerStream) -> None:
        watcher = self._open_watch(path, req)
        include_entry = pbjson.get_bool(req, "includeEntry")
        try:
            stream.send({"start": {}})
            last_sent = time.monotonic()
            while True:
                if ctx.deadline is not None and time.monotonic() >= ctx.deadline:
                    raise ConnectError("deadline_exceeded", "watch reached its timeout")
                wait = max(0.0, min(1.0, ctx.keepalive_interval - (time.monotonic() - last_sent)))
                events = watcher.read(wait)
                if events:
                    for event in events:
                        stream.send({"filesystem": _fs_event(watcher.root, event, include_entry)})
                    last_sent = time.monotonic()
                    continue
                if ctx.client_gone():
                    return
                if time.monotonic() - last_sent >= ctx.keepalive_interval:
                    stream.send({"keepalive": {}})
                    last_sent = time.monotonic()
        except StreamClosed:
            return
        finally:
            watcher.close()

    def create_watcher(self, ctx: RpcContext, req: dict[str, Any]) -> dict[str, Any]:
        path, user = self._path(ctx, req)
        with acting_as(user):
            watcher = self._open_watch(path, req)
        watcher_id = uuid.uuid4().hex
        with self._lock:
            self._watchers[watcher_id] = _PendingWatcher(watcher, pbjson.get_bool(req, "includeEntry"), user)
        return {"watcherId": watcher_id}

    def _get_watcher(self, req: dict[str, Any]) -> tuple[str, _PendingWatcher]:
        watcher_id = pbjson.get_str(req, "watcherId")
        with self._lock:
            pending = self._watchers.get(watcher_id)
        if pending is None:
            raise ConnectError("not_found", f"watcher '{watcher_id}' not found")
        return watcher_id, pending

    def get_watcher_events(self, ctx: RpcContext, req: dict[str, Any]) -> dict[str, Any]:
        _, pending = self._get_watcher(req)
        return pbjson.prune({"events": pending.take()})

    def remove_watcher(self, ctx: RpcContext, req: dict[str, Any]) -> dict[str, Any]:
        watcher_id, pending = self._get_watcher(req)
        with self._lock:
            self._watchers.pop(watcher_id, None)
        pending.stop()
        return {}

    def shutdown(self) -> None:
        with self._lock:
            watchers, self._watchers = list(self._watchers.values()), {}
        for pending in watchers:
            pending.stop()


__all__ = ["FilesystemService", "entry_info"]
