"""Helpers of the Firecracker / Cloud Hypervisor driver tests: a fake VMM binary (answers
``--version``, otherwise idles like a VMM waiting on its API), a tiny synthetic bzImage whose
payload is a gzip'd ELF with a PVH note, VM specs, and serving a stand-in API on the socket a
driver's freshly spawned process is expected to create."""

from __future__ import annotations

import asyncio
import gzip
import struct
from pathlib import Path
from typing import Any

from trenvx.vmm.base import DiskSpec, MachineSpec, VmSpec


def fake_binary(tmp: Path, name: str, banner: str) -> Path:
    p = tmp / name
    p.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then echo "{banner}"; exit 0; fi\nexec sleep 120\n')
    p.chmod(0o755)
    return p


def tiny_elf(pvh_entry: int | None = 0x1000850, tail: bytes = b"RELOCS") -> bytes:
    """An ELF64 header, one PT_NOTE program header with the Xen PVH entry note, and trailing bytes."""
    note = b""
    if pvh_entry is not None:
        note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", pvh_entry)
    ehdr_size, phdr_size = 64, 56
    note_off = ehdr_size + phdr_size
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9 + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, 0, ehdr_size, 0, 0, ehdr_size, phdr_size, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    return ehdr + phdr + note + tail


def tiny_bzimage(payload: bytes) -> bytes:
    """A bzImage (boot protocol 2.15, one setup sector) around ``payload``."""
    setup = bytearray(2 * 512)
    setup[0x1F1] = 1
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)
    struct.pack_into("<II", setup, 0x248, 16, len(payload))
    return bytes(setup) + b"\0" * 16 + payload + b"\0" * 8


def kernel_files(tmp: Path) -> tuple[Path, Path]:
    kernel, initrd = tmp / "vmlinuz", tmp / "initrd.cpio"
    kernel.write_bytes(tiny_bzimage(gzip.compress(tiny_elf())))
    initrd.write_bytes(b"070701")
    return kernel, initrd


def vm_spec(tmp: Path, name: str, disk: Path, *, accelerator: str = "kvm", memory_file: Path | None = None,
            **kw: Any) -> VmSpec:
    kernel, initrd = kernel_files(tmp)
    machine = MachineSpec(vcpu=2, mem_mb=256, accelerator=accelerator, kernel=kernel, initrd=initrd,  # type: ignore[arg-type]
                          cmdline="console=ttyS0 quiet root=/dev/vda rw trenvx.net=10.0.2.15/24,10.0.2.2 trenvx.dns=10.0.2.3")
    return VmSpec(name=name, workdir=tmp / name / "vm", machine=machine,
                  memory_file=memory_file or tmp / name / "memory", memory_shared=False,
                  root_disk=DiskSpec(disk, "raw"), **kw)


async def serve_when_spawned(workdir: Path, socket_name: str, api: Any, timeout: float = 10.0) -> None:
    """Start ``api`` on ``workdir/socket_name`` once a VMM process was spawned there (``vmm.pid``)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (workdir / "vmm.pid").exists():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"no VMM was spawned in {workdir}")
        await asyncio.sleep(0.005)
    await api.start(workdir / socket_name)
