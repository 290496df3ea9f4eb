"""Users and paths: who a request runs as, and how its paths resolve (like envd).

A request names its user with ``Authorization: Basic base64("name:")`` (RPCs) or the
``username`` query parameter (``/files``); without one the default user (root unless
``/init`` set ``defaultUser``) is used. Relative paths and ``~`` resolve against that
user's home directory.
"""

from __future__ import annotations

import base64
import binascii
import os
import pwd
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


def ensure_dirs(path: str, uid: int, gid: int) -> None:
    """Create ``path`` and its missing parents (mode 0755) owned by ``uid:gid``.

    Raises ``invalid_argument`` when a component exists but is not a directory.
    """
    missing: list[str] = []
    current = path
    while True:
        if os.path.isdir(current):
            break
        if os.path.lexists(current) and not os.path.isdir(current):  # (re-checked: a concurrent upload may have just made it)
            raise ConnectError("invalid_argument", f"path component is not a directory: {current}")
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
            raise ConnectError("permission_denied", f"cannot create directory {directory}: {exc.strerror}") from None
        chown_quiet(directory, uid, gid)


def chown_quiet(path: str, uid: int, gid: int) -> None:
    """chown when we may (as root); a no-op for an unprivileged agent (host tests)."""
    if os.geteuid() != 0:
        return
    try:
        os.chown(path, uid, gid, follow_symlinks=False)
    except OSError:
        pass
