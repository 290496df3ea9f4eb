"""COPY of a template build step, run INSIDE the template's build VM (standard library only).

::

    python3 guest_copy.py '{"archive": "/opt/trenvx-build/3.tar", "stage": "/opt/trenvx-build/3",
                            "src": "app/*.py", "dest": "/app/", "owner": "user", "mode": 493}'

1. Unpacks the uploaded archive into ``stage``, member by member, refusing any member that is
   absolute, has ``..`` in its path, is a device or FIFO, or would be written or linked outside
   ``stage`` once the links already unpacked are followed (the host checked the archive too;
   this holds even if it had not).
2. Copies ``src`` (a path or glob inside ``stage``) to ``dest`` as Docker's COPY does: a
   directory's content goes into ``dest``; a file goes to ``dest`` itself, or into it when
   ``dest`` ends with ``/``, is a directory, or several sources match. Symlinks stay symlinks.
3. Gives what it made to ``owner`` (``name`` or ``name:group``; the name's group by default) and,
   with ``mode``, sets that mode on every copied file and directory.

Errors go to stderr and exit with status 2.
"""

from __future__ import annotations

import glob
import grp
import json
import os
import pwd
import shutil
import stat
import sys
import tarfile


class CopyError(Exception):
    pass


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def unpack(archive: str, stage: str) -> int:
    os.makedirs(stage, mode=0o700, exist_ok=True)
    root = os.path.realpath(stage)
    count = 0
    with tarfile.open(archive, "r:*") as tar:
        for m in tar:
            name = m.name
            if not name or name.startswith("/") or ".." in name.split("/"):
                raise CopyError(f"archive member {name!r}: absolute or with '..' in its path")
            if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
                raise CopyError(f"archive member {name!r}: a device, FIFO or other special file")
            target = os.path.join(root, name)
            parent = os.path.realpath(os.path.dirname(target))
            if not _inside(root, parent):
                raise CopyError(f"archive member {name!r} would be written outside the archive's directory")
            if m.issym():
                if m.linkname.startswith("/"):
                    raise CopyError(f"archive member {name!r}: a symlink to an absolute path")
                if not _inside(root, os.path.realpath(os.path.join(parent, m.linkname))):
                    raise CopyError(f"archive member {name!r}: a symlink leading outside the archive")
            if m.islnk():
                linked = os.path.realpath(os.path.join(root, m.linkname))
                if m.linkname.startswith("/") or not _inside(root, linked):
                    raise CopyError(f"archive member {name!r}: a hard link leading outside the archive")
            os.makedirs(parent, exist_ok=True)
            final = os.path.join(parent, os.path.basename(target)) if name not in (".", "./") else root
            if m.isdir():
                os.makedirs(final, exist_ok=True)
                os.chmod(final, m.mode & 0o7777)
            elif m.issym():
                if os.path.lexists(final):
                    os.unlink(final)
                os.symlink(m.linkname, final)
            elif m.islnk():
                if os.path.lexists(final):
                    os.unlink(final)
                os.link(os.path.realpath(os.path.join(root, m.linkname)), final)
            else:
                if os.path.islink(final):
                    os.unlink(final)
                src = tar.extractfile(m)
                assert src is not None
                fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                with src, os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                os.chmod(final, m.mode & 0o7777)
            count += 1
    return count


def owner_ids(owner: str) -> tuple[int, int]:
    name, _, group = owner.partition(":")
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        if not name.isdigit():
            raise CopyError(f"user {name!r} does not exist in the template") from None
        uid = gid = int(name)
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise CopyError(f"group {group!r} does not exist in the template") from None
    return uid, gid


def _copy_entry(src: str, dst: str, made: list[str]) -> None:
    if os.path.islink(src):
        if os.path.lexists(dst) and not os.path.isdir(dst):
            os.unlink(dst)
        os.symlink(os.readlink(src), dst)
    elif os.path.isdir(src):
        if not os.path.isdir(dst):
            if os.path.lexists(dst):
                os.unlink(dst)
            os.mkdir(dst)
        shutil.copystat(src, dst)
        for entry in sorted(os.listdir(src)):
            _copy_entry(os.path.join(src, entry), os.path.join(dst, entry), made)
    else:
        if os.path.islink(dst):
            os.unlink(dst)
        shutil.copy2(src, dst)
    made.append(dst)


def _make_dirs(path: str, made: list[str]) -> None:
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for d in reversed(missing):
        os.mkdir(d, 0o755)
        made.append(d)


def copy(stage: str, src: str, dest: str, owner: str, mode: int | None) -> list[str]:
    """Copy ``src`` of ``stage`` to ``dest`` with Docker's COPY rules; the paths made or written."""
    root = os.path.realpath(stage)
    pattern = os.path.join(root, src)
    if glob.has_magic(src):
        matches = sorted(glob.glob(pattern, recursive=True, include_hidden=True))
    else:
        matches = [pattern] if os.path.lexists(pattern) else []
    matches = [m for m in matches if _inside(root, os.path.realpath(os.path.dirname(m)))]
    if not matches:
        raise CopyError(f"no files match {src!r} in the uploaded files")
    into_dir = dest.endswith("/") or len(matches) > 1 or os.path.isdir(dest)
    made: list[str] = []
    for m in matches:
        if os.path.isdir(m) and not os.path.islink(m):
            _make_dirs(dest, made)
            for entry in sorted(os.listdir(m)):
                _copy_entry(os.path.join(m, entry), os.path.join(dest, entry), made)
        else:
            target = os.path.join(dest, os.path.basename(m)) if into_dir else dest
            _make_dirs(os.path.dirname(target) or "/", made)
            _copy_entry(m, target, made)
    uid, gid = owner_ids(owner)
    for path in made:
        os.lchown(path, uid, gid)
        if mode is not None and not os.path.islink(path):
            os.chmod(path, mode)
    return made


def main(argv: list[str]) -> int:
    try:
        args = json.loads(argv[1])
        n = unpack(args["archive"], args["stage"])
        made = copy(args["stage"], args["src"], args["dest"], args.get("owner") or "root", args.get("mode"))
        print(f"unpacked {n} archive members; copied {len(made)} paths to {args['dest']}")
        return 0
    except (CopyError, OSError, tarfile.TarError, KeyError, ValueError, IndexError) as e:
        print(f"COPY failed: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
