"""The accounts of a template's image: the default user every build gets, and the account a
template's sandboxes run as.

E2B's sandboxes run commands and file calls as ``user`` (home /home/user, a bash login shell,
``sudo`` without a password). Every trenvx build gets the same account, whatever its image was
built from (:func:`ensure_default_user`):

- ``/etc/passwd`` and ``/etc/group`` (``shadow`` and ``gshadow`` where the image has them) get
  ``user`` when it is missing: uid 1000 or the next free one, a group of its own, no password;
- it joins the image's ``sudo`` group, where there is one;
- ``/home/user`` is made from ``/etc/skel`` (so a login shell reads its ``.profile``) and is owned
  by it;
- where sudo is installed, ``/etc/sudoers.d/trenvx-user`` lets it run anything as root without a
  password.

:func:`find_account` resolves the account a template names (``[template."x"] user``) in the
built tree; the build records its name and home, and every sandbox's agent gets them as its
default user and working directory.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from trenvx.build_errors import InjectError

from .tree import file_mode, in_tree, make_dirs, read_lines, write_file

DEFAULT_USER = "user"
DEFAULT_UID = 1000
SUDO_GROUP = "sudo"
SUDOERS_FILE = "etc/sudoers.d/trenvx-user"
"""No dot in the name: sudo skips files in sudoers.d whose names hold one."""
SUDO_BINARIES = ("usr/bin/sudo", "bin/sudo", "usr/local/bin/sudo")


@dataclass(frozen=True)
class Account:
    """One line of the image's /etc/passwd."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str


def parse_passwd(lines: list[str]) -> dict[str, Account]:
    """The accounts of /etc/passwd lines (malformed lines are skipped)."""
    accounts: dict[str, Account] = {}
    for line in lines:
        f = line.split(":")
        if len(f) < 7 or not f[2].isdigit() or not f[3].isdigit():
            continue
        accounts.setdefault(f[0], Account(f[0], int(f[2]), int(f[3]), f[5], f[6]))
    return accounts


def find_account(tree: Path, name: str) -> Account:
    """The account ``name`` of the tree's /etc/passwd; :class:`InjectError` saying what to do when
    there is none."""
    accounts = parse_passwd(read_lines(in_tree(tree, "etc/passwd")))
    if name not in accounts:
        raise InjectError(
            f"the template's user {name!r} is not an account of the image (/etc/passwd has "
            f"{', '.join(sorted(accounts)) or 'none'}); create it in the Dockerfile "
            f"(RUN useradd -m {name}) or set user = \"{DEFAULT_USER}\" or \"root\" in the template's config"
        )
    return accounts[name]


def sudoers_text(name: str = DEFAULT_USER) -> str:
    """The sudoers.d file that gives ``name`` passwordless sudo."""
    return (
        "# Written by trenvx's template build: the sandbox's default user may run anything as root\n"
        "# without a password, as in E2B's sandboxes.\n"
        f"{name} ALL=(ALL:ALL) NOPASSWD: ALL\n"
    )


def has_sudo(tree: Path) -> bool:
    """Whether the image has sudo installed."""
    return any(in_tree(tree, p).is_file() for p in SUDO_BINARIES)


def ensure_default_user(tree: Path) -> Account:
    """Give the tree the account ``user`` (see the module's doc); idempotent. Returns it."""
    tree = Path(tree)
    passwd_p = in_tree(tree, "etc/passwd")
    passwd = read_lines(passwd_p)
    if not passwd:
        raise InjectError(f"the image has no /etc/passwd ({passwd_p}); is it a Linux root filesystem?")
    account = parse_passwd(passwd).get(DEFAULT_USER)
    created = account is None
    if account is None:
        account = _add_account(tree, passwd)
    _join_group(tree, SUDO_GROUP, DEFAULT_USER)
    if created or account.home == f"/home/{DEFAULT_USER}":
        _ensure_home(tree, account)
    if has_sudo(tree):
        make_dirs(tree, "etc/sudoers.d", 0o755)
        write_file(in_tree(tree, SUDOERS_FILE), sudoers_text(DEFAULT_USER), 0o440)
    return account


def _ids(lines: list[str]) -> set[int]:
    return {int(f[2]) for f in (line.split(":") for line in lines) if len(f) > 2 and f[2].isdigit()}


def _add_account(tree: Path, passwd: list[str]) -> Account:
    passwd_p = in_tree(tree, "etc/passwd")
    group_p = in_tree(tree, "etc/group")
    group = read_lines(group_p)
    shell = "/bin/bash" if os.path.lexists(in_tree(tree, "bin/bash")) else "/bin/sh"
    used_uids = _ids(passwd)
    uid = DEFAULT_UID
    while uid in used_uids:
        uid += 1
    own = next((f for f in (line.split(":") for line in group) if f[0] == DEFAULT_USER), None)
    if own is not None and len(own) > 2 and own[2].isdigit():
        gid = int(own[2])
    else:
        used_gids = _ids(group)
        gid = uid
        while gid in used_gids:
            gid += 1
        write_file(group_p, "\n".join(group + [f"{DEFAULT_USER}:x:{gid}:"]) + "\n", 0o644)
        gshadow_p = in_tree(tree, "etc/gshadow")
        if gshadow_p.is_file():
            write_file(gshadow_p, "\n".join(read_lines(gshadow_p) + [f"{DEFAULT_USER}:!::"]) + "\n",
                       file_mode(gshadow_p, 0o640))
    account = Account(DEFAULT_USER, uid, gid, f"/home/{DEFAULT_USER}", shell)
    write_file(passwd_p, "\n".join(passwd + [f"{DEFAULT_USER}:x:{uid}:{gid}::{account.home}:{shell}"]) + "\n", 0o644)
    shadow_p = in_tree(tree, "etc/shadow")
    if shadow_p.is_file():
        days = int(time.time() // 86400)
        line = f"{DEFAULT_USER}:*:{days}:0:99999:7:::"
        write_file(shadow_p, "\n".join(read_lines(shadow_p) + [line]) + "\n", file_mode(shadow_p, 0o640))
    return account


def _join_group(tree: Path, group_name: str, user: str) -> None:
    """Add ``user`` to the members of ``group_name`` in /etc/group (and /etc/gshadow), if the
    group exists and the user is not a member yet."""
    for rel, members_field in (("etc/group", 3), ("etc/gshadow", 3)):
        path = in_tree(tree, rel)
        if not path.is_file():
            continue
        lines = read_lines(path)
        changed = False
        for i, line in enumerate(lines):
            f = line.split(":")
            if f[0] != group_name or len(f) <= members_field:
                continue
            members = [m for m in f[members_field].split(",") if m]
            if user not in members:
                f[members_field] = ",".join(members + [user])
                lines[i] = ":".join(f)
                changed = True
        if changed:
            write_file(path, "\n".join(lines) + "\n", file_mode(path, 0o644 if rel == "etc/group" else 0o640))


def _ensure_home(tree: Path, account: Account) -> None:
    """The account's home from /etc/skel, owned by it. A home that exists but is not the account's
    (made by a Dockerfile's ``WORKDIR``, say) is given to it and gets the skel files it lacks."""
    home = in_tree(tree, account.home.lstrip("/"))
    if home.is_symlink() or home.exists() and not home.is_dir():
        raise InjectError(f"{account.home} in the image is not a directory; the account {account.name!r} needs it as its home")
    if home.is_dir() and home.stat().st_uid == account.uid:
        return
    made = not home.exists()
    if made:
        make_dirs(tree, str(Path(account.home).parent).lstrip("/"))
        home.mkdir(mode=0o750)
    os.lchown(home, account.uid, account.gid)
    skel = in_tree(tree, "etc/skel")
    if not skel.is_dir():
        return
    for item in skel.iterdir():
        dst = home / item.name
        if os.path.lexists(dst):
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.copytree(item, dst, symlinks=True)
            for dirpath, dirnames, filenames in os.walk(dst):
                os.lchown(dirpath, account.uid, account.gid)
                for n in dirnames + filenames:
                    os.lchown(os.path.join(dirpath, n), account.uid, account.gid)
        else:
            shutil.copy2(item, dst, follow_symlinks=False)
            os.lchown(dst, account.uid, account.gid)


__all__ = [
    "Account", "DEFAULT_USER", "SUDOERS_FILE", "ensure_default_user", "find_account", "has_sudo",
    "parse_passwd", "sudoers_text",
]
