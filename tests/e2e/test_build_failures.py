"""A failed build names its stage and leaves no VM, container, mount or half-written template."""

from __future__ import annotations

from pathlib import Path

import pytest

from trenvx.config import load_config
from trenvx.template.builder import TemplateBuilder
from trenvx.build_errors import BuildError

from ..conftest import qemu_pids

pytestmark = pytest.mark.e2e


def _config(tmp_path: Path, body: str, dockerfile: str) -> Path:
    (tmp_path / "t.Dockerfile").write_text(dockerfile)
    cfg = tmp_path / "c.toml"
    data_root = load_config(Path(__file__).parent / "e2e_config.toml").data_root
    cfg.write_text(f'data_root = "{data_root}"\n[template."broken"]\ndockerfile = "t.Dockerfile"\nno_pull = true\n{body}')
    return cfg


def _assert_clean(cfg_path: Path) -> None:
    cfg = load_config(cfg_path)
    tdir = cfg.data_root / "templates" / "broken"
    assert not list(tdir.glob(".*.partial")), "staging directory left behind"
    assert not (tdir / "current").exists(), "a failed build must not be published"


async def test_failing_dockerfile_step_reports_rootfs_stage(tmp_path: Path, test_template: str) -> None:
    path = _config(tmp_path, "", "FROM debian:bookworm\nRUN echo about-to-fail && false\n")
    with pytest.raises(BuildError) as ei:
        await TemplateBuilder(load_config(path)).build("broken", force=True)
    assert ei.value.stage == "rootfs"
    assert "false" in str(ei.value) or "exit" in str(ei.value)
    _assert_clean(path)
    mounts = Path("/proc/mounts").read_text()
    assert "buildah" not in mounts and "/cache/buildah/vfs" not in mounts


async def test_ready_cmd_that_never_succeeds_reports_start_stage_with_console(tmp_path: Path, test_template: str) -> None:
    before = qemu_pids()
    path = _config(tmp_path, 'ready_cmd = "false"\nready_timeout_s = 3\n', "FROM debian:bookworm\n")
    with pytest.raises(BuildError) as ei:
        await TemplateBuilder(load_config(path)).build("broken", force=True)
    assert ei.value.stage == "start"
    assert "ready_cmd" in str(ei.value) and "guest console" in str(ei.value)
    assert qemu_pids() - before == set(), "the build VM must be killed"
    _assert_clean(path)
