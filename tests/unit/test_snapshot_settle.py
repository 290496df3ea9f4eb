"""The template builder waits for the guest to settle before its snapshot (measured from the host:
the VMM process's CPU time), so restores do not redo what the guest was still doing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from dataclasses import dataclass

from trenvx.template.builder import SNAPSHOT_RECIPE, TemplateBuilder, wait_until_idle


@dataclass
class FakeVm:
    pid: int


def run_process(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code])


def test_an_idle_process_is_settled_after_two_quiet_windows() -> None:
    p = run_process("import time; time.sleep(30)")
    try:
        time.sleep(0.3)  # past the interpreter's start
        waited = asyncio.run(wait_until_idle(FakeVm(p.pid), timeout_s=10))
        assert 0.9 <= waited < 3
    finally:
        p.kill()
        p.wait()


def test_a_busy_process_is_waited_for_until_the_bound() -> None:
    p = run_process("while True: pass")
    try:
        t0 = time.monotonic()
        waited = asyncio.run(wait_until_idle(FakeVm(p.pid), timeout_s=1.6))
        assert waited >= 1.5 and time.monotonic() - t0 < 4
    finally:
        p.kill()
        p.wait()


def test_the_snapshot_recipe_is_an_input_of_every_build(tmp_path) -> None:
    from trenvx.config import Config, TemplateConfig

    cfg = Config(data_root=tmp_path, template={"t": TemplateConfig(name="t", docker_img="debian:bookworm")})
    _, inputs = TemplateBuilder(cfg).input_digest(cfg.get_template("t"))
    assert inputs["snapshot"] == str(SNAPSHOT_RECIPE)
