"""The health check's decision (sandbox/manager.py ``check_health``), over fake VMs with the probe
replaced: a sandbox silent past ``health_check_grace_s`` is ended (reason ``unresponsive``), one
within it is not, and when many are silent in the same pass (an overloaded host, not that many
hung guests: measured with 200 TCG sandboxes on 2 cores) none is ended until the load passes.
The real thing (a SIGSTOPped VMM) is tests/e2e/test_faults.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from trenvx.sandbox.manager import SandboxManager, SandboxNotFound

from .server_fakes import ThreadedServer, UpstreamState, fake_manager, make_config, make_template, upstream_app


@pytest.fixture(scope="module")
def upstream():
    with ThreadedServer(upstream_app(UpstreamState())) as s:
        yield s


@pytest.fixture
async def manager(tmp_path: Path, upstream):
    make_template(tmp_path, "tpl")
    m = fake_manager(make_config(tmp_path, health_check_interval_s=0, health_check_grace_s=30,
                                 max_sandboxes=20, max_sandboxes_per_template=20), upstream.port)
    await m.start()
    yield m
    await m.close()


def silence(manager: SandboxManager, monkeypatch: pytest.MonkeyPatch, silent: set[str]) -> None:
    async def probe(sb, timeout):  # noqa: ANN001 - stands in for SandboxManager._probe
        return sb.id not in silent
    monkeypatch.setattr(SandboxManager, "_probe", staticmethod(probe))


async def test_one_silent_past_its_grace_is_ended_saying_why(manager, monkeypatch) -> None:
    a, b, c = [await manager.create("tpl", timeout_s=300) for _ in range(3)]
    silence(manager, monkeypatch, {a.id, b.id})
    a.answered_at = time.monotonic() - 31  # silent past the grace
    b.answered_at = time.monotonic() - 10  # silent, within it
    assert await manager.check_health() == [a.id]
    with pytest.raises(SandboxNotFound, match="did not answer /health for 3[0-9] s"):
        manager.get(a.id)
    assert manager.get(b.id) and manager.get(c.id)


async def test_many_silent_at_once_is_an_overloaded_host_and_none_is_ended(manager, monkeypatch) -> None:
    sbs = [await manager.create("tpl", timeout_s=300) for _ in range(8)]
    silent = {sb.id for sb in sbs[:3]}  # 3 of 8: more than 2 and more than a quarter
    silence(manager, monkeypatch, silent)
    for sb in sbs[:3]:
        sb.answered_at = time.monotonic() - 600
    assert await manager.check_health() == []
    assert all(manager.get(sb.id) for sb in sbs)
    # The load passes: the two others answer again, the one that really hangs is ended.
    silence(manager, monkeypatch, {sbs[0].id})
    assert await manager.check_health() == [sbs[0].id]
    assert all(manager.get(sb.id) for sb in sbs[1:])
