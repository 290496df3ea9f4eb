"""Two ``template-manager`` runs building the same template at once, through the real builder:
the second waits for the first ("waiting for the build of NAME by pid N") and reuses its build,
instead of sharing its staging directory (which failed both: a snapshot's ``migrate`` with no
reason, a missing ``rootfs.ext4.tmp``). The lock's logic in detail, with faked stages:
tests/unit/test_build_lock.py.

The template is the e2e template's Dockerfile under a name of its own (its base image is cached
by the session's test template), removed at the end.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trenvx.config import Config
from trenvx.filelock import lock_holder

pytestmark = pytest.mark.e2e

NAME = "e2e-build-lock"
BUILD_BOUND_S = 900.0
"""Generous bound on one build under TCG (the e2e template builds in a minute or two)."""
BUILD_ID = re.compile(r"\d{8}T\d{6}-[0-9a-f]{8}(?:-\d+)?")


@pytest.fixture
def lock_config(e2e_config: Config, tmp_path: Path) -> Iterator[Path]:
    tdir = e2e_config.data_root / "templates" / NAME
    shutil.rmtree(tdir, ignore_errors=True)  # a build left by an interrupted run would be reused
    dockerfile = Path(__file__).resolve().parent / "template" / "e2e.Dockerfile"
    path = tmp_path / "lock.toml"
    path.write_text(
        f'data_root = "{e2e_config.data_root}"\n'
        "[network]\n"
        f"dns_upstreams = {list(e2e_config.network.dns_upstreams)!r}\n".replace("'", '"')
        + f"slot_pool = {e2e_config.network.slot_pool}\n"
        f'[template."{NAME}"]\nvcpu = 1\nmem_mb = 256\ndisk_mb = 256\ndockerfile = "{dockerfile}"\nno_pull = true\n'
    )
    yield path
    shutil.rmtree(tdir, ignore_errors=True)


async def template_manager(config: Path, stderr: Path) -> asyncio.subprocess.Process:
    with stderr.open("wb") as err:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "trenvx.cli.template_manager", "--config", str(config), "--template", NAME,
            stdout=asyncio.subprocess.PIPE, stderr=err,
        )


async def test_two_template_managers_build_once(lock_config: Path, e2e_config: Config, test_template: str,
                                                tmp_path: Path) -> None:
    first_err, second_err = tmp_path / "first.err", tmp_path / "second.err"
    lock = e2e_config.data_root / "templates" / NAME / ".build.lock"
    first = await template_manager(lock_config, first_err)
    try:
        deadline = time.monotonic() + BUILD_BOUND_S
        while lock_holder(lock) != first.pid:  # it holds the template's build lock now
            assert first.returncode is None, first_err.read_text(errors="replace")
            assert time.monotonic() < deadline, "the first build did not start"
            await asyncio.sleep(0.1)
        second = await template_manager(lock_config, second_err)
        outs = await asyncio.wait_for(asyncio.gather(first.communicate(), second.communicate()), BUILD_BOUND_S)
    finally:
        for p in (first, *([second] if "second" in locals() else [])):
            if p.returncode is None:
                p.kill()
                await p.wait()
    texts = [out.decode() for out, _ in outs]
    errs = [first_err.read_text(errors="replace"), second_err.read_text(errors="replace")]
    assert (first.returncode, second.returncode) == (0, 0), errs
    assert f"template {NAME} (built)" in texts[0], texts[0]
    assert f"template {NAME} (unchanged)" in texts[1], texts[1]
    assert f"waiting for the build of {NAME} by pid {first.pid}" in errs[1], errs[1]
    ids = [set(BUILD_ID.findall(t)) for t in texts]
    assert len(ids[0]) == 1 and ids[0] == ids[1], texts
    # One build was made: one build directory, current, and no staging directory.
    tdir = e2e_config.data_root / "templates" / NAME
    assert [p.name for p in tdir.iterdir() if p.is_dir() and not p.is_symlink()] == list(ids[0])
    assert (tdir / "current").resolve().name in ids[0]
    assert not list(tdir.glob(".*.partial"))
