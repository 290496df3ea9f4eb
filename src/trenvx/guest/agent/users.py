"""Users and paths: who a request runs as, and how its paths resolve (like envd).

A request names its user with ``Authorization: Basic base64("name:")`` (RPCs) or the
``username`` query parameter (``/files``); without one the default user (root unless
``/init`` set ``defaultUser``) is used. Relative paths and ``~`` resolve against that
user's home directory.

File operations done for a user run with that user's filesystem identity (:func:`acting_as`):
the guest kernel's own checks (modes, ACLs, directories, symlinks) decide what a request may
touch, exactly as for a command the user runs, and what it creates is the user's.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import os
import platform
import pwd
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .connect import ConnectError


@dataclass(frozen=True)
class User:
    """A resolved account of the guest."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: tuple[int, ...]


def lookup_user(name: str) -> User:
    """The account called ``name``; ``invalid_argument`` naming it if there is none."""
    try:
        entry = pwd.getpwnam(name)
    except (KeyError, ValueError):
        raise ConnectError("invalid_argument", f"invalid user '{name}': no such user in the sandbox") from None
    try:
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except OSError:
        groups = (entry.pw_gid,)
    return User(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir or "/", entry.pw_shell, groups)


def basic_auth_user(header: str | None) -> str | None:
    """The username in ``Authorization: Basic base64("user:")``, or None when absent."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=False).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ConnectError("invalid_argument", "malformed Basic authorization header") from None
    name = decoded.split(":", 1)[0]
    return name or None


def resolve_path(path: str, user: User, default_workdir: str | None = None) -> str:
    """An absolute, normalised path: ``~`` and relative paths resolve in ``user``'s home.

    An empty path means the default working directory (or the home directory).
    """
    if "\x00" in path:
        raise ConnectError("invalid_argument", "path contains a NUL byte")
    if not path:
        path = default_workdir or user.home
    if path.startswith("~"):
        if len(path) > 1 and path[1] != "/":
            raise ConnectError("invalid_argument", f"cannot expand '{path}': only '~' and '~/...' are supported")
        path = user.home + path[1:]
    if not os.path.isabs(path):
        path = os.path.join(user.home, path)
    return os.path.normpath(path)


def ensure_dirs(path: str) -> None:
    """Create ``path`` and its missing parents (mode 0755, less the umask).

    Called inside :func:`acting_as`: the directories are the user's, and a parent the user
    may not write to refuses with ``permission_denied``. Raises ``invalid_argument`` when a
    component exists but is not a directory.
    """
    missing: list[str] = []
    current = path
    while True:
        try:
            if stat.S_ISDIR(os.stat(current).st_mode):
                break
            raise ConnectError("invalid_argument", f"path component is not a directory: {current}")
        except (FileNotFoundError, NotADirectoryError):
            pass  # missing (or under a file, found further up)
        except PermissionError as exc:
            raise ConnectError("permission_denied", f"permission denied: cannot reach {current}: "
                               f"{exc.strerror}") from None
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o755)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise ConnectError("invalid_argument", f"path component is not a directory: {directory}") from None
            continue
        except PermissionError as exc:
            raise ConnectError("permission_denied", f"permission denied: cannot create directory {directory}: "
                               f"{exc.strerror}") from None


#: ``setgroups(2)``'s number per machine: the raw syscall changes only the calling thread
#: (glibc's ``setgroups()`` changes every thread of the process, so it must not be used here).
_SYS_SETGROUPS = {"x86_64": 116, "amd64": 116, "aarch64": 159, "arm64": 159, "riscv64": 159}
#: An invalid id: ``setfsuid``/``setfsgid`` with it change nothing and return the current one.
_QUERY_ID = 0xFFFFFFFF
_libc_lock = threading.Lock()
_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL:
    global _libc
    with _libc_lock:
        if _libc is None:
            try:
                lib = ctypes.CDLL("libc.so.6", use_errno=True)  # already mapped: no ldconfig run
            except OSError:
                lib = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            lib.setfsuid.argtypes = [ctypes.c_uint32]
            lib.setfsuid.restype = ctypes.c_int
            lib.setfsgid.argtypes = [ctypes.c_uint32]
            lib.setfsgid.restype = ctypes.c_int
            lib.syscall.restype = ctypes.c_long
            _libc = lib
        return _libc


def _set_thread_groups(lib: ctypes.CDLL, groups: tuple[int, ...] | list[int]) -> None:
    """The calling thread's supplementary groups become ``groups`` (raw syscall: this thread only)."""
    number = _SYS_SETGROUPS.get(platform.machine().lower())
    if number is None:
        raise OSError(f"no per-thread setgroups for machine '{platform.machine()}'")
    array = (ctypes.c_uint32 * max(1, len(groups)))(*groups)
    if lib.syscall(ctypes.c_long(number), ctypes.c_size_t(len(groups)), array) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setgroups: {os.strerror(err)}")


def _switch(lib: ctypes.CDLL, uid: int, gid: int, groups: tuple[int, ...] | list[int]) -> None:
    """This thread's filesystem identity becomes ``uid:gid`` with ``groups``; checked, raises OSError."""
    _set_thread_groups(lib, groups)
    lib.setfsgid(gid)
    lib.setfsuid(uid)
    now = (lib.setfsuid(_QUERY_ID), lib.setfsgid(_QUERY_ID))
    if now != (uid, gid) or sorted(os.getgroups()) != sorted(set(groups)):
        raise OSError(f"filesystem identity is {now[0]}:{now[1]} groups {os.getgroups()}, "
                      f"not {uid}:{gid} groups {list(groups)}")


def fs_identity() -> tuple[int, int, list[int]]:
    """The calling thread's filesystem uid, gid and supplementary groups."""
    lib = _load_libc()
    return lib.setfsuid(_QUERY_ID), lib.setfsgid(_QUERY_ID), os.getgroups()


@contextmanager
def acting_as(user: User) -> Iterator[None]:
    """Do the file operations of the ``with`` block, in this thread only, as ``user``.

    The thread takes the user's fsuid, fsgid and supplementary groups (``setfsuid(2)``,
    ``setfsgid(2)``, the raw ``setgroups(2)`` syscall: all per thread), so the kernel checks
    every path walk, open, create, rename and unlink as it would for the user's own process
    (while the fsuid is not 0 the kernel also drops CAP_DAC_OVERRIDE and the other file
    capabilities from the thread's effective set, and gives them back when it returns to 0),
    and what the block creates belongs to the user. The agent itself stays root: other
    threads, and the processes it starts as other users, are unaffected. The thread's identity
    is restored on the way out. Root, and an agent that is not root (host tests), change
    nothing. Work handed to another thread must enter ``acting_as`` there too.

    Fails closed: when the switch cannot be made the block does not run (``internal``).
    """
    if user.uid == 0 or os.geteuid() != 0:
        yield
        return
    lib = _load_libc()
    saved = fs_identity()
    try:
        _switch(lib, user.uid, user.gid, user.groups or (user.gid,))
    except OSError as exc:
        _restore(lib, saved)
        raise ConnectError("internal", f"cannot act as user '{user.name}' for file operations: {exc}") from None
    try:
        yield
    finally:
        _restore(lib, saved)


def _restore(lib: ctypes.CDLL, saved: tuple[int, int, list[int]]) -> None:
    uid, gid, groups = saved
    try:
        _switch(lib, uid, gid, groups)
    except OSError as exc:  # not expected: the thread keeps CAP_SETUID/CAP_SETGID throughout
        raise RuntimeError(f"could not restore this thread's filesystem identity: {exc}") from exc

