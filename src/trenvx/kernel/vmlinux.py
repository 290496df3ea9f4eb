"""The uncompressed ELF kernel (``vmlinux``) inside a distribution's ``bzImage``.

Firecracker and Cloud Hypervisor boot an ELF ``vmlinux`` (through its PVH entry point, an ELF
note) rather than a bzImage. Distributions ship only the bzImage, whose protected-mode part is
a decompressor plus the compressed ``vmlinux``: the boot header (``HdrS``, protocol >= 2.08)
gives the payload's offset and length. The payload is recognised by its magic number and
decompressed with Python's own modules (gzip, xz, lzma, bzip2), a built-in decoder of the LZ4
legacy frame that Debian's cloud kernel uses (``CONFIG_KERNEL_LZ4``; ~1 s for its 50 MB, once per
kernel), or the ``zstd`` program (zstd is not in Python 3.11's standard library). What follows the ELF image (the
relocation table the decompressor appends) is cut off.

:func:`ensure_vmlinux` caches the result as ``<cache_dir>/vmlinux-<digest of the bzImage>``.
"""

from __future__ import annotations

import asyncio
import bz2
import hashlib
import lzma
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

from trenvx.build_errors import KernelError
from trenvx.filelock import AsyncFileLock

EXTRACTOR_VERSION = "1"
LZ4_LEGACY_MAGIC = 0x184C2102
_LZ4_LEGACY_BLOCK = 8 << 20  # uncompressed size of every block but the last
XEN_ELFNOTE_PHYS32_ENTRY = 18
TOOL_TIMEOUT_S = 120.0

_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (struct.pack("<I", LZ4_LEGACY_MAGIC), "lz4"),
    (b"BZh", "bzip2"),
    (b"\x89LZO", "lzo"),
    (b"\x5d\x00\x00", "lzma"),
)


def bzimage_payload(data: bytes) -> bytes:
    """The compressed kernel inside a bzImage (boot protocol >= 2.08)."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        raise KernelError("not a bzImage: no 'HdrS' boot header at offset 0x202")
    (version,) = struct.unpack_from("<H", data, 0x206)
    if version < 0x208:
        raise KernelError(f"bzImage boot protocol {version >> 8}.{version & 0xff} has no payload fields (needs >= 2.08)")
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if start + length > len(data):
        raise KernelError(f"bzImage payload [{start}, {start + length}) lies beyond the file's {len(data)} bytes")
    return data[start:start + length]


def compression_of(payload: bytes) -> str:
    for magic, name in _MAGICS:
        if payload.startswith(magic):
            return name
    raise KernelError(f"unknown compression of the bzImage payload (starts with {payload[:8].hex()})")


def lz4_block_decompress(src: bytes | memoryview, out: bytearray) -> None:
    """Decode one LZ4 block (no frame) from ``src``, appending to ``out`` (matches may reach back into it)."""
    i, n = 0, len(src)
    while i < n:
        token = src[i]
        i += 1
        lit = token >> 4
        if lit == 15:
            while True:
                b = src[i]
                i += 1
                lit += b
                if b != 255:
                    break
        if lit:
            out += src[i:i + lit]
            i += lit
        if i >= n:
            break  # the last sequence has literals only
        offset = src[i] | (src[i + 1] << 8)
        i += 2
        if offset == 0 or offset > len(out):
            raise KernelError(f"corrupt LZ4 block: match offset {offset} with {len(out)} bytes decoded")
        mlen = token & 15
        if mlen == 15:
            while True:
                b = src[i]
                i += 1
                mlen += b
                if b != 255:
                    break
        mlen += 4
        start = len(out) - offset
        if mlen <= offset:
            out += out[start:start + mlen]
        else:  # overlapping copy: the pattern of the last `offset` bytes repeats
            pattern = bytes(out[start:])
            reps, rest = divmod(mlen, offset)
            out += pattern * reps + pattern[:rest]


def lz4_legacy_decompress(payload: bytes) -> bytes:
    """Decode an LZ4 legacy frame (``lz4 -l``), as the kernel's build writes it: magic, then blocks of
    (4-byte little-endian compressed size, data), then the kernel's 4-byte uncompressed size."""
    if struct.unpack_from("<I", payload)[0] != LZ4_LEGACY_MAGIC:
        raise KernelError("not an LZ4 legacy frame")
    view = memoryview(payload)
    out = bytearray()
    i = 4
    while i + 4 <= len(payload):
        (size,) = struct.unpack_from("<I", payload, i)
        if size == LZ4_LEGACY_MAGIC:  # concatenated frames
            i += 4
            continue
        if i + 4 + size > len(payload):
            break  # the size the kernel appends, not a block
        lz4_block_decompress(view[i + 4:i + 4 + size], out)
        i += 4 + size
    if len(payload) - i == 4 and struct.unpack_from("<I", payload, i)[0] != len(out):
        raise KernelError(
            f"LZ4 kernel decompressed to {len(out)} bytes but the bzImage says {struct.unpack_from('<I', payload, i)[0]}"
        )
    return bytes(out)


def _run_tool(argv: list[str], data: bytes) -> bytes:
    try:
        done = subprocess.run(argv, input=data, capture_output=True, timeout=TOOL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise KernelError(f"{argv[0]} took over {TOOL_TIMEOUT_S:.0f}s to decompress the kernel") from None
    if done.returncode != 0 and not done.stdout:
        raise KernelError(f"{' '.join(argv)} failed: {done.stderr.decode(errors='replace').strip()[:300]}")
    return done.stdout


def decompress_payload(payload: bytes) -> bytes:
    kind = compression_of(payload)
    if kind == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    if kind == "xz":
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)
    if kind == "lzma":
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(payload)
    if kind == "bzip2":
        return bz2.BZ2Decompressor().decompress(payload)
    if kind == "lz4":
        return lz4_legacy_decompress(payload)
    if kind == "zstd":
        tool = shutil.which("zstd")
        if not tool:
            raise KernelError("the kernel is zstd-compressed and the zstd program is missing: apt-get install zstd")
        return _run_tool([tool, "-dcq"], payload)
    raise KernelError(f"the kernel is {kind}-compressed, which trenvx cannot decompress; use a Debian cloud kernel")


def elf_image(data: bytes) -> bytes:
    """``data`` cut to the end of its ELF64 image (program data and section headers)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise KernelError(f"the decompressed kernel is not a 64-bit little-endian ELF (starts with {data[:8].hex()})")
    (phoff, shoff) = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 0x36)
    end = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
    for k in range(phnum):
        _t, _f, off, _va, _pa, filesz = struct.unpack_from("<IIQQQQ", data, phoff + k * phentsize)
        end = max(end, off + filesz)
    if end > len(data):
        raise KernelError(f"the decompressed kernel is truncated: its ELF headers reach byte {end} of {len(data)}")
    return data[:end]


def pvh_entry(elf: bytes) -> int | None:
    """The PVH entry address from the ELF note ``Xen``/``XEN_ELFNOTE_PHYS32_ENTRY``, or None."""
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for k in range(phnum):
        ptype, _f, off, _va, _pa, filesz = struct.unpack_from("<IIQQQQ", elf, phoff + k * phentsize)
        if ptype != 4:  # PT_NOTE
            continue
        i, end = off, off + filesz
        while i + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, i)
            name = elf[i + 12:i + 12 + namesz].rstrip(b"\0")
            desc_at = i + 12 + ((namesz + 3) & ~3)
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and descsz >= 4:
                return struct.unpack_from("<I" if descsz == 4 else "<Q", elf, desc_at)[0]
            i = desc_at + ((descsz + 3) & ~3)
    return None


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF ``vmlinux`` inside ``bzimage``."""
    return elf_image(decompress_payload(bzimage_payload(bzimage)))


def _digest(path: Path) -> str:
    h = hashlib.sha256(f"trenvx-vmlinux:{EXTRACTOR_VERSION}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _write_sync(bzimage: Path, out: Path) -> None:
    data = extract_vmlinux(bzimage.read_bytes())
    if pvh_entry(data) is None:
        raise KernelError(f"{bzimage} has no PVH entry note (CONFIG_PVH): Firecracker/Cloud Hypervisor cannot boot it")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.chmod(tmp, 0o444)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


async def ensure_vmlinux(bzimage: Path, cache_dir: Path) -> Path:
    """``cache_dir/vmlinux-<digest>`` extracted from ``bzimage`` (done once per distinct bzImage)."""
    try:
        digest = await asyncio.to_thread(_digest, bzimage)
    except FileNotFoundError:
        raise KernelError(f"kernel {bzimage} does not exist; fetch it with `python -m trenvx.kernel` or rebuild the template") from None
    out = cache_dir / f"vmlinux-{digest}"
    if out.is_file():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    async with AsyncFileLock(cache_dir / ".vmlinux.lock"):
        if not out.is_file():
            await asyncio.to_thread(_write_sync, bzimage, out)
    return out


__all__ = [
    "bzimage_payload", "compression_of", "decompress_payload", "elf_image", "ensure_vmlinux", "extract_vmlinux",
    "lz4_block_decompress", "lz4_legacy_decompress", "pvh_entry",
]
