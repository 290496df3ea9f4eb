"""keep_readonly_files: hole punches into read-only files do nothing; others go through.

Checked with util-linux's ``fallocate --punch-hole`` under the compiled library, as QEMU runs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from trenvx.vmm.base import DiskSpec, MachineSpec, VmmError, VmSpec
from trenvx.vmm.preload import ensure_keep_readonly_files
from trenvx.vmm.qemu import QemuDriver

pytestmark = pytest.mark.skipif(shutil.which("cc") is None or shutil.which("fallocate") is None,
                                reason="needs a C compiler and util-linux fallocate")


def punch(library: Path, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fallocate", "--punch-hole", "--offset", "0", "--length", "8192", str(path)],
                          env={**os.environ, "LD_PRELOAD": str(library)}, capture_output=True, text=True, timeout=30)


async def test_read_only_files_keep_their_data_and_writable_ones_are_punched(tmp_path: Path) -> None:
    library = await ensure_keep_readonly_files(tmp_path / "cache")
    assert library == await ensure_keep_readonly_files(tmp_path / "cache"), "built once, then cached"
    template, scratch = tmp_path / "memory", tmp_path / "scratch"
    for f in (template, scratch):
        f.write_bytes(b"\xab" * 16384)
    template.chmod(0o444)
    assert punch(library, template).returncode == 0, "QEMU must see success, so it drops its own copy"
    assert template.read_bytes() == b"\xab" * 16384, "a read-only template file is never zeroed"
    assert punch(library, scratch).returncode == 0
    assert scratch.read_bytes()[:8192] == bytes(8192) and scratch.read_bytes()[8192:] == b"\xab" * 8192


async def test_qemu_refuses_a_writable_memory_file_mapped_privately(tmp_path: Path) -> None:
    memory = tmp_path / "memory"
    memory.write_bytes(b"")
    m = MachineSpec(vcpu=1, mem_mb=64, accelerator="tcg", kernel=Path("/k"), initrd=Path("/i"), cmdline="")
    spec = VmSpec(name="x", workdir=tmp_path / "w", machine=m, memory_file=memory, memory_shared=False,
                  root_disk=DiskSpec(tmp_path / "d"))
    driver = QemuDriver(cache_dir=tmp_path / "cache")
    with pytest.raises(VmmError, match="is writable"):
        await driver.prestart(spec)
    memory.chmod(0o444)
    env = await driver._environment(spec)
    assert Path(env["LD_PRELOAD"]).is_file()
