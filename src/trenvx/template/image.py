"""A root filesystem tree -> a raw ext4 image, with ``mkfs.ext4 -d`` (no mount, no loop device).

4 KiB blocks (DAX on virtio-pmem needs block size == page size), journal kept, no blocks
reserved for root (sandbox processes run as ``user``), label ``trenvx-root``. The file is
sparse: its size is content + 10 % + ``extra_mb`` + room for the journal and metadata, but only
the written blocks take space.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
from pathlib import Path

from trenvx.build_errors import CommandError, ImageError, run

BLOCK = 4096
MIB = 1024 * 1024
LABEL = "trenvx-root"
UPPER_LABEL = "trenvx-upper"
INODE_SIZE = 256
MKFS_TIMEOUT = 1800.0


def tree_usage(tree: Path) -> tuple[int, int]:
    """(bytes the tree takes in 4 KiB blocks, number of inodes), hard links counted once."""
    total = 0
    inodes = 0
    seen: set[tuple[int, int]] = set()
    stack = [str(tree)]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError as e:
            raise ImageError(f"cannot read {d} in the root filesystem tree: {e.strerror}") from None
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                inodes += 1
                if stat.S_ISDIR(st.st_mode):
                    total += BLOCK
                    stack.append(entry.path)
                elif stat.S_ISREG(st.st_mode):
                    total += -(-st.st_size // BLOCK) * BLOCK
                elif stat.S_ISLNK(st.st_mode) and st.st_size >= 60:  # slow symlink: one block
                    total += BLOCK
    return total + BLOCK, inodes + 1


def _journal_bytes(fs_bytes: int) -> int:
    """mke2fs's default journal size for a filesystem of this size (ext2fs_default_journal_size)."""
    blocks = fs_bytes // BLOCK
    if blocks < 2048:
        return 0
    if blocks < 32768:
        return 1024 * BLOCK
    if blocks < 256 * 1024:
        return 4096 * BLOCK
    if blocks < 512 * 1024:
        return 8192 * BLOCK
    if blocks < 4096 * 1024:
        return 16384 * BLOCK
    if blocks < 8192 * 1024:
        return 32768 * BLOCK
    if blocks < 16384 * 1024:
        return 65536 * BLOCK
    if blocks < 32768 * 1024:
        return 131072 * BLOCK
    return 262144 * BLOCK


def plan_size(content: int, inodes: int, extra_mb: int) -> tuple[int, int]:
    """(image size in bytes, inode count) for ``content`` bytes in ``inodes`` files plus ``extra_mb``."""
    if extra_mb < 0:
        raise ImageError(f"extra_mb must be >= 0, got {extra_mb}")
    n_inodes = max(int(inodes * 1.25) + 4096, 0)
    base = content + content // 10 + extra_mb * MIB
    base += n_inodes * INODE_SIZE + 8 * MIB  # inode tables, bitmaps, group descriptors
    size = base + _journal_bytes(base)
    size = -(-size // (4 * MIB)) * (4 * MIB)
    # With free space requested, keep at least mke2fs's default ratio of one inode per 16 KiB.
    n_inodes = max(n_inodes, size // 16384)
    return size, n_inodes


async def make_ext4_image(tree: Path, out: Path, extra_mb: int) -> int:
    """Write ``tree`` as an ext4 image to ``out`` (via ``out.tmp`` + rename); return its size in bytes."""
    tree = Path(tree)
    out = Path(out)
    if not tree.is_dir():
        raise ImageError(f"root filesystem tree {tree} is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    content, inodes = await asyncio.to_thread(tree_usage, tree)
    size, n_inodes = plan_size(content, inodes, extra_mb)
    tmp = out.with_name(out.name + ".tmp")
    last: CommandError | None = None
    try:
        for attempt in range(3):
            if tmp.exists():
                tmp.unlink()
            with open(tmp, "wb") as f:
                f.truncate(size)  # sparse
            argv = [
                "mkfs.ext4", "-q", "-F",
                "-b", str(BLOCK),
                "-I", str(INODE_SIZE),
                "-N", str(n_inodes),
                "-m", "0",
                "-L", LABEL,
                "-E", "lazy_itable_init=0,lazy_journal_init=0",
                "-d", str(tree),
                str(tmp),
            ]  # fmt: skip
            try:
                await run("image", argv, timeout=MKFS_TIMEOUT)
                break
            except CommandError as e:
                last = e
                if re.search(r"Could not allocate|No space left|inode", e.output or "", re.I) and attempt < 2:
                    size = -(-int(size * 1.5) // (4 * MIB)) * (4 * MIB)
                    n_inodes = int(n_inodes * 1.5)
                    continue
                raise ImageError(f"mkfs.ext4 -d {tree} failed: {e.message}") from None
        else:  # pragma: no cover - loop always breaks or raises
            raise ImageError(f"mkfs.ext4 -d {tree} failed: {last}")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out.stat().st_size


async def make_empty_ext4(out: Path, size_mb: int) -> int:
    """An empty ext4 image of ``size_mb`` MiB (sparse) at ``out``: the writable layer of overlay mode."""
    out = Path(out)
    if size_mb < 16:
        raise ImageError(f"an ext4 image needs at least 16 MiB, got {size_mb}")
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.truncate(size_mb * MIB)
        argv = [
            "mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-I", str(INODE_SIZE), "-m", "0",
            "-L", UPPER_LABEL, "-E", "lazy_itable_init=0,lazy_journal_init=0", str(tmp),
        ]  # fmt: skip
        try:
            await run("image", argv, timeout=MKFS_TIMEOUT)
        except CommandError as e:
            raise ImageError(f"mkfs.ext4 {out} failed: {e.message}") from None
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out.stat().st_size


def pad_to(path: Path, multiple: int) -> int:
    """Extend ``path`` (sparse) to a multiple of ``multiple`` bytes; the new size."""
    size = path.stat().st_size
    padded = -(-size // multiple) * multiple
    if padded != size:
        os.truncate(path, padded)
    return padded


__all__ = ["make_empty_ext4", "make_ext4_image", "pad_to", "plan_size", "tree_usage"]
