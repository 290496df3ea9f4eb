"""Wire-level behaviour of the agent: Connect framing and errors, robustness, access token."""
# ruff: noqa: F811 - pytest fixtures imported from the harness

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from contextlib import aclosing

import httpx
import pytest

from tests.unit.test_agent_harness import AgentProcess, agent, client, fresh_agent  # noqa: F401 - fixtures
from trenvx.guest.client import (
    AgentClient,
    AgentError,
    EnvelopeDecoder,
    encode_envelope,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the agent tests run as root (like the guest)")

JSON = {"Content-Type": "application/json", "Connect-Protocol-Version": "1"}
STREAM = {"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1"}


def test_envelope_codec_round_trip() -> None:
    msgs = [{"a": 1}, {"event": {"data": {"stdout": base64.b64encode(b"\xff").decode()}}}, {}]
    blob = b"".join(encode_envelope(m) for m in msgs[:2]) + encode_envelope(msgs[2], 2)
    decoder = EnvelopeDecoder()
    out = []
    for i in range(0, len(blob), 3):  # arbitrary split points
        out += decoder.feed(blob[i:i + 3])
    assert out == [(0, msgs[0]), (0, msgs[1]), (2, {})]
    assert decoder.pending == 0


async def test_unary_errors_are_connect_json(agent: AgentProcess) -> None:
    async with httpx.AsyncClient(base_url=agent.url) as raw:
        cases = [
            (b"{not json", 400, "invalid_argument"),
            (b"[1, 2]", 400, "invalid_argument"),
            (b'{"path": 42}', 400, "invalid_argument"),
            (b'{"path": "/definitely/missing"}', 404, "not_found"),
        ]
        for body, status, code in cases:
            response = await raw.post("/filesystem.Filesystem/Stat", content=body, headers=JSON)
            assert response.status_code == status, body
            assert response.headers["content-type"] == "application/json"
            error = response.json()
            assert error["code"] == code and error["message"]
        response = await raw.post("/process.Process/SendSignal", headers=JSON,
                                  json={"process": {"pid": "12"}, "signal": "SIGNAL_BOGUS"})
        assert response.status_code == 400 and "SIGNAL_BOGUS" in response.json()["message"]
        response = await raw.post("/process.Process/Nope", content=b"{}", headers=JSON)
        assert response.status_code == 404
        response = await raw.post("/filesystem.Filesystem/Stat", content=b"{}",
                                  headers={"Content-Type": "application/proto"})
        assert response.status_code == 415
        response = await raw.post("/filesystem.Filesystem/Stat", json={}, headers={"Connect-Protocol-Version": "2"})
        assert response.status_code == 400
        response = await raw.get("/filesystem.Filesystem/Stat")
        assert response.status_code == 405
        assert (await raw.get("/health")).status_code == 204
    assert agent.alive()


async def test_stream_errors_end_the_stream(agent: AgentProcess) -> None:
    async with httpx.AsyncClient(base_url=agent.url) as raw:
        for body in (b"\x00\x00\x00\x00\x05{nope", b"\x00\x00\x00", b"",
                     encode_envelope({"process": {"cmd": ""}}),
                     encode_envelope({"process": {"cmd": "/bin/true", "args": "not-a-list"}})):
            response = await raw.post("/process.Process/Start", content=body, headers=STREAM)
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/connect+json"
            messages = EnvelopeDecoder().feed(response.content)
            assert messages[-1][0] == 2 and messages[-1][1]["error"]["code"] == "invalid_argument", body
        # Compressed message flag without a negotiated encoding.
        data = json.dumps({"process": {"cmd": "/bin/true"}}).encode()
        response = await raw.post("/process.Process/Start", content=struct.pack(">BI", 1, len(data)) + data,
                                  headers=STREAM)
        assert EnvelopeDecoder().feed(response.content)[-1][1]["error"]["code"] == "internal"
        # A streaming method called with the unary content type.
        response = await raw.post("/process.Process/Start", json={}, headers=JSON)
        assert response.status_code == 415
    assert agent.alive()


async def test_garbage_http_does_not_kill_the_agent(agent: AgentProcess) -> None:
    def send(payload: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as s:
            s.sendall(payload)
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            chunks = []
            while True:
                try:
                    data = s.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                chunks.append(data)
            return b"".join(chunks)

    send(b"\x16\x03\x01\x00\xa5garbage-tls-hello\r\n\r\n")
    send(b"POST /process.Process/List HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}")  # short body
    send(b"POST /files?path=/tmp/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
         b"Content-Type: application/octet-stream\r\n\r\nzz\r\n")  # bad chunk size
    reply = send(b"POST /process.Process/List HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400")
    await asyncio.sleep(0.1)
    assert agent.alive()
    assert httpx.get(agent.url + "/health").status_code == 204


async def test_keepalive_connection_reuse(agent: AgentProcess) -> None:
    """Many requests, including errors, on one kept-alive connection."""
    async with httpx.AsyncClient(base_url=agent.url, limits=httpx.Limits(max_connections=1)) as raw:
        for i in range(30):
            if i % 3 == 0:
                response = await raw.post("/filesystem.Filesystem/Stat", content=b"{bad", headers=JSON)
                assert response.status_code == 400
            else:
                response = await raw.post("/process.Process/List", json={}, headers=JSON)
                assert response.status_code == 200


async def test_keepalive_events_on_idle_streams(agent: AgentProcess) -> None:
    async with httpx.AsyncClient(base_url=agent.url, timeout=None) as raw:
        request = {"process": {"cmd": "/bin/sleep", "args": ["0.7"]}}
        response = await raw.post("/process.Process/Start", content=encode_envelope(request),
                                  headers={**STREAM, "Keepalive-Ping-Interval": "0.2"})
    kinds = [next(iter(m["event"])) for f, m in EnvelopeDecoder().feed(response.content) if not f & 2]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("keepalive") >= 2


async def test_access_token_enforcement(fresh_agent: AgentProcess) -> None:
    url = fresh_agent.url
    async with AgentClient(url) as c:
        await c.init(sandbox_id="sbx-auth", env_vars={}, access_token="s3cret", hostname="sbx-auth")
        assert c.access_token == "s3cret"
        assert (await c.run("echo ok")).stdout == b"ok\n"  # the client now sends the token
    async with httpx.AsyncClient(base_url=url) as raw:
        assert (await raw.get("/health")).status_code == 204  # health never needs it
        for headers in ({}, {"X-Access-Token": "wrong"}, {"X-Access-Token": "s3cret-but-longer"}):
            response = await raw.post("/process.Process/List", json={}, headers={**JSON, **headers})
            assert response.status_code == 401
            assert response.json()["code"] == "unauthenticated"
            response = await raw.get("/files", params={"path": "/etc/hostname"}, headers=headers)
            assert response.status_code == 401
            response = await raw.post("/process.Process/Start", content=encode_envelope({}),
                                      headers={**STREAM, **headers})
            assert response.status_code == 401
            response = await raw.post("/init", json={"accessToken": "stolen"}, headers=headers)
            assert response.status_code == 401
            response = await raw.get("/envs", headers=headers)
            assert response.status_code == 401
        ok = {"X-Access-Token": "s3cret"}
        response = await raw.post("/process.Process/List", json={}, headers={**JSON, **ok})
        assert response.status_code == 200
        # Re-init with the current token may rotate it.
        response = await raw.post("/init", json={"accessToken": "next"}, headers=ok)
        assert response.status_code == 204
        response = await raw.post("/process.Process/List", json={}, headers={**JSON, **ok})
        assert response.status_code == 401
        response = await raw.post("/process.Process/List", json={}, headers={**JSON, "X-Access-Token": "next"})
        assert response.status_code == 200


async def test_init_validation(fresh_agent: AgentProcess) -> None:
    async with httpx.AsyncClient(base_url=fresh_agent.url) as raw:
        for body in (b"{oops", b"[]"):
            response = await raw.post("/init", content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == 400
        for bad in ({"hostname": "bad host!"}, {"timestamp": "yesterday"}, {"envVars": {"A": 1}},
                    {"entropy": "%%%"}):
            response = await raw.post("/init", json=bad)
            assert response.status_code == 400, bad
        for ts in ("2024-05-01T12:00:00.123456789Z", 1714564800123456789, 1714564800, "1714564800.5"):
            response = await raw.post("/init", json={"timestamp": ts, "sandboxId": "s", "defaultUser": "root"})
            assert response.status_code == 204, ts
        assert (await raw.get("/envs")).json() == {}
        metrics = (await raw.get("/metrics")).json()
        assert metrics["cpu_count"] >= 1 and metrics["mem_total"] > 0


async def test_default_user_from_init(fresh_agent: AgentProcess) -> None:
    async with AgentClient(fresh_agent.url) as c:
        await c.init(sandbox_id="s", env_vars=None, access_token=None, hostname="s",
                     default_user="nobody", default_workdir="/tmp")
    async with httpx.AsyncClient(base_url=fresh_agent.url, timeout=30) as raw:
        # No Authorization header: the default user and workdir apply.
        request = {"process": {"cmd": "/bin/sh", "args": ["-c", "id -un; pwd"]}}
        response = await raw.post("/process.Process/Start", content=encode_envelope(request), headers=STREAM)
        out = b"".join(base64.b64decode(m["event"]["data"]["stdout"])
                       for f, m in EnvelopeDecoder().feed(response.content)
                       if not f & 2 and "data" in m["event"])
        assert out == b"nobody\n/tmp\n"


async def test_concurrent_streams_and_requests(client: AgentClient) -> None:
    async def stream_one(i: int) -> bytes:
        out = b""
        # Not a login shell: on a host whose root profile runs `pyenv init`, 25 concurrent login
        # shells race in pyenv's rehash and print its errors (the flake this test used to have).
        script = f"for j in 1 2 3; do echo {i}-$j; sleep 0.1; done"
        async with aclosing(client.start(["/bin/sh", "-c", script])) as events:
            async for event in events:
                out += event.data
        return out

    async def stat_loop() -> None:
        for _ in range(20):
            await client.stat("/")

    results = await asyncio.gather(*(stream_one(i) for i in range(25)), stat_loop(), stat_loop())
    for i, out in enumerate(results[:25]):
        assert out == f"{i}-1\n{i}-2\n{i}-3\n".encode()


async def test_agent_error_type(client: AgentClient) -> None:
    with pytest.raises(AgentError) as info:
        await client.stat("/no/such/thing")
    err = info.value
    assert (err.code, err.status) == ("not_found", 404)
    assert "/no/such/thing" in err.message


async def test_cors_preflight_and_headers(agent: AgentProcess) -> None:
    async with httpx.AsyncClient(base_url=agent.url) as raw:
        response = await raw.options("/process.Process/Start", headers={
            "Origin": "https://example.test", "Access-Control-Request-Method": "POST"})
        assert response.status_code == 204
        assert response.headers["access-control-allow-origin"] == "*"
        response = await raw.post("/process.Process/List", json={}, headers={**JSON, "Origin": "https://x.test"})
        assert response.headers["access-control-allow-origin"] == "*"
