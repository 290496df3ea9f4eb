"""Per-sandbox disks: a qcow2 overlay on the template's read-only raw image, never a copy."""

from __future__ import annotations

import asyncio
from pathlib import Path

QEMU_IMG_TIMEOUT_S = 30.0


class DiskError(Exception):
    pass


async def create_overlay(base: Path, overlay: Path, qemu_img: str = "qemu-img") -> Path:
    """Create ``overlay`` as a qcow2 whose backing file is the raw image ``base``."""
    proc = await asyncio.create_subprocess_exec(
        qemu_img, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), QEMU_IMG_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise DiskError(f"qemu-img create {overlay} timed out after {QEMU_IMG_TIMEOUT_S:.0f}s") from None
    if proc.returncode != 0:
        raise DiskError(f"qemu-img create {overlay} on {base} failed: {out.decode(errors='replace').strip()}")
    return overlay
