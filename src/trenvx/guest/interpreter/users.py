"""Who the kernels run as: the sandbox's default user, as E2B runs code as ``user``.

The server itself runs as root (a template's ``start_cmd`` runs as root); each kernel is
started with the uid, gid and groups of the account given by ``--user`` (default ``user``
when that account exists, else the server's own), with that account's ``HOME``, ``USER``,
``LOGNAME`` and ``SHELL``.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

DEFAULT_USER = "user"


@dataclass(frozen=True)
class RunAs:
    """An account the kernels run as."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str

    def popen_kwargs(self) -> dict[str, object]:
        """``subprocess.Popen`` arguments that start a process as this account (none when it is
        the server's own)."""
        if self.uid == os.getuid() and self.gid == os.getgid():
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def environment(self) -> dict[str, str]:
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name, "SHELL": self.shell or "/bin/sh"}


def _from_entry(entry: pwd.struct_passwd) -> RunAs:
    try:
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except OSError:
        groups = (entry.pw_gid,)
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir or "/", entry.pw_shell)


def resolve_user(name: str | None) -> RunAs:
    """The account named ``name``; None: ``user`` if it exists, else the server's own account.

    Raises ValueError naming the problem: no such account, or a server that is not root asked
    to run kernels as another user."""
    if name is None:
        try:
            entry = pwd.getpwnam(DEFAULT_USER)
        except KeyError:
            entry = pwd.getpwuid(os.getuid())
        if entry.pw_uid != os.getuid() and os.geteuid() != 0:
            entry = pwd.getpwuid(os.getuid())
        return _from_entry(entry)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ValueError(f"--user {name}: no such account in this system (see /etc/passwd)") from None
    if entry.pw_uid != os.getuid() and os.geteuid() != 0:
        raise ValueError(f"--user {name}: only a server running as root can start kernels as another user")
    return _from_entry(entry)
