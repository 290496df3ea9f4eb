"""Finding a VMM binary and checking its version (``<binary> --version``) before it is used.

Each driver names the oldest release whose documented API it speaks and why; a binary that is
missing, does not run, or is older fails with a :class:`VmmError` that says what is wrong and
what to do. Results are cached per binary path for the life of the process.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from dataclasses import dataclass

from .base import VmmError

VERSION_TIMEOUT_S = 10.0
_VERSION_RE = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?")
_cache: dict[str, "VmmBinary"] = {}


@dataclass(frozen=True)
class VmmBinary:
    path: str
    version: tuple[int, int, int]
    banner: str
    """First line of ``--version``."""

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))


@dataclass(frozen=True)
class BinaryRequirement:
    """What a driver needs of its binary, and how to tell the user."""

    vmm: str
    """Display name, e.g. ``Firecracker``."""
    default_name: str
    """Looked up on PATH when the config names no binary."""
    config_key: str
    """The config key that names the binary, e.g. ``fc_binary_path``."""
    minimum: tuple[int, int, int]
    why_minimum: str


def parse_version(text: str) -> tuple[int, int, int] | None:
    m = _VERSION_RE.search(text)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def locate(configured: str, req: BinaryRequirement) -> str:
    """The binary's path: the configured one (a path or a name on PATH), else ``default_name`` on PATH."""
    name = configured or req.default_name
    found = shutil.which(name) if os.sep not in name else (name if os.access(name, os.X_OK) else None)
    if found:
        return found
    if configured:
        raise VmmError(
            f"{req.config_key} = {configured!r} is not an executable file; fix {req.config_key} in the config "
            f"or install {req.vmm}"
        )
    raise VmmError(
        f"{req.vmm} is not installed: {req.default_name} is not on PATH and {req.config_key} is not set; install "
        f"{req.vmm} (a static release binary) and set {req.config_key}, or use vmm_type = \"qemu\""
    )


async def check_binary(configured: str, req: BinaryRequirement) -> VmmBinary:
    """Locate the binary, run ``--version`` and check it is at least ``req.minimum``."""
    path = locate(configured, req)
    if path in _cache:
        return _cache[path]
    try:
        proc = await asyncio.create_subprocess_exec(
            path, "--version", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as e:
        raise VmmError(f"cannot run {path} --version: {e.strerror or e}; reinstall {req.vmm}") from None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), VERSION_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise VmmError(f"{path} --version did not finish within {VERSION_TIMEOUT_S:.0f}s; is it really {req.vmm}?") from None
    text = out.decode(errors="replace").strip()
    banner = text.splitlines()[0] if text else ""
    version = parse_version(banner)
    if proc.returncode != 0 or version is None:
        raise VmmError(
            f"{path} --version exited {proc.returncode} with {banner or 'no output'!r}, not a {req.vmm} version; "
            f"point {req.config_key} at the {req.vmm} binary"
        )
    if version < req.minimum:
        need = ".".join(map(str, req.minimum))
        raise VmmError(
            f"{path} is {req.vmm} {'.'.join(map(str, version))}, older than {need}, which trenvx needs "
            f"({req.why_minimum}); install {req.vmm} {need} or newer and set {req.config_key}"
        )
    found = VmmBinary(path, version, banner)
    _cache[path] = found
    return found


__all__ = ["BinaryRequirement", "VmmBinary", "check_binary", "locate", "parse_version"]
