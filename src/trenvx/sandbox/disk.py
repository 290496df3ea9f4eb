"""Per-sandbox disks: a qcow2 overlay on the template's read-only raw image (or on a snapshot's
qcow2 layer), never a copy."""

from __future__ import annotations

from pathlib import Path

from ..vmm.qemu_img import QemuImgError
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
