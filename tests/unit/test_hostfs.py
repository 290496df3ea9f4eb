"""Per-sandbox disk copies: reflink where FICLONE works, else a full copy with one warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from trenvx.vmm import hostfs


async def test_clone_falls_back_to_a_copy_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "base.raw"
    src.write_bytes(b"x" * 10000)

    def unsupported(s: Path, d: Path) -> None:
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(hostfs, "reflink", unsupported)
    hostfs._warned.clear()
    with caplog.at_level(logging.WARNING):
        assert await hostfs.clone_file(src, tmp_path / "a.raw") is False
        assert await hostfs.clone_file(src, tmp_path / "b.raw") is False
    assert (tmp_path / "a.raw").read_bytes() == src.read_bytes()
    assert caplog.text.count("does not support reflinks") == 1 and "XFS" in caplog.text


async def test_clone_uses_reflink_when_it_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "base.raw"
    src.write_bytes(b"y" * 100)
    monkeypatch.setattr(hostfs, "reflink", lambda s, d: d.write_bytes(s.read_bytes()))
    assert await hostfs.clone_file(src, tmp_path / "c.raw") is True


def test_probe_says_why(tmp_path: Path) -> None:
    ok, why = hostfs.reflink_supported(tmp_path)
    assert isinstance(ok, bool) and "FICLONE" in why
