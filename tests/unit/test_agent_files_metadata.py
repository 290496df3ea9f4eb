"""The envd version the agent claims, and what e2b 2.63 gates on it: file metadata (``user.e2b.*``
xattrs) on write and in entry info, entry info on watch events, watching network mounts on request.

E2B's unmodified SDK drives the agent on the host (as in ``test_agent_e2b``), with the agent's
own envd version, so every SDK version gate is passed exactly as against a sandbox.
"""
# ruff: noqa: F811 - pytest fixtures imported from the harness

from __future__ import annotations

import asyncio
import os
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.unit.test_agent_harness import AgentProcess, fresh_agent  # noqa: F401 - fixtures
from trenvx.guest.agent import ENVD_COMPAT_VERSION, filesystem, watch, xattrs
from trenvx.guest.agent.connect import ConnectError, RpcContext
from trenvx.guest.agent.state import AgentState
from trenvx.guest.client import AgentClient

e2b = pytest.importorskip("e2b")
from e2b.envd import versions as e2b_versions  # noqa: E402
from packaging.version import Version  # noqa: E402 - e2b depends on packaging

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the agent tests run as root (like the guest)")

TOKEN = "metadata-test-token"


async def _sandbox(agent: AgentProcess) -> Any:
    async with AgentClient(agent.url) as c:
        await c.init(sandbox_id="sbx-meta", env_vars={}, access_token=TOKEN, hostname="sbx-meta")
    config = e2b.ConnectionConfig(sandbox_url=agent.url, api_key="e2b_unused", http_version="1.1",
                                  extra_sandbox_headers={"X-Access-Token": TOKEN})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return e2b.AsyncSandbox(sandbox_id="sbx-meta", sandbox_domain=None, envd_version=Version(ENVD_COMPAT_VERSION),
                                envd_access_token=TOKEN, traffic_access_token=None, connection_config=config)


# ----------------------------------------------------------------------------- the version


def test_claimed_version_is_the_newest_gate_of_the_sdk() -> None:
    """The agent serves every gated feature of e2b 2.63 (tests below), and claims no newer version
    than the newest gate: a new SDK gate makes this fail until its feature is served or refused."""
    gates = [v for name, v in vars(e2b_versions).items()
             if name.startswith("ENVD_") and isinstance(v, Version) and v != e2b_versions.ENVD_DEBUG_FALLBACK]
    assert Version(ENVD_COMPAT_VERSION) == max(gates)


def test_health_and_server_report_the_version(fresh_agent: AgentProcess) -> None:
    from trenvx.server.app import envd_version

    assert httpx.get(fresh_agent.url + "/health").headers["X-Envd-Version"] == ENVD_COMPAT_VERSION
    assert envd_version() == ENVD_COMPAT_VERSION


# ----------------------------------------------------------------------------- metadata


async def test_write_with_metadata_shows_in_write_info_stat_and_list(fresh_agent: AgentProcess, tmp_path: Path) -> None:
    sbx = await _sandbox(fresh_agent)
    target = tmp_path / "meta" / "a.txt"
    info = await sbx.files.write(str(target), "hello", user="root", metadata={"Author": "mish", "purpose": "test"})
    assert info.metadata == {"author": "mish", "purpose": "test"}  # keys lowercased, like envd
    assert os.getxattr(target, "user.e2b.author") == b"mish"
    got = await sbx.files.get_info(str(target), user="root")
    assert got.metadata == {"author": "mish", "purpose": "test"} and got.size == 5
    [listed] = await sbx.files.list(str(target.parent), user="root")
    assert listed.name == "a.txt" and listed.metadata == {"author": "mish", "purpose": "test"}
    moved = await sbx.files.rename(str(target), str(tmp_path / "meta" / "b.txt"), user="root")
    assert moved.metadata == {"author": "mish", "purpose": "test"}  # xattrs travel with the file
    plain = await sbx.files.write(str(tmp_path / "plain.txt"), "x", user="root")
    assert plain.metadata is None and (await sbx.files.get_info(str(tmp_path / "plain.txt"), user="root")).metadata is None


async def test_octet_stream_and_several_files_carry_metadata(fresh_agent: AgentProcess, tmp_path: Path) -> None:
    sbx = await _sandbox(fresh_agent)
    info = await sbx.files.write(str(tmp_path / "raw.bin"), b"\x00\x01", user="root", use_octet_stream=True,
                                 metadata={"k": "v"})
    assert info.metadata == {"k": "v"}
    infos = await sbx.files.write_files(
        [{"path": str(tmp_path / "m1.txt"), "data": "1"}, {"path": str(tmp_path / "m2.txt"), "data": "2"}],
        user="root", metadata={"batch": "7"},
    )
    assert [i.metadata for i in infos] == [{"batch": "7"}, {"batch": "7"}]
    assert os.getxattr(tmp_path / "m2.txt", "user.e2b.batch") == b"7"


async def test_overwrite_replaces_the_whole_set_and_keeps_foreign_xattrs(fresh_agent: AgentProcess,
                                                                          tmp_path: Path) -> None:
    sbx = await _sandbox(fresh_agent)
    target = tmp_path / "o.txt"
    await sbx.files.write(str(target), "1", user="root", metadata={"a": "1", "b": "2"})
    os.setxattr(target, "user.other-tool", b"keep")
    info = await sbx.files.write(str(target), "2", user="root", metadata={"a": "3"})
    assert info.metadata == {"a": "3"}
    info = await sbx.files.write(str(target), "3", user="root")
    assert info.metadata is None and (await sbx.files.get_info(str(target), user="root")).metadata is None
    assert os.getxattr(target, "user.other-tool") == b"keep"


async def test_metadata_set_inside_the_sandbox_shows_and_bad_bytes_are_skipped(fresh_agent: AgentProcess,
                                                                                tmp_path: Path) -> None:
    sbx = await _sandbox(fresh_agent)
    target = tmp_path / "x.txt"
    target.write_text("x")
    os.setxattr(target, "user.e2b.from-setfattr", b"yes")
    os.setxattr(target, "user.e2b.binary", b"\xff\xfe")  # not UTF-8: cannot travel in a proto string map
    assert (await sbx.files.get_info(str(target), user="root")).metadata == {"from-setfattr": "yes"}


async def test_invalid_metadata_is_refused_before_writing(fresh_agent: AgentProcess, tmp_path: Path) -> None:
    await _sandbox(fresh_agent)
    target = tmp_path / "refused.txt"
    headers = {"X-Access-Token": TOKEN, "Content-Type": "application/octet-stream"}
    async with httpx.AsyncClient(base_url=fresh_agent.url) as raw:
        r = await raw.post("/files", params={"path": str(target)}, content=b"x",
                           headers={**headers, "X-Metadata-big": "v" * 5000})
        assert r.status_code == 400 and "metadata" in r.json()["message"] and "4096" in r.json()["message"]
        r = await raw.post("/files", params={"path": str(target)}, content=b"x",
                           headers={**headers, "X-Metadata-accent": "caf\u00e9".encode("latin-1")})
        assert r.status_code == 400 and "printable ASCII" in r.json()["message"]
        assert not target.exists()
        r = await raw.post("/files", params={"path": str(target)}, content=b"x",
                           headers={**headers, "X-Metadata-First": "1", "x-metadata-first": "2"})
        assert r.status_code == 200 and r.json()[0]["metadata"] == {"first": "1"}


def test_metadata_rules() -> None:
    assert xattrs.from_headers([("X-Metadata-A", "1"), ("Content-Type", "x"), ("X-Metadata-", "no key")]) == {"a": "1"}
    xattrs.validate({"k" * xattrs.MAX_KEY_LEN: ""})
    for bad in ({"": "v"}, {"k" * (xattrs.MAX_KEY_LEN + 1): "v"}, {"k\t": "v"}, {"k": "line\nbreak"}):
        with pytest.raises(xattrs.MetadataError):
            xattrs.validate(bad)


def test_metadata_on_a_filesystem_without_xattrs_is_not_claimed(fresh_agent: AgentProcess) -> None:
    """/proc keeps no user xattrs: the body goes through, the answer claims no metadata."""
    asyncio.run(_sandbox(fresh_agent))
    r = httpx.post(fresh_agent.url + "/files", params={"path": "/proc/self/comm"}, content=b"agent",
                   headers={"X-Access-Token": TOKEN, "Content-Type": "application/octet-stream",
                            "X-Metadata-k": "v"})
    assert r.status_code == 200, r.text
    assert "metadata" not in r.json()[0]


# ----------------------------------------------------------------------------- watches


async def test_watch_events_carry_entry_info_with_metadata(fresh_agent: AgentProcess, tmp_path: Path) -> None:
    sbx = await _sandbox(fresh_agent)
    events: list[Any] = []
    handle = await sbx.files.watch_dir(str(tmp_path), on_event=events.append, user="root", include_entry=True)
    try:
        await sbx.files.write(str(tmp_path / "w.txt"), "data", user="root", metadata={"tag": "w"})
        (tmp_path / "gone.txt").write_text("x")
        (tmp_path / "gone.txt").unlink()
        for _ in range(100):
            if any(e.name == "gone.txt" and e.type.value == "remove" for e in events):
                break
            await asyncio.sleep(0.05)
    finally:
        await handle.stop()
    writes = [e for e in events if e.name == "w.txt" and e.type.value == "write"]
    assert writes and writes[-1].entry is not None
    assert writes[-1].entry.path == str(tmp_path / "w.txt") and writes[-1].entry.type.value == "file"
    assert any(e.entry is not None and e.entry.metadata == {"tag": "w"} for e in events if e.name == "w.txt")
    removed = [e for e in events if e.name == "gone.txt" and e.type.value == "remove"]
    assert removed and removed[0].entry is None  # nothing left to describe


async def test_watch_without_include_entry_sends_no_entry(fresh_agent: AgentProcess, tmp_path: Path) -> None:
    sbx = await _sandbox(fresh_agent)
    events: list[Any] = []
    handle = await sbx.files.watch_dir(str(tmp_path), on_event=events.append, user="root",
                                       allow_network_mounts=True)  # a local directory: allowed either way
    try:
        (tmp_path / "n.txt").write_text("x")
        for _ in range(100):
            if events:
                break
            await asyncio.sleep(0.05)
    finally:
        await handle.stop()
    assert events and all(e.entry is None for e in events)


def _ctx() -> RpcContext:
    return RpcContext(exchange=None, basic_user="root", deadline=None, keepalive_interval=30.0)  # type: ignore[arg-type]


def test_network_mounts_are_refused_unless_allowed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    service = filesystem.FilesystemService(AgentState())
    monkeypatch.setattr(filesystem, "network_filesystem", lambda path: "nfs")
    with pytest.raises(ConnectError) as info:
        service.create_watcher(_ctx(), {"path": str(tmp_path)})
    assert info.value.code == "invalid_argument"
    assert "network filesystem (nfs)" in info.value.message and "allow_network_mounts" in info.value.message
    watcher_id = service.create_watcher(_ctx(), {"path": str(tmp_path), "allowNetworkMounts": True})["watcherId"]
    service.remove_watcher(_ctx(), {"watcherId": watcher_id})
    monkeypatch.setattr(filesystem, "network_filesystem", lambda path: None)
    watcher_id = service.create_watcher(_ctx(), {"path": str(tmp_path)})["watcherId"]
    service.remove_watcher(_ctx(), {"watcherId": watcher_id})


def test_network_filesystem_by_statfs_magic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert watch.network_filesystem(str(tmp_path)) is None  # the host's local disk
    assert watch.filesystem_magic("/proc") == 0x9FA0  # PROC_SUPER_MAGIC: statfs is read right
    with pytest.raises(OSError):
        watch.filesystem_magic(str(tmp_path / "missing"))
    for magic, name in ((0x6969, "nfs"), (0xFF534D42, "cifs"), (0x65735546, "fuse")):
        monkeypatch.setattr(watch, "filesystem_magic", lambda path, m=magic: m)
        assert watch.network_filesystem(str(tmp_path)) == name
