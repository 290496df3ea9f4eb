"""Who uses a build: a template's or a snapshot's build directory keeps one file per user under
``.users/`` (a sandbox restored from it, an operation in progress), holding a path that exists
while that user lives: the sandbox's directory, or ``/proc/<pid>`` of the process doing the
operation. Every process sharing the templates directory (servers, template managers, tests)
sees them, so none removes a build another one stands on: :meth:`TemplateStore.prune` keeps a
template's builds with users, :meth:`Snapshots.collect` a snapshot's.

An entry appears whole (written under a dot name, then renamed), and only an entry whose path is
gone counts as ended: an entry that cannot be read, or a ``.users`` that cannot be listed, counts
as a live user, so that doubt keeps a build rather than removes it."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

USERS = ".users"
SWEEP_EVERY = 256
"""An entry is left behind by each user that ended (it is dropped when someone asks whether the build
has users); :func:`add_user` drops them whenever the entries reach a multiple of this, so they stay
within about the live users plus this many however many sandboxes a build serves."""


class BuildGone(FileNotFoundError):
    """The build's directory was removed (or is being removed) before the user was recorded."""


def add_user(build_dir: Path, key: str, alive: Path, *, manifest: str = "manifest.json") -> None:
    """Record that ``alive`` uses the build. Raises :class:`BuildGone` if it was removed meanwhile:
    also when it goes while the entry is written, as :meth:`TemplateStore.prune` first renames a
    build it removes (its ``manifest`` is then no longer where it was)."""
    users = build_dir / USERS
    tmp = users / f".{key}.{secrets.token_hex(4)}"
    try:
        users.mkdir(mode=0o700, exist_ok=True)
        tmp.write_text(str(alive))
        os.replace(tmp, users / key)
    except FileNotFoundError:
        raise BuildGone(f"build {build_dir} is gone") from None
    if not (build_dir / manifest).exists():
        raise BuildGone(f"build {build_dir} is being removed")
    with contextlib.suppress(OSError):
        if len(os.listdir(users)) % SWEEP_EVERY == 0:
            has_users(build_dir)


def remove_user(build_dir: Path, key: str) -> None:
    with contextlib.suppress(OSError):
        (build_dir / USERS / key).unlink()


def has_users(build_dir: Path) -> bool:
    """Whether a user of the build lives (the entries of users that ended are removed). Doubt (an
    entry or the directory that cannot be read) counts as a live user."""
    users = build_dir / USERS
    try:
        entries = [e for e in users.iterdir() if not e.name.startswith(".")]
    except FileNotFoundError:
        return False
    except OSError:
        return True
    alive = False
    for entry in entries:
        try:
            target = entry.read_text().strip()
        except FileNotFoundError:
            continue  # removed meanwhile
        except OSError:
            alive = True
            continue
        if not target or Path(target).exists():
            alive = True
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
    return alive


__all__ = ["USERS", "BuildGone", "add_user", "has_users", "remove_user"]
