"""The hashes of a build's files (trenvx.template.integrity): the digest, the once-per-process full
check, the stat-only check of each restore, damaged and old builds."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import pytest

from trenvx.layout import DataRoot
from trenvx.template import integrity
from trenvx.template.integrity import IntegrityChecker, TemplateDamaged, add_missing, file_digest, record
from trenvx.template.store import (
    MANIFEST, MachineRecord, SnapshotOrigin, TemplateBuild, TemplateManifest, TemplateStore,
)

SMALL_CHUNK = 4096


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 4 KiB, so that small files span many of them (and holes can be chunk-sized)."""
    monkeypatch.setattr(integrity, "CHUNK", SMALL_CHUNK)
    monkeypatch.setattr(integrity, "_zero_chunk_digest", None)


def manifest(name: str = "tpl", **kw) -> TemplateManifest:
    return TemplateManifest(
        name=name, build_id="20260101T000000-abcdef12", created_at="2026-01-01T00:00:00Z", vmm_type="qemu",
        input_digest="0" * 64, inputs={}, config={},
        machine=MachineRecord(vcpu=1, mem_mb=256, accelerator="tcg", kernel="/k", initrd="/i", cmdline="",
                              tcg_tb_size_mb=32),
        accelerator_reason="test", kernel_version="6", versions={}, sizes={}, stage_seconds={}, rootfs_source="x",
        **kw,
    )


def make_build(d: Path, *, hashed: bool = True, **kw) -> TemplateBuild:
    """A build directory with a sparse memory file, a root image and a device state."""
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "memory", "wb") as f:
        f.truncate(40 * SMALL_CHUNK)  # a hole, then data across a chunk boundary, then a hole
        f.seek(10 * SMALL_CHUNK + 100)
        f.write(os.urandom(2 * SMALL_CHUNK))
    (d / "rootfs.ext4").write_bytes(os.urandom(5 * SMALL_CHUNK + 17))
    (d / "vmstate").write_bytes(b"device state")
    m = manifest(integrity=record(d) if hashed else None, **kw)
    (d / MANIFEST).write_text(m.model_dump_json())
    return TemplateBuild(d, m)


def flip_byte(p: Path, offset: int) -> None:
    """Damage ``p`` in place (same size; its mtime changes, as any write's does)."""
    with open(p, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_digest_depends_on_contents_only_not_on_holes(tmp_path: Path) -> None:
    b = make_build(tmp_path / "b")
    sparse = b.path / "memory"
    dense = tmp_path / "dense"
    dense.write_bytes(sparse.read_bytes())  # the same bytes, every zero written
    assert os.stat(dense).st_blocks > os.stat(sparse).st_blocks, "the test needs a sparse file"
    assert file_digest(sparse) == file_digest(dense) == file_digest(sparse, threads=1)
    # holes are not read: the same digest as hashing every chunk's bytes
    import hashlib
    data = dense.read_bytes()
    top = hashlib.sha256(len(data).to_bytes(8, "little"))
    for i in range(0, len(data), SMALL_CHUNK):
        top.update(hashlib.sha256(data[i:i + SMALL_CHUNK]).digest())
    assert file_digest(sparse) == top.hexdigest()
    flip_byte(dense, 39 * SMALL_CHUNK)  # in what was a hole
    assert file_digest(dense) != file_digest(sparse)
    # the size is part of it: a file extended with zeros differs
    with open(dense, "r+b") as f:
        flip_byte(dense, 39 * SMALL_CHUNK)
        f.truncate(41 * SMALL_CHUNK)
    assert file_digest(dense) != file_digest(sparse)


def test_record_hashes_the_build_files_present(tmp_path: Path) -> None:
    b = make_build(tmp_path / "b")
    assert b.manifest.integrity is not None
    files = b.manifest.integrity.files
    assert sorted(files) == ["memory", "rootfs.ext4", "vmstate"]
    assert files["rootfs.ext4"].size == 5 * SMALL_CHUNK + 17
    assert files["vmstate"].digest == file_digest(b.path / "vmstate")
    # the manifest round-trips
    again = TemplateManifest.model_validate_json((b.path / MANIFEST).read_text())
    assert again.integrity == b.manifest.integrity


def test_full_check_once_then_stat_only(tmp_path: Path) -> None:
    b = make_build(tmp_path / "b")
    c = IntegrityChecker()
    assert not c.quick(b), "never verified: a full check is due"
    asyncio.run(c.check(b))
    assert c.full_checks == 1
    for _ in range(20):
        asyncio.run(c.check(b))
    assert c.full_checks == 1, "verified files with unchanged stat signatures are not hashed again"
    os.utime(b.path / "memory")  # touched, same contents: hashed again, and accepted
    asyncio.run(c.check(b))
    assert c.full_checks == 2


def test_quick_check_costs_microseconds(tmp_path: Path) -> None:
    b = make_build(tmp_path / "b")
    c = IntegrityChecker()
    c.verify(b)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        assert c.quick(b)
    per = (time.perf_counter() - t0) / n
    print(f"\nstat-only check of a verified build: {per * 1e6:.1f} us")
    assert per < 0.002, "the check on every restore must stay far below a hot create's ~80 ms"


@pytest.mark.parametrize("file, offset", [("memory", 10 * SMALL_CHUNK + 500), ("rootfs.ext4", 3),
                                          ("vmstate", 0), ("memory", 30 * SMALL_CHUNK)])
def test_damaged_file_is_refused_with_how_to_rebuild(tmp_path: Path, file: str, offset: int) -> None:
    b = make_build(tmp_path / "b")
    c = IntegrityChecker()
    c.verify(b)
    flip_byte(b.path / file, offset)
    with pytest.raises(TemplateDamaged) as e:
        asyncio.run(c.check(b))
    msg = str(e.value)
    assert "'tpl'" in msg and b.build_id in msg and file in msg and "damaged" in msg
    assert "template-manager --config <config.toml> --template tpl --force" in msg and "/v2/templates/tpl/builds" in msg
    checks = c.full_checks
    for _ in range(3):  # a pool retrying: the verdict is remembered, not hashed again
        with pytest.raises(TemplateDamaged):
            asyncio.run(c.check(b))
    assert c.full_checks == checks
    flip_byte(b.path / file, offset)  # repaired (same bytes as recorded): accepted again after a full check
    asyncio.run(c.check(b))
    assert c.full_checks == checks + 1


def test_damage_found_on_first_use_by_a_new_process(tmp_path: Path) -> None:
    b = make_build(tmp_path / "b")
    flip_byte(b.path / "rootfs.ext4", 100)
    with pytest.raises(TemplateDamaged, match="rootfs.ext4 does not match"):
        IntegrityChecker().verify(b)


def test_other_size_or_missing_file_is_refused_without_hashing(tmp_path: Path) -> None:
    b = make_build(tmp_path / "b")
    c = IntegrityChecker()
    with open(b.path / "memory", "r+b") as f:
        f.truncate(10)
    with pytest.raises(TemplateDamaged, match=r"memory has 10 bytes, 163840 when it was built"):
        c.quick(b)
    b = make_build(tmp_path / "b2")
    (b.path / "vmstate").unlink()
    with pytest.raises(TemplateDamaged, match="its file vmstate cannot be read"):
        asyncio.run(c.check(b))
    assert c.full_checks == 0


def test_build_without_hashes_is_accepted_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    b = make_build(tmp_path / "old", hashed=False)
    snap = make_build(tmp_path / "snap", hashed=False, snapshot=SnapshotOrigin(
        source_sandbox="s", source_template="tpl", source_build="x", requires=[]))
    c = IntegrityChecker()
    with caplog.at_level(logging.WARNING, logger="trenvx.template.integrity"):
        for _ in range(3):
            asyncio.run(c.check(b))
            asyncio.run(c.check(snap))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "has no hashes" in warnings[0] and "--template tpl" in warnings[0]
    assert c.full_checks == 0


def test_add_missing_records_hashes_of_an_old_build(tmp_path: Path) -> None:
    root = DataRoot(tmp_path / "data").ensure()
    b = make_build(root.template_dir("tpl") / "20260101T000000-abcdef12", hashed=False)
    (root.template_current("tpl")).symlink_to(b.path.name)
    store = TemplateStore(root)
    updated = add_missing(store, store.current("tpl"))
    assert updated.manifest.integrity is not None
    reread = store.current("tpl")
    assert reread.manifest.integrity == updated.manifest.integrity
    assert reread.manifest.model_dump(exclude={"integrity"}) == b.manifest.model_dump(exclude={"integrity"})
    assert not list(b.path.glob(".*.tmp"))
    IntegrityChecker().verify(reread)  # the recorded hashes are those of the files
    assert add_missing(store, reread) is reread


def test_concurrent_first_checks_hash_once(tmp_path: Path) -> None:
    b = make_build(tmp_path / "b")
    c = IntegrityChecker()

    async def many() -> None:
        await asyncio.gather(*(c.check(b) for _ in range(8)))

    asyncio.run(many())
    assert c.full_checks == 1
