"""memory_parts_of: a process's PSS grouped by mapping, read from this test's own process."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from trenvx.vmm.process import (
    GUEST_RAM,
    TCG_CODE,
    VMM_FILES,
    memory_of,
    memory_parts_of,
)

MiB = 2**20


def test_parts_name_files_and_large_anonymous_mappings(tmp_path: Path) -> None:
    image = tmp_path / "rootfs.ext4"
    image.write_bytes(b"\x01" * (4 * MiB))
    with open(image, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as view:
        assert sum(view[i] for i in range(0, 4 * MiB, 4096)) == 1024  # every page read: resident
        ram = mmap.mmap(-1, 8 * MiB)  # anonymous, like a VM's privately loaded guest RAM
        code = mmap.mmap(-1, 2 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,  # like TCG's buffer
                         prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        try:
            for i in range(0, 8 * MiB, 4096):
                ram[i] = 1
            for i in range(0, 2 * MiB, 4096):
                code[i] = 0xC3
            parts = memory_parts_of(os.getpid(), {image: "root image"}, ram_bytes=8 * MiB)
            _, pss = memory_of(os.getpid())
        finally:
            ram.close()
            code.close()
    assert parts["root image"] >= 4 * MiB * 0.9  # only this process maps it: PSS is all of it
    assert parts[GUEST_RAM] >= 8 * MiB
    assert parts[TCG_CODE] >= 2 * MiB
    assert parts[VMM_FILES] > 0  # the python binary and its libraries
    assert abs(sum(parts.values()) - pss) < 0.1 * pss  # the parts add up to the process's PSS


def test_a_process_that_is_gone_has_no_parts() -> None:
    assert memory_parts_of(2**22 + 12345) == {}
