"""qemu-img as a bounded subprocess: the qcow2 overlays of sandboxes' disks and of checkpoints."""

from __future__ import annotations

import asyncio
from pathlib import Path

from .base import VmmError

QEMU_IMG_TIMEOUT_S = 30.0


class QemuImgError(VmmError):
    """qemu-img failed or timed out (its output in the message)."""


async def qemu_img(*args: str, binary: str = "qemu-img", timeout_s: float = QEMU_IMG_TIMEOUT_S) -> None:
    """Run ``qemu-img ARGS``; killed after ``timeout_s``. Raises :class:`QemuImgError`."""
    proc = await asyncio.create_subprocess_exec(
        binary, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise QemuImgError(f"qemu-img {' '.join(args)} timed out after {timeout_s:.0f}s") from None
    if proc.returncode != 0:
        raise QemuImgError(f"qemu-img {' '.join(args)} failed: {out.decode(errors='replace').strip()}")


QCOW2_MAGIC = b"QFI\xfb"


def qcow2_backing_name(path: Path) -> str | None:
    """The backing file name exactly as a qcow2 image's header holds it (an absolute path, or a
    name relative to the image's directory), or None: no backing file, not a qcow2 image, or
    unreadable."""
    try:
        with open(path, "rb") as f:
            header = f.read(20)
            if len(header) < 20 or header[:4] != QCOW2_MAGIC:
                return None
            offset = int.from_bytes(header[8:16], "big")
            size = int.from_bytes(header[16:20], "big")
            if not offset or not 0 < size <= 1023:
                return None
            f.seek(offset)
            return f.read(size).decode(errors="replace")
    except OSError:
        return None


MAX_CHAIN = 256
"""The deepest backing chain followed (a loop or a corrupt header ends there)."""


def qcow2_backing(path: Path) -> Path | None:
    """The backing file a qcow2 image's header names (an absolute path, or relative to the image's
    directory), or None: no backing file, not a qcow2 image, or unreadable."""
    name = qcow2_backing_name(path)
    if not name:
        return None
    backing = Path(name)
    return backing if backing.is_absolute() else path.parent / backing


def backing_chain(path: Path) -> list[Path]:
    """The images below the qcow2 image ``path``, nearest first (ends at a raw image, a missing
    file, a loop, or after :data:`MAX_CHAIN` images)."""
    chain: list[Path] = []
    current: Path | None = path
    while current is not None and len(chain) < MAX_CHAIN:
        current = qcow2_backing(current)
        if current is None or current in chain:
            break
        chain.append(current)
    return chain
