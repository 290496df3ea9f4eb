"""E2B's own Python SDK (PyPI ``e2b`` 2.x) against the agent, without E2B's REST API.

The SDK's sandbox objects are built directly (the documented-as-deprecated constructor)
with ``sandbox_url`` pointing at the agent, which is what ``AsyncSandbox.connect`` would
do after asking the API. Skipped when ``e2b`` is not installed.
"""
# ruff: noqa: F811 - pytest fixtures imported from the harness

from __future__ import annotations

import asyncio
import os
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_agent_harness import AgentProcess, fresh_agent  # noqa: F401 - fixtures
from trenvx.guest.client import AgentClient
from trenvx.guest.agent import ENVD_COMPAT_VERSION

e2b = pytest.importorskip("e2b")
from packaging.version import Version  # noqa: E402 - e2b depends on packaging

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the agent tests run as root (like the guest)")

#: The envd version the agent is compatible with (see trenvx.guest.agent.ENVD_COMPAT_VERSION).
ENVD_VERSION = ENVD_COMPAT_VERSION  # the version the agent claims: the SDK gates features on it
TOKEN = "e2b-test-token"


def _config(agent: AgentProcess) -> Any:
    return e2b.ConnectionConfig(
        sandbox_url=agent.url, api_key="e2b_unused", http_version="1.1",
        extra_sandbox_headers={"X-Access-Token": TOKEN, "E2b-Sandbox-Id": "sbx-e2b"},
    )


async def _async_sandbox(agent: AgentProcess) -> Any:
    async with AgentClient(agent.url) as c:
        await c.init(sandbox_id="sbx-e2b", env_vars={"FROM_INIT": "1"}, access_token=TOKEN, hostname="sbx-e2b")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return e2b.AsyncSandbox(sandbox_id="sbx-e2b", sandbox_domain=None, envd_version=Version(ENVD_VERSION),
                                envd_access_token=TOKEN, traffic_access_token=None,
                                connection_config=_config(agent))


async def test_e2b_commands(fresh_agent: AgentProcess) -> None:
    sbx = await _async_sandbox(fresh_agent)
    result = await sbx.commands.run("echo hello; echo oops >&2; echo $FROM_INIT")
    assert (result.stdout, result.stderr, result.exit_code) == ("hello\n1\n", "oops\n", 0)
    with pytest.raises(e2b.CommandExitException) as info:
        await sbx.commands.run("exit 3")
    assert info.value.exit_code == 3
    result = await sbx.commands.run("pwd; whoami", cwd="/tmp", user="nobody")
    assert result.stdout == "/tmp\nnobody\n"
    with pytest.raises(e2b.InvalidArgumentException):
        await sbx.commands.run("true", user="no-such-user")

    seen: list[str] = []
    handle = await sbx.commands.run("cat", background=True, stdin=True, on_stdout=seen.append)
    assert handle.pid in [p.pid for p in await sbx.commands.list()]
    await sbx.commands.send_stdin(handle.pid, "typed\n")
    await sbx.commands.close_stdin(handle.pid)
    done = await handle.wait()
    assert done.stdout == "typed\n" and "typed\n" in "".join(seen)

    handle = await sbx.commands.run("sleep 30", background=True)
    assert await sbx.commands.kill(handle.pid) is True
    with pytest.raises(e2b.CommandExitException):
        await handle.wait()
    assert await sbx.commands.kill(999999) is False  # not_found -> False

    handle = await sbx.commands.run("for i in 1 2 3; do echo $i; sleep 0.2; done", background=True)
    connected = await sbx.commands.connect(handle.pid)
    await connected.wait()
    await handle.wait()


async def test_e2b_filesystem(fresh_agent: AgentProcess, tmp_path: Path) -> None:
    sbx = await _async_sandbox(fresh_agent)
    base = tmp_path / "e2b"
    info = await sbx.files.write(str(base / "a.txt"), "alpha")  # multipart upload
    assert info.path == str(base / "a.txt")
    assert await sbx.files.read(str(base / "a.txt")) == "alpha"
    await sbx.files.write(str(base / "b.bin"), b"\x00\xff" * 1000, use_octet_stream=True)
    assert bytes(await sbx.files.read(str(base / "b.bin"), format="bytes")) == b"\x00\xff" * 1000
    await sbx.files.write_files([{"path": str(base / "m1"), "data": "1"}, {"path": str(base / "m2"), "data": "2"}])
    assert (base / "m1").read_text() == "1" and (base / "m2").read_text() == "2"

    names = sorted(e.name for e in await sbx.files.list(str(base)))
    assert names == ["a.txt", "b.bin", "m1", "m2"]
    entry = await sbx.files.get_info(str(base / "b.bin"))
    assert entry.size == 2000 and entry.type == e2b.FileType.FILE
    assert await sbx.files.exists(str(base / "a.txt"))
    assert not await sbx.files.exists(str(base / "zzz"))
    assert await sbx.files.make_dir(str(base / "d" / "e")) is True
    assert await sbx.files.make_dir(str(base / "d" / "e")) is False
    renamed = await sbx.files.rename(str(base / "a.txt"), str(base / "d" / "a2.txt"))
    assert renamed.path == str(base / "d" / "a2.txt")
    await sbx.files.remove(str(base / "d"))
    assert not (base / "d").exists()
    await sbx.files.remove(str(base / "d"))  # already gone: a no-op, as in E2B
    await sbx.files.remove(str(base / "never" / "existed"))
    with pytest.raises(e2b.NotFoundException):
        await sbx.files.read(str(base / "missing"))


async def test_e2b_watch_and_pty(fresh_agent: AgentProcess, tmp_path: Path) -> None:
    sbx = await _async_sandbox(fresh_agent)
    events: list[Any] = []
    handle = await sbx.files.watch_dir(str(tmp_path), on_event=events.append, recursive=True)
    (tmp_path / "watched.txt").write_text("x")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(e.name == "watched.txt" for e in events):
        await asyncio.sleep(0.05)
    await handle.stop()
    assert any(e.name == "watched.txt" and e.type == e2b.FilesystemEventType.CREATE for e in events)

    output = bytearray()
    pty = await sbx.pty.create(e2b.PtySize(rows=24, cols=80), on_data=output.extend)
    await sbx.pty.send_stdin(pty.pid, b"echo pty-$((6*7))\n")
    await sbx.pty.resize(pty.pid, e2b.PtySize(rows=30, cols=100))
    await sbx.pty.send_stdin(pty.pid, b"exit\n")
    await pty.wait()
    assert b"pty-42" in output


def test_e2b_sync_sdk_and_polling_watcher(fresh_agent: AgentProcess, tmp_path: Path) -> None:
    """The sync SDK uses CreateWatcher/GetWatcherEvents/RemoveWatcher for watches."""
    asyncio.run(_init_only(fresh_agent))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sbx = e2b.Sandbox(sandbox_id="sbx-e2b", sandbox_domain=None, envd_version=Version(ENVD_VERSION),
                          envd_access_token=TOKEN, traffic_access_token=None, connection_config=_config(fresh_agent))
    assert sbx.commands.run("echo sync").stdout == "sync\n"
    watcher = sbx.files.watch_dir(str(tmp_path))
    (tmp_path / "polled.txt").write_text("1")
    deadline = time.monotonic() + 5
    found: list[Any] = []
    while time.monotonic() < deadline and not found:
        found = [e for e in watcher.get_new_events() if e.name == "polled.txt"]
        time.sleep(0.05)
    watcher.stop()
    assert found


async def _init_only(agent: AgentProcess) -> None:
    async with AgentClient(agent.url) as c:
        await c.init(sandbox_id="sbx-e2b", env_vars={}, access_token=TOKEN, hostname="sbx-e2b")
