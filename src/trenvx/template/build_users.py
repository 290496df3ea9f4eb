"""Who uses a build: a template's or a snapshot's build directory keeps one file per user under
``.users/`` (a sandbox restored from it, an operation in progress), holding a path that exists
while that user lives: the sandbox's directory, or ``/proc/<pid>`` of the process doing the
operation. Every process sharing the templates directory (servers, template managers, tests)
sees them, so none removes a build another one stands on: :meth:`TemplateStore.prune` keeps a
template's builds with users, :meth:`Snapshots.collect` a snapshot's."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

USERS = ".users"
SWEEP_EVERY = 256
"""An entry is left behind by each user that ended (it is dropped when someone asks whether the build
has users); :func:`add_user` drops them whenever the entries reach a multiple of this, so they stay
within the live users plus this many however many sandboxes a build serves."""


class BuildGone(FileNotFoundError):
    """The build's directory was removed before the user was recorded."""


def add_user(build_dir: Path, key: str, alive: Path) -> None:
    """Record that ``alive`` uses the build. Raises :class:`BuildGone` if it was removed meanwhile."""
    users = build_dir / USERS
    try:
        users.mkdir(mode=0o700, exist_ok=True)
        (users / key).write_text(str(alive))
    except FileNotFoundError:
        raise BuildGone(f"build {build_dir} is gone") from None
    with contextlib.suppress(OSError):
        if len(os.listdir(users)) % SWEEP_EVERY == 0:
            has_users(build_dir)


def remove_user(build_dir: Path, key: str) -> None:
    with contextlib.suppress(OSError):
        (build_dir / USERS / key).unlink()


def has_users(build_dir: Path) -> bool:
    """Whether a user of the build lives (the entries of users that ended are removed)."""
    users = build_dir / USERS
    try:
        entries = list(users.iterdir())
    except OSError:
        return False
    alive = False
    for entry in entries:
        try:
            target = entry.read_text().strip()
        except OSError:
            continue
        if target and Path(target).exists():
            alive = True
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
    return alive


__all__ = ["USERS", "BuildGone", "add_user", "has_users", "remove_user"]
