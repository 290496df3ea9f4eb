"""Paths and files inside a foreign root filesystem tree (an image's, which we may modify).

Every path is resolved like a chroot at the tree would resolve it: a symlink such as
``/etc/passwd -> /somewhere`` points into the tree, never to the host.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from trenvx.build_errors import InjectError


def in_tree(tree: Path, rel: str | os.PathLike[str], follow_last: bool = True) -> Path:
    """Resolve ``rel`` like a chroot at ``tree`` would: symlinks (absolute or relative) stay
    inside the tree. Missing components are fine (the path may be created)."""
    tree = Path(tree)
    parts = [p for p in Path(rel).parts if p not in ("/", "", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = tree.joinpath(*resolved, part)
        if candidate.is_symlink() and (parts or follow_last):
            hops += 1
            if hops > 40:
                raise InjectError(f"too many levels of symbolic links resolving /{Path(rel)} in {tree}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in Path(target).parts if p not in ("/", "", ".")] + parts
            continue
        resolved.append(part)
    return tree.joinpath(*resolved)


def make_dirs(tree: Path, rel: str, mode: int = 0o755) -> Path:
    """``mkdir -p /rel`` inside the tree; the resolved path."""
    p = in_tree(tree, rel)
    if p.is_symlink():
        raise InjectError(f"/{rel} in the image is a dangling symbolic link; cannot create a directory there")
    p.mkdir(parents=True, exist_ok=True, mode=mode)
    return p


def write_file(path: Path, data: bytes | str, mode: int) -> None:
    """Replace ``path`` (already resolved inside the tree) by a regular file, atomically."""
    if isinstance(data, str):
        data = data.encode()
    if path.is_symlink() or path.exists() and not path.is_file():
        if path.is_dir() and not path.is_symlink():
            raise InjectError(f"{path} is a directory; expected a file")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.trenvx-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_lines(path: Path) -> list[str]:
    """The lines of a text file; none when it does not exist."""
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def file_mode(p: Path, default: int) -> int:
    """The permission bits of ``p``, or ``default`` when it cannot be read."""
    try:
        return stat.S_IMODE(p.stat().st_mode)
    except OSError:
        return default


__all__ = ["in_tree", "make_dirs", "write_file", "read_lines", "file_mode"]
