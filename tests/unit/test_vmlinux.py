"""vmlinux extraction: synthetic bzImages of every supported compression, and the real Debian kernel."""

from __future__ import annotations

import bz2
import gzip
import lzma
from pathlib import Path

import pytest

from tests.unit.vmm_fakes import tiny_bzimage, tiny_elf
from trenvx.build_errors import KernelError
from trenvx.kernel.vmlinux import (
    bzimage_payload, compression_of, elf_image, ensure_vmlinux, extract_vmlinux, lz4_block_decompress, pvh_entry,
)

KERNELS = Path("/var/lib/trenvx/kernels")


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress, bz2.compress,
                                      lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE)])
def test_stdlib_compressions_round_trip(compress) -> None:
    elf = tiny_elf(tail=b"")
    out = extract_vmlinux(tiny_bzimage(compress(elf + b"appended relocations")))
    assert out == elf  # trailing relocations cut at the ELF's end
    assert pvh_entry(out) == 0x1000850


def test_lz4_block_literals_and_overlapping_match() -> None:
    # token 0x41: 4 literals "abcd", match length 1+4=5 at offset 2 -> "cdcdc"; then 1 final literal "!"
    block = bytes([0x41]) + b"abcd" + (2).to_bytes(2, "little") + bytes([0x10]) + b"!"
    out = bytearray()
    lz4_block_decompress(block, out)
    assert bytes(out) == b"abcdcdcdc!"


def test_not_a_bzimage_and_missing_pvh_are_clear() -> None:
    with pytest.raises(KernelError, match="HdrS"):
        bzimage_payload(b"\0" * 4096)
    with pytest.raises(KernelError, match="unknown compression"):
        compression_of(b"\x00\x01\x02\x03")
    assert pvh_entry(tiny_elf(pvh_entry=None)) is None
    with pytest.raises(KernelError, match="not a 64-bit"):
        elf_image(b"MZ" + b"\0" * 100)


async def test_ensure_vmlinux_caches_by_digest(tmp_path: Path) -> None:
    k = tmp_path / "vmlinuz"
    k.write_bytes(tiny_bzimage(gzip.compress(tiny_elf())))
    a = await ensure_vmlinux(k, tmp_path / "cache")
    assert a.read_bytes() == tiny_elf(tail=b"")
    mtime = a.stat().st_mtime_ns
    assert await ensure_vmlinux(k, tmp_path / "cache") == a and a.stat().st_mtime_ns == mtime
    k.write_bytes(tiny_bzimage(gzip.compress(tiny_elf(pvh_entry=0x2000))))
    assert await ensure_vmlinux(k, tmp_path / "cache") != a
    nopvh = tmp_path / "nopvh"
    nopvh.write_bytes(tiny_bzimage(gzip.compress(tiny_elf(pvh_entry=None))))
    with pytest.raises(KernelError, match="PVH"):
        await ensure_vmlinux(nopvh, tmp_path / "cache")


def _real_kernels() -> list[Path]:
    return sorted(KERNELS.glob("*/boot/vmlinuz-*")) if KERNELS.is_dir() else []


@pytest.mark.skipif(not _real_kernels(), reason=f"no Debian kernel under {KERNELS} (scripts/start.sh setup fetches one)")
def test_real_debian_kernel() -> None:
    bz = _real_kernels()[-1]
    config = next(bz.parent.glob("config-*")).read_text()
    kind = compression_of(bzimage_payload(bz.read_bytes()))
    assert f"CONFIG_KERNEL_{kind.upper()}=y" in config
    elf = extract_vmlinux(bz.read_bytes())
    assert elf[:4] == b"\x7fELF"
    assert pvh_entry(elf) is not None, "Debian's cloud kernel has CONFIG_PVH=y"
    assert len(elf) > 20 << 20
