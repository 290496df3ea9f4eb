"""Per-VM copies of disk images on the host filesystem: reflink where it can, a full copy where not.

A reflink (``ioctl(FICLONE)``, XFS with reflink=1, btrfs, bcachefs) shares every block with the
source until one side writes it: a sandbox's private copy of a template's root image costs no
time and no space. Filesystems without it (ext4, tmpfs, overlayfs) get a full copy, logged as a
warning with what to do, because it costs the image's size in time and space per sandbox.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

FICLONE = 0x40049409
"""``_IOW(0x94, 9, int)`` from linux/fs.h: make the destination share the source's extents."""

_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM}
_warned: set[str] = set()


def reflink(src: Path, dst: Path) -> None:
    """Create ``dst`` as a reflink of ``src``. Raises OSError (EOPNOTSUPP, EXDEV, ...) if the filesystem cannot."""
    with open(src, "rb") as s:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.ioctl(fd, FICLONE, s.fileno())
        except BaseException:
            os.close(fd)
            dst.unlink(missing_ok=True)
            raise
        os.close(fd)


def _clone_sync(src: Path, dst: Path) -> bool:
    try:
        reflink(src, dst)
        return True
    except OSError as e:
        if e.errno not in _NO_REFLINK:
            raise
        reason = os.strerror(e.errno or 0)
    key = str(dst.parent)
    if key not in _warned:
        _warned.add(key)
        log.warning(
            "%s does not support reflinks (%s): every per-sandbox disk is a full copy of the %d MiB image, "
            "which costs time and space; put data_root on XFS (mkfs.xfs -m reflink=1) or btrfs",
            dst.parent, reason, src.stat().st_size >> 20,
        )
    tmp = dst.with_name(dst.name + ".copying")
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return False


async def clone_file(src: Path, dst: Path) -> bool:
    """Make ``dst`` a private, writable copy of ``src``: a reflink (True) or a full copy (False, logged)."""
    return await asyncio.to_thread(_clone_sync, src, dst)


def reflink_supported(directory: Path) -> tuple[bool, str]:
    """Whether files in ``directory`` can be reflinked, probed with FICLONE on a temporary file."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".reflink-probe-", dir=directory) as d:
            src, dst = Path(d) / "a", Path(d) / "b"
            src.write_bytes(b"\0" * 4096)
            try:
                reflink(src, dst)
            except OSError as e:
                return False, f"FICLONE fails on {directory}: {os.strerror(e.errno or 0)}"
            return True, f"FICLONE works on {directory}"
    except OSError as e:
        return False, f"cannot probe {directory}: {e.strerror or e}"


__all__ = ["FICLONE", "clone_file", "reflink", "reflink_supported"]
