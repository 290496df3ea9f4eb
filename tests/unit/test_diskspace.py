"""A full data root said plainly (trenvx.diskspace) by the builder: the symptom (ENOSPC, mkfs's
stderr, a VMM killed by SIGBUS while nearly nothing is free) becomes a BuildError naming the data
root and the space needed, and the failed build leaves no staging directory."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from trenvx import diskspace
from trenvx.build_errors import BuildError
from trenvx.config import Config
from trenvx.diskspace import full_message, is_enospc, space_problem
from trenvx.template.builder import TemplateBuilder


def test_enospc_is_found_in_the_chain_and_in_messages(tmp_path: Path) -> None:
    assert is_enospc(OSError(errno.ENOSPC, "No space left on device"))
    assert is_enospc(OSError(errno.EDQUOT, "quota"))
    try:
        try:
            raise OSError(errno.ENOSPC, "x")
        except OSError as inner:
            raise RuntimeError("write failed") from inner
    except RuntimeError as outer:
        assert is_enospc(outer)
    assert is_enospc(BuildError("rootfs", "mkfs.ext4 failed: ... No space left on device while populating"))
    assert not is_enospc(RuntimeError("the VM exited (status -7)"))
    assert not space_problem(RuntimeError("other"), tmp_path)  # tmp_path's filesystem has room


def test_nearly_full_root_makes_any_failure_a_space_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diskspace, "free_bytes", lambda p: 3 << 20)
    assert space_problem(RuntimeError("the VM exited (status -7) before its agent answered"), tmp_path)
    msg = full_message(tmp_path, "a build of template 't'", 300 << 20)
    assert msg.startswith(f"the data root {tmp_path} is full (3 MiB free): a build of template 't' needs about 300 MiB")


def builder(tmp_path: Path) -> TemplateBuilder:
    return TemplateBuilder(Config.model_validate({"data_root": str(tmp_path / "data"), "template": {"t": {}}}))


def test_a_stage_that_runs_out_of_space_says_so(tmp_path: Path) -> None:
    b = builder(tmp_path)
    b._space_need = 400 << 20

    async def work() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(BuildError) as e:
        asyncio.run(b._stage({}, "rootfs", work))
    assert e.value.stage == "rootfs"
    assert f"the data root {tmp_path / 'data'} is full" in str(e.value) and "needs about 400 MiB" in str(e.value)
    assert "what failed: [Errno 28] No space left on device" in str(e.value)

    async def other() -> None:
        raise ValueError("not about space")

    with pytest.raises(BuildError, match="ValueError: not about space"):
        asyncio.run(b._stage({}, "rootfs", other))


def test_a_build_that_fails_for_space_leaves_no_staging_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = builder(tmp_path)
    monkeypatch.setattr(b, "input_digest", lambda tpl: ("d" * 64, {}))

    async def half_build(tpl, build_id, staging, digest, inputs, *, force=False):
        (staging / "rootfs.ext4").write_bytes(b"x" * 4096)  # made part way, then the disk is full

        async def write_memory() -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        await b._stage({}, "boot", write_memory)

    monkeypatch.setattr(b, "_build", half_build)
    with pytest.raises(BuildError, match="is full"):
        asyncio.run(b.build("t"))
    tdir = tmp_path / "data" / "templates" / "t"
    assert sorted(p.name for p in tdir.iterdir()) == [".build.lock"]


def test_a_build_is_refused_before_it_starts_without_room(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = builder(tmp_path)
    monkeypatch.setattr(b, "input_digest", lambda tpl: ("d" * 64, {}))
    monkeypatch.setattr(diskspace, "free_bytes", lambda p: 10 << 20)
    with pytest.raises(BuildError) as e:
        asyncio.run(b.build("t"))
    mem = Config.model_validate({"data_root": str(tmp_path), "template": {"t": {}}}).get_template("t").mem_mb
    assert e.value.stage == "space" and f"needs about {mem + 64} MiB" in str(e.value)
