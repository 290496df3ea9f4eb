"""QEMU's migration stream, read and rewritten: what a paused sandbox stores is its difference
from its template.

A sandbox's guest RAM is its template's memory file mapped privately, so a migration of a running
sandbox carries every page of that RAM, also the pages it never wrote. :func:`filter_against`
reads such a stream and drops every page of the main RAM block that is equal to the template's
page at the same offset; restoring the result over the template's memory file (``share=off``, as
every sandbox starts) gives the same guest: the pages missing from the stream are the file's.
:func:`merge_into` instead writes template + written pages as one full memory file, with a
stream that holds no page of that block (a memory file several VMs can share, like a template's).

The format is QEMU 7.2's (``migration/savevm.c``, ``migration/ram.c``), read from its
description, not from its code:

- file header: be32 magic ``QEVM``, be32 version 3;
- a configuration section: byte 0x07, be32 length + machine name, then subsections
  (byte 0x05, u8 length + name, be32 version, fields): ``configuration/target-page-bits`` (be32),
  ``configuration/capabilities`` (be32 count, each u8 length + name; ``x-ignore-shared`` is
  listed when set), ``configuration/uuid`` (16 bytes);
- sections: byte type, be32 section id; START and FULL add u8 length + idstr, be32 instance id,
  be32 version; each section ends with a footer (byte 0x7e, be32 section id). The iterable "ram"
  section comes first (START, PARTs, END), then the device sections (FULL), then EOF (0x00) and
  a JSON description of the devices; everything after the "ram" section is copied as it is;
- the "ram" section is a run of records, each a be64 (page offset | flags) until one with EOS:
  MEM_SIZE (total bytes, then each block: u8 length + idstr, be64 length, and with
  x-ignore-shared be64 its guest address, until the lengths add up to the total), ZERO (1 fill
  byte), PAGE (one 4 KiB page); page records name their block (u8 length + idstr) unless
  CONTINUE says it is the block of the record before.

Compressed, XBZRLE, multifd and postcopy streams are refused with :class:`StreamFormatError`:
trenvx never turns those on.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

MAGIC = 0x5145564D  # "QEVM"
VERSION = 3
PAGE_SIZE = 4096
FLAG_BITS = PAGE_SIZE - 1
"""A record's be64 is page offset | flags: the flags are the bits below the target page size."""

SECTION_EOF = 0x00
SECTION_START = 0x01
SECTION_PART = 0x02
SECTION_END = 0x03
SECTION_FULL = 0x04
SUBSECTION = 0x05
CONFIGURATION = 0x07
COMMAND = 0x08
FOOTER = 0x7E

RAM_ZERO = 0x02
RAM_MEM_SIZE = 0x04
RAM_PAGE = 0x08
RAM_EOS = 0x10
RAM_CONTINUE = 0x20
RAM_XBZRLE = 0x40
RAM_HOOK = 0x80
RAM_COMPRESS_PAGE = 0x100

RAM_SECTION = "ram"
MAIN_BLOCK = "mem"
"""The RAM block of a q35 machine's ``-machine memory-backend=mem``: the guest's main memory."""
IGNORE_SHARED = "x-ignore-shared"
ZERO_PAGE = bytes(PAGE_SIZE)
COPY_CHUNK = 1 << 20


class StreamFormatError(ValueError):
    """The bytes are not a migration stream this module can rewrite; the message says where and why."""


@dataclass
class RamBlock:
    name: str
    length: int


@dataclass
class StreamStats:
    """What a rewrite saw and kept."""

    machine: str = ""
    ignore_shared: bool = False
    blocks: list[RamBlock] = field(default_factory=list)
    pages_in: dict[str, int] = field(default_factory=dict)
    """Page records (PAGE or ZERO) read, per block."""
    pages_kept: dict[str, int] = field(default_factory=dict)
    """Page records written to the output stream, per block."""
    zero_in: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    device_bytes: int = 0
    """Bytes of the stream after the "ram" section (device state, EOF, device description)."""
    merged_pages: int = 0
    """:func:`merge_into`: pages of the main block written into the memory file."""

    def kept(self, block: str) -> int:
        return self.pages_kept.get(block, 0)


@dataclass(frozen=True)
class PageRecord:
    block: str
    offset: int
    zero: bool
    data: bytes
    """The page (PAGE), or the one fill byte (ZERO)."""


PageDecision = Callable[[PageRecord], bool]
"""Called for every page record of the stream; True keeps it in the output."""


class _Reader:
    def __init__(self, src: BinaryIO) -> None:
        self.src = src
        self.pos = 0
        self._peeked: bytes = b""

    def exact(self, n: int, what: str) -> bytes:
        out = self._peeked[:n]
        self._peeked = self._peeked[n:]
        while len(out) < n:
            chunk = self.src.read(n - len(out))
            if not chunk:
                raise StreamFormatError(f"the stream ends at byte {self.pos + len(out)} inside {what} "
                                        f"({n} bytes expected)")
            out += chunk
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return self.exact(1, what)[0]

    def be32(self, what: str) -> int:
        return int(struct.unpack(">I", self.exact(4, what))[0])

    def be64(self, what: str) -> int:
        return int(struct.unpack(">Q", self.exact(8, what))[0])

    def str8(self, what: str) -> bytes:
        return self.exact(self.u8(what), what)

    def peek_u8(self) -> int | None:
        if not self._peeked:
            self._peeked = self.src.read(1)
        return self._peeked[0] if self._peeked else None

    def rest(self) -> Iterator[bytes]:
        """Everything left, in chunks."""
        if self._peeked:
            data, self._peeked = self._peeked, b""
            self.pos += len(data)
            yield data
        while True:
            chunk = self.src.read(COPY_CHUNK)
            if not chunk:
                return
            self.pos += len(chunk)
            yield chunk


class _Writer:
    def __init__(self, dst: BinaryIO | None) -> None:
        self.dst = dst
        self.count = 0
        self.last_block: str | None = None
        """The block the reader of this output will take a CONTINUE record for."""

    def write(self, data: bytes) -> None:
        if self.dst is not None:
            self.dst.write(data)
        self.count += len(data)

    def u8(self, v: int) -> None:
        self.write(bytes((v,)))

    def be32(self, v: int) -> None:
        self.write(struct.pack(">I", v))

    def be64(self, v: int) -> None:
        self.write(struct.pack(">Q", v))

    def str8(self, s: bytes) -> None:
        self.u8(len(s))
        self.write(s)

    def page(self, rec: PageRecord) -> None:
        flags = RAM_ZERO if rec.zero else RAM_PAGE
        name = rec.block.encode()
        if self.last_block == rec.block:
            self.be64(rec.offset | flags | RAM_CONTINUE)
        else:
            self.be64(rec.offset | flags)
            self.str8(name)
            self.last_block = rec.block
        self.write(rec.data)


def rewrite(src: BinaryIO, dst: BinaryIO | None, keep: PageDecision,
            on_blocks: Callable[[list[RamBlock]], None] | None = None) -> StreamStats:
    """Copy the migration stream ``src`` to ``dst`` (None: only read it), page records only where
    ``keep`` says so; every other byte as it was (CONTINUE flags are recomputed for the records
    kept). ``on_blocks`` sees the RAM blocks once they are read (before any page; it may raise).
    Raises :class:`StreamFormatError` for anything but an uncompressed precopy stream."""
    r, w, stats = _Reader(src), _Writer(dst), StreamStats()
    magic, version = r.be32("the file magic"), r.be32("the file version")
    if magic != MAGIC:
        raise StreamFormatError(f"not a QEMU migration stream: magic {magic:#010x}, expected {MAGIC:#010x} (QEVM)")
    if version != VERSION:
        raise StreamFormatError(f"QEMU migration stream version {version}; only version {VERSION} is understood")
    w.be32(magic)
    w.be32(version)
    ram_id: int | None = None
    recv_block: list[str | None] = [None]
    while True:
        at = r.pos
        kind = r.peek_u8()
        if kind is None:
            raise StreamFormatError(f"the stream ends at byte {at} before its EOF section")
        if kind in (SECTION_FULL, SECTION_EOF):
            # The device sections, EOF and the device description: copied as they are.
            for chunk in r.rest():
                w.write(chunk)
                stats.device_bytes += len(chunk)
            break
        r.u8("a section type")
        w.u8(kind)
        if kind == CONFIGURATION:
            _configuration(r, w, stats)
        elif kind == SECTION_START:
            section_id = r.be32("a section id")
            idstr = r.str8("a section name")
            instance, version_id = r.be32("an instance id"), r.be32("a section version")
            if idstr.decode(errors="replace") != RAM_SECTION:
                raise StreamFormatError(
                    f"iterable section {idstr.decode(errors='replace')!r} at byte {at}: only QEMU's RAM is "
                    "understood (block migration, dirty bitmaps and VFIO are not used by trenvx)")
            ram_id = section_id
            w.be32(section_id)
            w.str8(idstr)
            w.be32(instance)
            w.be32(version_id)
            _ram_records(r, w, stats, keep, recv_block)
            if on_blocks is not None:
                on_blocks(stats.blocks)
            _footer(r, w, section_id)
        elif kind in (SECTION_PART, SECTION_END):
            section_id = r.be32("a section id")
            if section_id != ram_id:
                raise StreamFormatError(f"section {section_id} at byte {at} continues no RAM section started before")
            w.be32(section_id)
            _ram_records(r, w, stats, keep, recv_block)
            _footer(r, w, section_id)
        elif kind == COMMAND:
            raise StreamFormatError(f"a migration command at byte {at}: postcopy and return-path streams "
                                    "are not understood")
        else:
            raise StreamFormatError(f"unknown section type {kind:#04x} at byte {at}")
    stats.bytes_in, stats.bytes_out = r.pos, w.count
    return stats


def _configuration(r: _Reader, w: _Writer, stats: StreamStats) -> None:
    length = r.be32("the machine name's length")
    if length > 256:
        raise StreamFormatError(f"a machine name of {length} bytes in the configuration section")
    name = r.exact(length, "the machine name")
    w.be32(length)
    w.write(name)
    stats.machine = name.decode(errors="replace")
    while r.peek_u8() == SUBSECTION:
        r.u8("a subsection marker")
        sub = r.str8("a subsection name")
        version_id = r.be32("a subsection version")
        w.u8(SUBSECTION)
        w.str8(sub)
        w.be32(version_id)
        text = sub.decode(errors="replace")
        if text == "configuration/target-page-bits":
            bits = r.be32("the target page bits")
            if bits != 12:
                raise StreamFormatError(f"target pages of 2^{bits} bytes; only 4 KiB pages are understood")
            w.be32(bits)
        elif text == "configuration/capabilities":
            count = r.be32("the capability count")
            w.be32(count)
            for _ in range(count):
                cap = r.str8("a capability")
                w.str8(cap)
                if cap.decode(errors="replace") == IGNORE_SHARED:
                    stats.ignore_shared = True
        elif text == "configuration/uuid":
            w.write(r.exact(16, "the VM's uuid"))
        else:
            raise StreamFormatError(f"unknown configuration subsection {text!r}")


def _footer(r: _Reader, w: _Writer, section_id: int) -> None:
    if r.peek_u8() != FOOTER:
        return  # streams of machines without section footers
    r.u8("a section footer")
    got = r.be32("a section footer's id")
    if got != section_id:
        raise StreamFormatError(f"section {section_id} ends with the footer of section {got} at byte {r.pos - 5}")
    w.u8(FOOTER)
    w.be32(got)


def _ram_records(r: _Reader, w: _Writer, stats: StreamStats, keep: PageDecision, recv: list[str | None]) -> None:
    while True:
        at = r.pos
        header = r.be64("a RAM record")
        flags, offset = header & FLAG_BITS, header & ~FLAG_BITS
        if flags & (RAM_XBZRLE | RAM_COMPRESS_PAGE | RAM_HOOK):
            raise StreamFormatError(f"a compressed, XBZRLE or RDMA RAM record (flags {flags:#x}) at byte {at}")
        if flags & RAM_MEM_SIZE:
            w.be64(header)
            _ram_blocks(r, w, stats, offset)
            w.last_block = None
        elif flags & (RAM_ZERO | RAM_PAGE):
            if flags & RAM_CONTINUE:
                block = recv[0]
                if block is None:
                    raise StreamFormatError(f"a RAM page at byte {at} continues a block never named")
            else:
                block = r.str8("a RAM block name").decode(errors="replace")
                recv[0] = block
            zero = bool(flags & RAM_ZERO)
            data = r.exact(1 if zero else PAGE_SIZE, "a RAM page")
            stats.pages_in[block] = stats.pages_in.get(block, 0) + 1
            stats.zero_in += zero
            rec = PageRecord(block, offset, zero, data)
            if keep(rec):
                w.page(rec)
                stats.pages_kept[block] = stats.pages_kept.get(block, 0) + 1
        elif flags & RAM_EOS:
            w.be64(header)
            return
        else:
            raise StreamFormatError(f"a RAM record with unknown flags {flags:#x} at byte {at}")


def _ram_blocks(r: _Reader, w: _Writer, stats: StreamStats, total: int) -> None:
    left = total
    while left > 0:
        name = r.str8("a RAM block name")
        length = r.be64("a RAM block's length")
        w.str8(name)
        w.be64(length)
        if stats.ignore_shared:
            w.be64(r.be64("a RAM block's address"))
        stats.blocks.append(RamBlock(name.decode(errors="replace"), length))
        left -= length
    if left:
        raise StreamFormatError(f"the RAM blocks add up to {total - left} bytes, not the {total} announced")


class _Template:
    """The template's memory file, mapped read-only, for page comparisons."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb")
        self.size = os.fstat(self._file.fileno()).st_size
        self._map = mmap.mmap(self._file.fileno(), 0, prot=mmap.PROT_READ) if self.size else None

    def page(self, offset: int) -> bytes | None:
        if self._map is None or offset + PAGE_SIZE > self.size:
            return None
        return self._map[offset:offset + PAGE_SIZE]

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        self._file.close()

    def __enter__(self) -> "_Template":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def same_as_template(rec: PageRecord, template_page: bytes | None) -> bool:
    """Whether restoring over the template makes this record unnecessary."""
    if template_page is None:
        return False
    if rec.zero:
        return rec.data == b"\0" and template_page == ZERO_PAGE
    return rec.data == template_page


def _block_check(block: str, size: int, path: Path) -> Callable[[list[RamBlock]], None]:
    """A check that the stream has RAM block ``block`` and that it is as long as the file ``path``."""
    def check(blocks: list[RamBlock]) -> None:
        found = [b for b in blocks if b.name == block]
        if not found:
            raise StreamFormatError(f"the stream has no RAM block {block!r} (its blocks: "
                                    f"{', '.join(b.name for b in blocks) or 'none'})")
        if found[0].length != size:
            raise StreamFormatError(f"RAM block {block!r} is {found[0].length} bytes and the memory file {path} "
                                    f"{size}: the stream is not of a VM of that template")
    return check


def filter_against(src: BinaryIO, dst: BinaryIO, template_memory: Path, block: str = MAIN_BLOCK) -> StreamStats:
    """Rewrite the stream ``src`` into ``dst`` without the pages of RAM block ``block`` that equal
    the page at the same offset of ``template_memory`` (ZERO records where that page is zero too).
    Pages of every other block (firmware, option ROMs, ACPI tables) are kept. A page sent twice
    keeps its last value: once a page of an offset is kept, later ones are kept too."""
    with _Template(template_memory) as tpl:
        written: set[int] = set()
        """Offsets of the block with a page kept: a later record equal to the template's page
        must then be kept too, as it overwrites that page (a page sent twice)."""

        def keep(rec: PageRecord) -> bool:
            if rec.block != block:
                return True
            if rec.offset not in written and same_as_template(rec, tpl.page(rec.offset)):
                return False
            written.add(rec.offset)
            return True

        return rewrite(src, dst, keep, _block_check(block, tpl.size, template_memory))


COPY_PAGES = 256
"""Pages copied from the base memory file at a time (1 MiB) where the stream did not carry them."""


def merge_into(src: BinaryIO, dst: BinaryIO, base_memory: Path, memory_out: Path,
                      block: str = MAIN_BLOCK) -> StreamStats:
    """Write ``memory_out`` as ``base_memory`` with every page of block ``block`` in ``src`` applied
    to it, and ``dst`` as the stream without any page of that block: restoring ``dst`` over
    ``memory_out`` gives the VM of ``src`` (``src`` may be filtered or not).

    The pages are written into a sparse file (zero pages stay holes) and only the pages the stream
    did not carry are copied from ``base_memory``: for the stream of a VM whose RAM is private
    (nearly every page), half the writes of copying the base first, and the file takes the space
    of the guest's non-zero pages."""
    size = base_memory.stat().st_size
    if size % PAGE_SIZE:
        raise StreamFormatError(f"the memory file {base_memory} is {size} bytes, not a whole number of pages")
    part = memory_out.with_name(memory_out.name + ".part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        seen = bytearray(size // PAGE_SIZE)
        """Per page of the block: 0 never sent, 1 sent and left a hole (zero), 2 written."""
        run = _Run(fd)

        def keep(rec: PageRecord) -> bool:
            if rec.block != block:
                return True
            if rec.offset + PAGE_SIZE > size:
                raise StreamFormatError(f"a page of block {block!r} at offset {rec.offset:#x} lies beyond the "
                                        f"{size} bytes of {base_memory}")
            index = rec.offset // PAGE_SIZE
            if rec.zero and rec.data != b"\0":
                data = rec.data * PAGE_SIZE  # a ZERO record's fill byte that is not 0
            elif rec.zero:  # (QEMU sends a page of zeros as a ZERO record)
                if seen[index] == 2:
                    run.write(rec.offset, ZERO_PAGE)  # a page sent again, zero this time
                seen[index] = max(seen[index], 1)
                return False
            else:
                data = rec.data
            run.write(rec.offset, data)
            seen[index] = 2
            return False

        def check(blocks: list[RamBlock]) -> None:
            found = [b for b in blocks if b.name == block]
            if not found or found[0].length != size:
                raise StreamFormatError(
                    f"the stream's RAM block {block!r} is {found[0].length if found else 'missing'} and the memory "
                    f"file {base_memory} {size} bytes: the stream is not of a VM of that memory file")

        stats = rewrite(src, dst, keep, check)
        run.flush()
        stats.merged_pages = len(seen) - seen.count(0)
        _fill_unsent(fd, base_memory, seen)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        part.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(part, memory_out)
    return stats


class _Run:
    """Pages written at increasing offsets, gathered into one ``pwrite`` per contiguous run."""

    MAX = 1 << 20

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.start = 0
        self.parts: list[bytes] = []
        self.length = 0

    def write(self, offset: int, data: bytes) -> None:
        if self.parts and (offset != self.start + self.length or self.length >= self.MAX):
            self.flush()
        if not self.parts:
            self.start = offset
        self.parts.append(data)
        self.length += len(data)

    def flush(self) -> None:
        if self.parts:
            os.pwrite(self.fd, b"".join(self.parts), self.start)
            self.parts, self.length = [], 0


def _fill_unsent(fd: int, base_memory: Path, seen: bytearray) -> None:
    """Copy the pages no record carried from ``base_memory`` (runs at a time; zero runs stay holes)."""
    with open(base_memory, "rb") as base:
        index, pages = 0, len(seen)
        while index < pages:
            if seen[index]:
                index += 1
                continue
            end = index
            while end < pages and not seen[end] and end - index < COPY_PAGES:
                end += 1
            base.seek(index * PAGE_SIZE)
            chunk = base.read((end - index) * PAGE_SIZE)
            if chunk.count(0) != len(chunk):
                os.pwrite(fd, chunk, index * PAGE_SIZE)
            index = end

def summarize(src: BinaryIO) -> StreamStats:
    """Read a stream through, keeping nothing: its machine, blocks and page counts."""
    return rewrite(src, None, lambda rec: True)


