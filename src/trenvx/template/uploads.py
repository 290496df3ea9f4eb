"""Files uploaded for templates' COPY steps: tar archives (gzipped or not) kept by their hash.

E2B's SDK names each COPY's files by ``filesHash``, a SHA-256 over ``COPY <src> <dest>`` and,
for every file it packs (in the order it packs them), its relative path, ``st_mode``, size
(not for directories) and content (a symlink's target when it is packed as a link). It PUTs a
tar of those files (paths relative to its file context) to the URL the server gave for that hash.

On the host an archive is only **read**, never unpacked: :func:`check_archive` refuses members
that could land outside the directory they are unpacked into (absolute paths, ``..``, links
leading out) and special files (devices, FIFOs), and bounds the member count and unpacked size;
:func:`files_hash` recomputes the SDK's hash from the archive, so a build uses only files that
are what its step says. The archive is unpacked in the template's build VM, by the guest
program :mod:`trenvx.template.guest_copy`, which checks every member again.

Layout: ``data_root/cache/template-files/<hash>.tar`` (0600, in a 0700 directory).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

from ..layout import DataRoot

MAX_UPLOAD_BYTES = 512 * 1024 * 1024
"""Largest archive accepted for one COPY step (as uploaded, compressed or not)."""
MAX_UNPACKED_BYTES = 2 * 1024 * 1024 * 1024
MAX_MEMBERS = 100_000
HASH_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1024 * 1024


class UnsafeArchive(ValueError):
    """The archive is not a tar, or holds a member that is refused; the message names it."""


def _resolve(path: str, links: dict[str, str]) -> str | None:
    """Where ``path`` (relative to the archive's root) lands once the symlinks unpacked before it
    (``links``: member -> target) are followed; None when it leaves the root."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    out: list[str] = []
    hops = 0
    while parts:
        p = parts.pop(0)
        if p == "..":
            if not out:
                return None
            out.pop()
            continue
        here = "/".join([*out, p])
        if here in links:
            hops += 1
            target = links[here]
            if hops > 40 or target.startswith("/"):
                return None
            parts = [x for x in target.split("/") if x not in ("", ".")] + parts
            continue
        out.append(p)
    return "/".join(out)


def _member_problem(m: tarfile.TarInfo, seen: set[str], links: dict[str, str]) -> str | None:
    name = m.name
    if not name or "\x00" in name:
        return "an empty name"
    if name.startswith("/"):
        return "an absolute path"
    if ".." in name.split("/"):
        return "'..' in its path"
    if m.ischr() or m.isblk():
        return "a device file"
    if m.isfifo():
        return "a FIFO"
    if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
        return f"an unsupported member type {m.type!r}"
    if _resolve(posixpath.dirname(name), links) is None:
        return "a path that leads outside the archive through a symlink in it"
    if m.issym():
        if m.linkname.startswith("/"):
            return (f"a symlink to an absolute path ({m.linkname!r}); pack the file it points to instead "
                    "(copy(..., resolve_symlinks=True))")
        if _resolve(posixpath.join(posixpath.dirname(name), m.linkname), links) is None:
            return f"a symlink leading outside the archive ({m.linkname!r})"
    if m.islnk():
        link = posixpath.normpath(m.linkname)
        if m.linkname.startswith("/") or ".." in m.linkname.split("/") or link not in seen:
            return f"a hard link to {m.linkname!r}, which is not an earlier member"
    return None


def check_archive(path: Path) -> int:
    """Read the whole archive and refuse what may not be unpacked; the number of members."""
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UnsafeArchive(f"not a tar archive (gzipped or plain): {e}") from None
    count = 0
    total = 0
    seen: set[str] = set()
    links: dict[str, str] = {}
    try:
        with tar:
            for m in tar:
                count += 1
                if count > MAX_MEMBERS:
                    raise UnsafeArchive(f"more than {MAX_MEMBERS} files")
                problem = _member_problem(m, seen, links)
                if problem:
                    raise UnsafeArchive(f"member {m.name[:300]!r} is refused: {problem}")
                total += m.size if m.isreg() else 0
                if total > MAX_UNPACKED_BYTES:
                    raise UnsafeArchive(f"unpacks to more than {MAX_UNPACKED_BYTES >> 20} MiB")
                key = posixpath.normpath(m.name)
                seen.add(key)
                if m.issym():
                    links[key] = m.linkname
                else:
                    links.pop(key, None)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise UnsafeArchive(f"the archive is damaged: {e}") from None
    return count


_TYPE_BITS = {"dir": stat.S_IFDIR, "sym": stat.S_IFLNK, "reg": stat.S_IFREG}


def files_hash(path: Path, src: str, dest: str) -> str:
    """E2B's ``filesHash`` of a COPY of ``src`` to ``dest`` whose files are the archive at ``path``."""
    h = hashlib.sha256(f"COPY {src} {dest}".encode())
    with tarfile.open(path, "r:*") as tar:
        for m in tar:
            kind = "dir" if m.isdir() else "sym" if m.issym() else "reg"
            h.update(m.name.encode("utf-8", "surrogateescape"))
            h.update(str(_TYPE_BITS[kind] | (m.mode & 0o7777)).encode())
            if kind == "sym":
                target = m.linkname.encode("utf-8", "surrogateescape")
                h.update(str(len(target)).encode())
                h.update(target)
                continue
            if kind == "dir":
                continue
            data = tar.extractfile(m)
            size = m.size if not m.islnk() else tar.getmember(m.linkname).size
            h.update(str(size).encode())
            if data is not None:
                with data:
                    while chunk := data.read(_CHUNK):
                        h.update(chunk)
    return h.hexdigest()


class UploadStore:
    """The uploaded archives of one data_root, by hash."""

    def __init__(self, data_root: DataRoot) -> None:
        self.dir = data_root.cache / "template-files"

    def path(self, files_hash: str) -> Path:
        if not HASH_RE.match(files_hash):
            raise ValueError(f"{files_hash[:80]!r} is not a lowercase hex SHA-256")
        return self.dir / f"{files_hash}.tar"

    def present(self, files_hash: str) -> bool:
        return self.path(files_hash).is_file()

    def discard(self, files_hash: str) -> None:
        self.path(files_hash).unlink(missing_ok=True)

    def new_temp(self) -> Path:
        """An empty temporary file to receive an upload into (then :meth:`accept` or unlink it)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=self.dir)
        os.close(fd)
        return Path(tmp)

    def accept(self, tmp: Path, files_hash: str) -> int:
        """Check the received archive (:class:`UnsafeArchive` if refused) and store it under its
        hash; the temporary file is gone either way. The number of members."""
        try:
            final = self.path(files_hash)
            count = check_archive(tmp)
            os.replace(tmp, final)
            return count
        finally:
            tmp.unlink(missing_ok=True)

    def remove_partial(self, older_than_s: float = 3600.0) -> None:
        """Temporary files of uploads a stopped server left (older than ``older_than_s``: another
        server of a shared cache may be receiving one right now)."""
        if self.dir.is_dir():
            for p in self.dir.glob(".upload-*"):
                try:
                    if time.time() - p.stat().st_mtime > older_than_s:
                        p.unlink(missing_ok=True)
                except OSError:
                    continue


__all__ = ["MAX_UPLOAD_BYTES", "UnsafeArchive", "UploadStore", "check_archive", "files_hash"]
