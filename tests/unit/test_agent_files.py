"""The agent's /files endpoint: streamed uploads (raw, gzip, multipart) and downloads."""
# ruff: noqa: F811 - pytest fixtures imported from the harness

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import httpx
import pytest

from tests.unit.test_agent_harness import AgentProcess, agent, client  # noqa: F401 - fixtures
from tests.unit.test_agent_fs_identity import area  # noqa: F401 - fixture
from trenvx.guest.client import AgentClient, AgentError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the agent tests run as root (like the guest)")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


async def test_50mb_upload_and_download_round_trip(client: AgentClient, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(52):
            f.write(os.urandom(1 << 20))
    remote = tmp_path / "remote" / "nested" / "big.bin"
    await client.upload(str(remote), src)
    assert remote.stat().st_size == src.stat().st_size
    assert _sha256_file(remote) == _sha256_file(src)
    back = tmp_path / "back.bin"
    await client.download(str(remote), back)
    assert _sha256_file(back) == _sha256_file(src)


async def test_upload_from_async_iterable_and_bytes(client: AgentClient, tmp_path: Path) -> None:
    async def produce():
        for i in range(10):
            yield bytes([i]) * 100_000

    target = tmp_path / "streamed.bin"
    await client.upload(str(target), produce())
    assert target.read_bytes() == b"".join(bytes([i]) * 100_000 for i in range(10))
    await client.upload(str(target), b"\x00\xffsmall")  # overwrite truncates
    assert await client.read_bytes(str(target)) == b"\x00\xffsmall"


async def test_upload_is_owned_by_the_user(client: AgentClient, area: Path, tmp_path: Path) -> None:
    target = area / "nobody" / "owned" / "by" / "nobody.txt"
    await client.upload(str(target), b"x", user="nobody")
    assert target.stat().st_uid == 65534
    assert (area / "nobody" / "owned").stat().st_uid == 65534
    # The upload runs as the user: root's 0700 tmp_path is out of its reach (test_agent_fs_identity).
    with pytest.raises(AgentError, match="permission denied"):
        await client.upload(str(tmp_path / "planted" / "x.txt"), b"x", user="nobody")
    assert not (tmp_path / "planted").exists()


async def test_relative_path_resolves_in_home(agent: AgentProcess, tmp_path: Path) -> None:
    async with httpx.AsyncClient(base_url=agent.url) as raw:
        response = await raw.post("/files", params={"path": ".trenvx-test-rel.txt", "username": "root"},
                                  content=b"rel", headers={"Content-Type": "application/octet-stream"})
        assert response.status_code == 200
        assert response.json() == [{"name": ".trenvx-test-rel.txt", "type": "file",
                                    "path": "/root/.trenvx-test-rel.txt"}]
    os.unlink("/root/.trenvx-test-rel.txt")


async def test_multipart_upload_like_the_e2b_sdk(agent: AgentProcess, tmp_path: Path) -> None:
    payload = os.urandom(3 << 20) + b"\r\n--boundary-lookalike\r\n"
    async with httpx.AsyncClient(base_url=agent.url) as raw:
        # One file: destination in ?path=.
        target = tmp_path / "mp" / "one.bin"
        response = await raw.post("/files", params={"path": str(target), "username": "root"},
                                  files={"file": ("ignored-name", payload)})
        assert response.status_code == 200, response.text
        assert response.json() == [{"name": "one.bin", "type": "file", "path": str(target)}]
        assert target.read_bytes() == payload
        # Several files: each part's filename is its destination path.
        a, b = tmp_path / "mp" / "a.txt", tmp_path / "mp" / 'we"ird b.txt'
        response = await raw.post("/files", params={"username": "root"},
                                  files=[("file", (str(a), b"AAA")), ("file", (str(b), b"BBB")),
                                         ("other", ("x", b"ignored"))])
        assert response.status_code == 200, response.text
        assert [e["path"] for e in response.json()] == [str(a), str(b)]
        assert a.read_bytes() == b"AAA" and b.read_bytes() == b"BBB"


async def test_gzip_octet_stream_upload(agent: AgentProcess, tmp_path: Path) -> None:
    data = b"compressible " * 100_000
    target = tmp_path / "gz.txt"
    async with httpx.AsyncClient(base_url=agent.url) as raw:
        response = await raw.post("/files", params={"path": str(target)}, content=gzip.compress(data),
                                  headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"})
    assert response.status_code == 200, response.text
    assert target.read_bytes() == data


async def test_download_errors(client: AgentClient, agent: AgentProcess, tmp_path: Path) -> None:
    with pytest.raises(AgentError) as info:
        await client.read_bytes(str(tmp_path / "missing.txt"))
    assert info.value.code == "not_found" and info.value.status == 404
    assert "missing.txt" in info.value.message
    with pytest.raises(AgentError) as info:
        await client.read_bytes(str(tmp_path))
    assert info.value.status == 400 and "directory" in info.value.message
    with pytest.raises(AgentError) as info:
        await client.read_bytes("/etc/hostname", user="no-such-user")
    assert info.value.status == 400 and "no-such-user" in info.value.message
    async with httpx.AsyncClient(base_url=agent.url) as raw:
        response = await raw.get("/files", params={"path": str(tmp_path / "missing.txt")})
        assert response.status_code == 404
        assert response.json()["code"] == 404
        response = await raw.post("/files", params={"path": str(tmp_path / "x")}, content=b"x",
                                  headers={"Content-Type": "text/plain"})
        assert response.status_code == 400
        response = await raw.post("/files", params={"path": str(tmp_path)}, content=b"x",
                                  headers={"Content-Type": "application/octet-stream"})
        assert response.status_code == 400 and "directory" in response.json()["message"]
        response = await raw.post("/files", content=b"--nope", params={"path": str(tmp_path / "y")},
                                  headers={"Content-Type": "multipart/form-data; boundary=abc"})
        assert response.status_code == 400
        # The connection pool still works after all those errors.
        assert (await raw.get("/health")).status_code == 204


async def test_download_is_streamed_with_content_length(agent: AgentProcess, tmp_path: Path) -> None:
    target = tmp_path / "dl.bin"
    target.write_bytes(b"\x00\x01" * 300_000)
    async with httpx.AsyncClient(base_url=agent.url) as raw:
        async with raw.stream("GET", "/files", params={"path": str(target)}) as response:
            assert response.status_code == 200
            assert response.headers["content-length"] == "600000"
            assert response.headers["content-type"] == "application/octet-stream"
            body = b"".join([chunk async for chunk in response.aiter_raw()])
    assert body == target.read_bytes()
