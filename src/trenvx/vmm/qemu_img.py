"""qemu-img as a bounded subprocess: the qcow2 overlays of sandboxes' disks and of checkpoints."""

from __future__ import annotations

import asyncio

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
