"""The agent's filesystem service: Stat, ListDir, MakeDir, Move, Remove and watches."""
# ruff: noqa: F811 - pytest fixtures imported from the harness

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.unit.test_agent_harness import AgentProcess, agent, client  # noqa: F401 - fixtures
from tests.unit.test_agent_fs_identity import area  # noqa: F401 - fixture
from trenvx.guest.agent.watch import InotifyWatcher, PollingWatcher
from trenvx.guest.client import (
    AgentClient,
    AgentError,
    EnvelopeDecoder,
    encode_envelope,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the agent tests run as root (like the guest)")


async def test_stat_file_dir_symlink(client: AgentClient, tmp_path: Path) -> None:
    f = tmp_path / "f.txt"
    f.write_bytes(b"12345")
    os.chmod(f, 0o640)
    entry = await client.stat(str(f))
    assert (entry.name, entry.type, entry.path, entry.size) == ("f.txt", "file", str(f), 5)
    assert entry.mode == 0o640 and entry.permissions == "-rw-r-----"
    assert (entry.owner, entry.group) == ("root", "root")
    assert entry.modified_time is not None and abs(entry.modified_time.timestamp() - f.stat().st_mtime) < 1
    d = await client.stat(str(tmp_path))
    assert d.type == "dir"
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    s = await client.stat(str(link))
    assert s.type == "dir" and s.symlink_target == str(tmp_path)
    with pytest.raises(AgentError) as info:
        await client.stat(str(tmp_path / "nope"))
    assert info.value.code == "not_found" and "nope" in info.value.message


async def test_list_dir_with_depth(client: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    (tmp_path / "top.txt").write_text("y")
    one = await client.list_dir(str(tmp_path))
    assert sorted(e.name for e in one) == ["a", "top.txt"]
    three = await client.list_dir(str(tmp_path), depth=3)
    assert sorted(e.path for e in three) == sorted(
        str(p) for p in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c", tmp_path / "top.txt"))
    everything = await client.list_dir(str(tmp_path), depth=10)
    assert str(tmp_path / "a" / "b" / "c" / "deep.txt") in {e.path for e in everything}
    with pytest.raises(AgentError) as info:
        await client.list_dir(str(tmp_path / "missing"))
    assert info.value.code == "not_found"
    with pytest.raises(AgentError) as info:
        await client.list_dir(str(tmp_path / "top.txt"))
    assert info.value.code == "invalid_argument"


async def test_make_dir_move_remove(client: AgentClient, area: Path, tmp_path: Path) -> None:
    target = area / "nobody" / "x" / "y" / "z"  # where nobody may write (test_agent_fs_identity)
    assert await client.make_dir(str(target), user="nobody") is True
    assert target.is_dir() and target.stat().st_uid == 65534 and (area / "nobody" / "x").stat().st_uid == 65534
    assert await client.make_dir(str(target)) is False  # already_exists
    (tmp_path / "file").write_text("f")
    with pytest.raises(AgentError) as info:
        await client.make_dir(str(tmp_path / "file"))
    assert info.value.code == "invalid_argument"

    moved = await client.move(str(tmp_path / "file"), str(tmp_path / "new" / "place" / "file2"))
    assert moved.path == str(tmp_path / "new" / "place" / "file2") and moved.type == "file"
    assert (tmp_path / "new" / "place" / "file2").read_text() == "f"
    with pytest.raises(AgentError) as info:
        await client.move(str(tmp_path / "gone"), str(tmp_path / "elsewhere"))
    assert info.value.code == "not_found"

    await client.remove(str(area / "nobody" / "x"))
    assert not (area / "nobody" / "x").exists()
    await client.remove(str(tmp_path / "new" / "place" / "file2"))
    assert not await client.exists(str(tmp_path / "new" / "place" / "file2"))
    # As in E2B's envd, removing what does not exist is a no-op, not not_found.
    await client.remove(str(tmp_path / "x"))
    await client.remove(str(tmp_path / "never" / "existed"))
    assert not (tmp_path / "x").exists()


async def test_home_relative_paths(client: AgentClient) -> None:
    entry = await client.stat("~")
    assert entry.path == "/root"
    entry = await client.stat("")
    assert entry.path == "/root"


def _rpc_headers(stream: bool = False) -> dict[str, str]:
    return {"Content-Type": "application/connect+json" if stream else "application/json",
            "Connect-Protocol-Version": "1"}


async def _collect_watch(agent: AgentProcess, path: Path, actions: Any, *, recursive: bool = False,
                         settle: float = 0.5) -> list[dict[str, Any]]:
    """Open WatchDir, run ``actions`` once it started, return the filesystem events."""
    events: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=agent.url, timeout=None) as raw:
        request = {"path": str(path), "recursive": recursive}
        async with raw.stream("POST", "/filesystem.Filesystem/WatchDir", content=encode_envelope(request),
                              headers={**_rpc_headers(True), "Keepalive-Ping-Interval": "1"}) as response:
            assert response.status_code == 200
            decoder = EnvelopeDecoder()
            it = response.aiter_raw()
            started = False
            deadline = None
            while True:
                timeout = None if deadline is None else max(0.01, deadline - time.monotonic())
                try:
                    chunk = await asyncio.wait_for(anext(it), timeout)
                except (TimeoutError, StopAsyncIteration):
                    break
                for _flags, msg in decoder.feed(chunk):
                    if "start" in msg and not started:
                        started = True
                        await asyncio.to_thread(actions)
                        deadline = time.monotonic() + settle
                    elif "filesystem" in msg:
                        events.append(msg["filesystem"])
    return events


async def test_watch_dir_stream_events(agent: AgentProcess, tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("old")

    def actions() -> None:
        (tmp_path / "new.txt").write_text("hello")
        os.chmod(tmp_path / "new.txt", 0o600)
        os.rename(tmp_path / "old.txt", tmp_path / "renamed.txt")
        os.unlink(tmp_path / "new.txt")

    events = await _collect_watch(agent, tmp_path, actions)
    seen = {(e["name"], e["type"]) for e in events}
    assert ("new.txt", "EVENT_TYPE_CREATE") in seen
    assert ("new.txt", "EVENT_TYPE_WRITE") in seen
    assert ("new.txt", "EVENT_TYPE_CHMOD") in seen
    assert ("old.txt", "EVENT_TYPE_RENAME") in seen
    assert ("renamed.txt", "EVENT_TYPE_CREATE") in seen
    assert ("new.txt", "EVENT_TYPE_REMOVE") in seen


async def test_watch_dir_recursive(agent: AgentProcess, tmp_path: Path) -> None:
    def actions() -> None:
        (tmp_path / "sub").mkdir()
        time.sleep(0.1)  # let the new directory's watch be added
        (tmp_path / "sub" / "inner.txt").write_text("x")

    events = await _collect_watch(agent, tmp_path, actions, recursive=True)
    seen = {(e["name"], e["type"]) for e in events}
    assert ("sub", "EVENT_TYPE_CREATE") in seen
    assert ("sub/inner.txt", "EVENT_TYPE_CREATE") in seen


async def test_watch_missing_dir_is_not_found(agent: AgentProcess, tmp_path: Path) -> None:
    async with httpx.AsyncClient(base_url=agent.url) as raw:
        response = await raw.post("/filesystem.Filesystem/WatchDir",
                                  content=encode_envelope({"path": str(tmp_path / "missing")}),
                                  headers=_rpc_headers(True))
    assert response.status_code == 200  # Connect streams report errors in the end message
    [(flags, end)] = EnvelopeDecoder().feed(response.content)
    assert flags == 2 and end["error"]["code"] == "not_found"


async def test_polling_watchers(agent: AgentProcess, tmp_path: Path) -> None:
    async with httpx.AsyncClient(base_url=agent.url) as raw:
        response = await raw.post("/filesystem.Filesystem/CreateWatcher",
                                  json={"path": str(tmp_path), "includeEntry": True}, headers=_rpc_headers())
        assert response.status_code == 200, response.text
        watcher_id = response.json()["watcherId"]
        (tmp_path / "w.txt").write_text("data")
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(e["type"] == "EVENT_TYPE_CREATE" for e in events):
            await asyncio.sleep(0.1)
            response = await raw.post("/filesystem.Filesystem/GetWatcherEvents", json={"watcherId": watcher_id},
                                      headers=_rpc_headers())
            events += response.json().get("events", [])
        create = [e for e in events if e["type"] == "EVENT_TYPE_CREATE"]
        assert create and create[0]["name"] == "w.txt"
        assert create[0]["entry"]["path"] == str(tmp_path / "w.txt")
        response = await raw.post("/filesystem.Filesystem/RemoveWatcher", json={"watcherId": watcher_id},
                                  headers=_rpc_headers())
        assert response.status_code == 200
        response = await raw.post("/filesystem.Filesystem/GetWatcherEvents", json={"watcherId": watcher_id},
                                  headers=_rpc_headers())
        assert response.status_code == 404 and response.json()["code"] == "not_found"


@pytest.mark.parametrize("kind", ["inotify", "polling"])
def test_watcher_backends(tmp_path: Path, kind: str) -> None:
    watcher = InotifyWatcher(str(tmp_path), True) if kind == "inotify" else PollingWatcher(str(tmp_path), True, 0.05)
    try:
        (tmp_path / "d").mkdir()
        watcher.read(0.2)
        (tmp_path / "d" / "f").write_text("1")
        events = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and ("d/f", "EVENT_TYPE_CREATE") not in events:
            events += watcher.read(0.3)
        assert ("d/f", "EVENT_TYPE_CREATE") in events
        (tmp_path / "d" / "f").unlink()
        events = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and ("d/f", "EVENT_TYPE_REMOVE") not in events:
            events += watcher.read(0.3)
        assert ("d/f", "EVENT_TYPE_REMOVE") in events
    finally:
        watcher.close()
