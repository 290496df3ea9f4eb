"""The migration stream filter and merge (trenvx.vmm.qemu_stream) on synthetic streams.

The streams here are written by a small encoder of this file (not by the module under test), in
QEMU 7.2's format; hypothesis varies the blocks, the pages, their order, repeats and the CONTINUE
flags. What must hold: restoring the filtered stream over the template gives the same memory as
restoring the original one; only pages of the main block equal to the template's are dropped;
everything after the RAM section is copied byte for byte; the merge writes the same memory as a
file. A stream captured from a real VM is checked by tests/e2e/test_pause_resume.py.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trenvx.vmm import qemu_stream as qs

P = qs.PAGE_SIZE


# -- an independent encoder and a reference loader -------------------------------------------------

@dataclass
class Rec:
    block: str
    page: int
    zero: bool
    data: bytes  # the page, or b"\0" for ZERO
    cont: bool = False  # ask for CONTINUE (only honoured when the block is the previous record's)


@dataclass
class Stream:
    blocks: list[tuple[str, int]]  # name, pages
    parts: list[list[Rec]]  # records of each PART / END section
    tail: bytes = b"\x04\x00\x00\x00\x05\x05timer\x00\x00\x00\x00\x00\x00\x00\x01" + b"devicestate" + b"\x00"
    ignore_shared: bool = True
    footers: bool = True
    uuid: bool = False
    extra_caps: list[str] = field(default_factory=list)


def s8(b: bytes) -> bytes:
    return bytes((len(b),)) + b


def encode(s: Stream) -> bytes:
    out = bytearray(struct.pack(">II", qs.MAGIC, 3))
    out += b"\x07" + struct.pack(">I", 6) + b"pc-q35"
    caps = ([qs.IGNORE_SHARED] if s.ignore_shared else []) + s.extra_caps
    if caps:
        out += b"\x05" + s8(b"configuration/capabilities") + struct.pack(">II", 1, len(caps))
        for c in caps:
            out += s8(c.encode())
    if s.uuid:
        out += b"\x05" + s8(b"configuration/uuid") + struct.pack(">I", 1) + bytes(range(16))
    ram_id = 2

    def footer() -> bytes:
        return b"\x7e" + struct.pack(">I", ram_id) if s.footers else b""

    total = sum(n * P for _, n in s.blocks)
    out += b"\x01" + struct.pack(">I", ram_id) + s8(b"ram") + struct.pack(">II", 0, 4)
    out += struct.pack(">Q", total | qs.RAM_MEM_SIZE)
    for i, (name, n) in enumerate(s.blocks):
        out += s8(name.encode()) + struct.pack(">Q", n * P)
        if s.ignore_shared:
            out += struct.pack(">Q", 0x100000000 * i)
    out += struct.pack(">Q", qs.RAM_EOS) + footer()
    last = None
    for i, part in enumerate(s.parts):
        out += (b"\x03" if i == len(s.parts) - 1 else b"\x02") + struct.pack(">I", ram_id)
        for r in part:
            flags = qs.RAM_ZERO if r.zero else qs.RAM_PAGE
            if r.cont and last == r.block:
                out += struct.pack(">Q", r.page * P | flags | qs.RAM_CONTINUE)
            else:
                out += struct.pack(">Q", r.page * P | flags) + s8(r.block.encode())
            last = r.block
            out += r.data
        out += struct.pack(">Q", qs.RAM_EOS) + footer()
    return bytes(out) + s.tail


def load(stream: bytes, template: bytes) -> tuple[bytes, list[tuple[str, int, bytes]], bytes]:
    """What a VM restored from ``stream`` over ``template`` holds: main block memory, the
    records of the other blocks in order, and the bytes after the RAM section."""
    mem = bytearray(template)
    others: list[tuple[str, int, bytes]] = []

    def keep(rec: qs.PageRecord) -> bool:
        if rec.block == qs.MAIN_BLOCK:
            mem[rec.offset:rec.offset + P] = bytes(P) if rec.zero else rec.data
        else:
            others.append((rec.block, rec.offset, rec.data))
        return True

    stats = qs.rewrite(io.BytesIO(stream), None, keep)
    tail = stream[len(stream) - stats.device_bytes:] if stats.device_bytes else b""
    return bytes(mem), others, tail


# -- strategies -----------------------------------------------------------------------------------

def page_bytes(seed: int) -> bytes:
    return bytes([seed % 251 + 1]) * 16 + bytes(P - 16)


@st.composite
def streams(draw: st.DrawFn) -> tuple[Stream, bytes]:
    main_pages = draw(st.integers(1, 12))
    template = bytearray()
    for i in range(main_pages):
        template += bytes(P) if draw(st.booleans()) else page_bytes(1000 + i)
    blocks = [(qs.MAIN_BLOCK, main_pages)]
    if draw(st.booleans()):
        blocks.insert(draw(st.integers(0, 1)), ("pc.bios", draw(st.integers(1, 3))))
    if draw(st.booleans()):
        blocks.append(("/rom@etc/acpi/tables", 2))
    sizes = dict(blocks)

    def record() -> st.SearchStrategy[Rec]:
        @st.composite
        def one(d: st.DrawFn) -> Rec:
            name = d(st.sampled_from([b for b, _ in blocks]))
            page = d(st.integers(0, sizes[name] - 1))
            kind = d(st.sampled_from(["zero", "template", "other"]))
            if kind == "zero":
                return Rec(name, page, True, b"\0", d(st.booleans()))
            if kind == "template" and name == qs.MAIN_BLOCK:
                data = bytes(template[page * P:(page + 1) * P])
                if data == bytes(P):
                    data = page_bytes(7)  # QEMU sends a zero page as ZERO, never as PAGE
                return Rec(name, page, False, data, d(st.booleans()))
            return Rec(name, page, False, page_bytes(d(st.integers(0, 500))), d(st.booleans()))
        return one()

    parts = draw(st.lists(st.lists(record(), max_size=20), min_size=1, max_size=4))
    s = Stream(blocks, parts, ignore_shared=draw(st.booleans()), footers=draw(st.booleans()),
               uuid=draw(st.booleans()), tail=draw(st.sampled_from([Stream.__dataclass_fields__["tail"].default,
                                                                     b"\x00", b"\x04" + bytes(range(256)) * 3])))
    return s, bytes(template)


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- properties -----------------------------------------------------------------------------------

@SETTINGS
@given(streams())
def test_the_filtered_stream_restores_the_same_memory(tmp_path: Path, case: tuple[Stream, bytes]) -> None:
    s, template = case
    tpl = tmp_path / "memory"
    tpl.write_bytes(template)
    original = encode(s)
    out = io.BytesIO()
    stats = qs.filter_against(io.BytesIO(original), out, tpl)
    filtered = out.getvalue()
    assert load(filtered, template) == load(original, template)
    assert stats.bytes_in == len(original) and stats.bytes_out == len(filtered) <= len(original)
    # what was dropped: only pages of the main block (and only where that changes nothing)
    for name, _ in s.blocks:
        if name != qs.MAIN_BLOCK:
            assert stats.kept(name) == stats.pages_in.get(name, 0)
    # filtering again drops nothing more
    again = io.BytesIO()
    qs.filter_against(io.BytesIO(filtered), again, tpl)
    assert again.getvalue() == filtered


@SETTINGS
@given(streams())
def test_a_page_equal_to_the_template_is_dropped_unless_it_overwrites_one_kept(tmp_path: Path,
                                                                              case: tuple[Stream, bytes]) -> None:
    s, template = case
    tpl = tmp_path / "memory"
    tpl.write_bytes(template)
    stats = qs.filter_against(io.BytesIO(encode(s)), io.BytesIO(), tpl)
    needed, seen = 0, set()
    for part in s.parts:
        for r in part:
            if r.block != qs.MAIN_BLOCK:
                continue
            tp = template[r.page * P:(r.page + 1) * P]
            same = (tp == bytes(P)) if r.zero else (r.data == tp)
            if r.page in seen or not same:
                needed += 1
                seen.add(r.page)
    assert stats.kept(qs.MAIN_BLOCK) == needed


@SETTINGS
@given(streams())
def test_merge_writes_the_memory_and_a_stream_without_its_pages(tmp_path: Path, case: tuple[Stream, bytes]) -> None:
    s, template = case
    tpl = tmp_path / "memory"
    tpl.write_bytes(template)
    original = encode(s)
    mem, others, tail = load(original, template)
    out = io.BytesIO()
    stats = qs.merge_into(io.BytesIO(original), out, tpl, tmp_path / "merged")
    assert (tmp_path / "merged").read_bytes() == mem
    # merged_pages: distinct non-zero pages written (zero pages stay holes of the sparse file)
    assert stats.kept(qs.MAIN_BLOCK) == 0 and stats.merged_pages <= stats.pages_in.get(qs.MAIN_BLOCK, 0)
    # restoring the merged stream over the merged file: the same VM
    assert load(out.getvalue(), mem) == (mem, others, tail)
    assert not (tmp_path / "merged.part").exists()


@SETTINGS
@given(streams(), st.data())
def test_a_truncated_stream_is_a_format_error(tmp_path: Path, case: tuple[Stream, bytes], data: st.DataObject) -> None:
    s, template = case
    tpl = tmp_path / "memory"
    tpl.write_bytes(template)
    original = encode(s)
    tail_at = len(original) - len(s.tail)
    cut = data.draw(st.integers(0, tail_at - 1))
    with pytest.raises(qs.StreamFormatError):
        qs.filter_against(io.BytesIO(original[:cut]), io.BytesIO(), tpl)


def test_records_after_a_dropped_page_name_their_block_again(tmp_path: Path) -> None:
    """CONTINUE means 'the block of the record before': once the record that named the block is
    dropped, the next one kept must name it itself."""
    template = bytes(P) + page_bytes(1)
    tpl = tmp_path / "memory"
    tpl.write_bytes(template)
    s = Stream([("pc.bios", 1), (qs.MAIN_BLOCK, 2)], [[
        Rec("pc.bios", 0, False, page_bytes(3)),
        Rec(qs.MAIN_BLOCK, 0, True, b"\0"),  # equal to the template: dropped
        Rec(qs.MAIN_BLOCK, 1, False, page_bytes(9), cont=True),  # kept: must name "mem" now
    ]])
    out = io.BytesIO()
    stats = qs.filter_against(io.BytesIO(encode(s)), out, tpl)
    assert stats.kept(qs.MAIN_BLOCK) == 1 and stats.kept("pc.bios") == 1
    assert b"\x03mem" in out.getvalue()
    assert load(out.getvalue(), template)[0] == bytes(P) + page_bytes(9)


def test_the_configuration_says_whether_x_ignore_shared_was_on(tmp_path: Path) -> None:
    for on in (True, False):
        s = Stream([(qs.MAIN_BLOCK, 1)], [[]], ignore_shared=on, extra_caps=["other-cap"], uuid=True)
        stats = qs.summarize(io.BytesIO(encode(s)))
        assert stats.ignore_shared is on and stats.machine == "pc-q35"
        assert [b.name for b in stats.blocks] == [qs.MAIN_BLOCK]


@pytest.mark.parametrize("mutate,message", [
    (lambda b: b"XXXX" + b[4:], "not a QEMU migration stream"),
    (lambda b: b[:4] + struct.pack(">I", 2) + b[8:], "version 2"),
    (lambda b: b.replace(b"\x01\x00\x00\x00\x02\x03ram", b"\x01\x00\x00\x00\x02\x03blk"), "iterable section 'blk'"),
    (lambda b: b.replace(b"configuration/capabilities", b"configuration/capabilitiez"), "unknown configuration"),
])
def test_what_is_not_understood_is_refused_with_its_reason(tmp_path: Path, mutate, message: str) -> None:
    tpl = tmp_path / "memory"
    tpl.write_bytes(bytes(P))
    s = Stream([(qs.MAIN_BLOCK, 1)], [[Rec(qs.MAIN_BLOCK, 0, False, page_bytes(1))]])
    with pytest.raises(qs.StreamFormatError, match=message):
        qs.filter_against(io.BytesIO(mutate(encode(s))), io.BytesIO(), tpl)


def test_compressed_pages_are_refused(tmp_path: Path) -> None:
    tpl = tmp_path / "memory"
    tpl.write_bytes(bytes(P))
    raw = encode(Stream([(qs.MAIN_BLOCK, 1)], [[Rec(qs.MAIN_BLOCK, 0, False, page_bytes(1))]]))
    page_header = struct.pack(">Q", qs.RAM_PAGE) + b"\x03mem"
    raw = raw.replace(page_header, struct.pack(">Q", qs.RAM_XBZRLE) + b"\x03mem")
    with pytest.raises(qs.StreamFormatError, match="XBZRLE"):
        qs.filter_against(io.BytesIO(raw), io.BytesIO(), tpl)


def test_a_stream_of_another_memory_size_is_refused(tmp_path: Path) -> None:
    tpl = tmp_path / "memory"
    tpl.write_bytes(bytes(3 * P))
    s = Stream([(qs.MAIN_BLOCK, 2)], [[Rec(qs.MAIN_BLOCK, 0, False, page_bytes(1))]])
    with pytest.raises(qs.StreamFormatError, match="not of a VM of that template"):
        qs.filter_against(io.BytesIO(encode(s)), io.BytesIO(), tpl)
    with pytest.raises(qs.StreamFormatError, match="no RAM block 'mem'"):
        qs.filter_against(io.BytesIO(encode(Stream([("pc.ram", 3)], [[]]))), io.BytesIO(), tpl)
