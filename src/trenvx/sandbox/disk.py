"""Per-sandbox disks: a qcow2 overlay on the template's read-only raw image (or on a snapshot's
qcow2 layer), never a copy."""

from __future__ import annotations

from pathlib import Path

from ..vmm.qemu_img import QemuImgError, qcow2_backing_name
from ..vmm.qemu_img import qemu_img as run_qemu_img


class DiskError(Exception):
    pass


BACKING_FORMATS = ("raw", "qcow2")


async def create_overlay(base: Path, overlay: Path, backing_format: str = "raw", qemu_img: str = "qemu-img") -> Path:
    """Create ``overlay`` as a qcow2 whose backing file is ``base``: a template's raw image, or a
    snapshot's qcow2 layer (``backing_format="qcow2"``; its own backing chain stays as it is)."""
    if backing_format not in BACKING_FORMATS:
        raise DiskError(f"cannot put an overlay on a {backing_format!r} image; backing formats: {', '.join(BACKING_FORMATS)}")
    try:
        await run_qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", backing_format, str(overlay),
                           binary=qemu_img)
    except QemuImgError as e:
        raise DiskError(f"the overlay {overlay} on {base} could not be made: {e}") from None
    return overlay


MAX_CHAIN = 64


def qcow2_backing(path: Path) -> Path | None:
    """The backing file a qcow2 image's header names (an absolute path, or relative to the image's
    directory), or None: no backing file, not a qcow2 image, or unreadable."""
    name = qcow2_backing_name(path)
    if name is None:
        return None
    backing = Path(name)
    return backing if backing.is_absolute() else path.parent / backing


def backing_chain(path: Path) -> list[Path]:
    """The images below the qcow2 image ``path``, nearest first (ends at a raw image, a missing
    file, or after :data:`MAX_CHAIN` images)."""
    chain: list[Path] = []
    current: Path | None = path
    while current is not None and len(chain) < MAX_CHAIN:
        current = qcow2_backing(current)
        if current is None or current in chain:
            break
        chain.append(current)
    return chain
