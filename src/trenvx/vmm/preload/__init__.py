"""A small library loaded into QEMU (``LD_PRELOAD``): hole punches into read-only files do nothing.

It lets a sandbox give freed guest memory back (virtio-balloon free page reporting) without QEMU
7.2 zeroing the template's memory file; ``keep_readonly_files.c`` says why. It is compiled on
first use with the host's C compiler into ``data_root/cache/preload/``, keyed by its source.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from pathlib import Path

from ...filelock import AsyncFileLock
from ..base import VmmError

SOURCE = Path(__file__).with_name("keep_readonly_files.c")
COMPILE_TIMEOUT_S = 60.0


async def ensure_keep_readonly_files(cache_dir: Path, compiler: str = "cc") -> Path:
    """The compiled library (built now unless the cache has it for this source)."""
    source = SOURCE.read_bytes()
    out = cache_dir / "preload" / f"keep_readonly_files-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if out.exists():
        return out
    if shutil.which(compiler) is None:
        raise VmmError(
            f"no C compiler ({compiler!r} is not on PATH) to build {SOURCE.name}, which keeps QEMU from "
            "writing freed sandbox memory into template files; install gcc (`scripts/start.sh setup` does)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    async with AsyncFileLock(out.parent / ".build.lock"):
        if out.exists():
            return out
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        proc = await asyncio.create_subprocess_exec(
            compiler, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(tmp), str(SOURCE), "-ldl",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        try:
            try:
                text, _ = await asyncio.wait_for(proc.communicate(), COMPILE_TIMEOUT_S)
            except TimeoutError:
                raise VmmError(f"compiling {SOURCE.name} took over {COMPILE_TIMEOUT_S:.0f}s") from None
            if proc.returncode != 0:
                raise VmmError(
                    f"compiling {SOURCE} with {compiler} failed: {text.decode(errors='replace').strip()[-800:]}"
                )
            os.replace(tmp, out)
        finally:  # a timeout, a failure or a cancelled create: no compiler left running, no partial file
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            tmp.unlink(missing_ok=True)
    return out


__all__ = ["ensure_keep_readonly_files"]
