"""How the proxy ends a stream whose sandbox goes away or whose upstream breaks (issue 13 item 7),
and the sandbox domain it announces for ``get_host`` (item 12).

Over a real socket (uvicorn) against a stand-in upstream that streams Connect envelopes and plain
bytes; no VMs. The upstream of a killed sandbox here keeps streaming (like a VM behind a tap
device, whose connections go quiet instead of closing), so only the proxy noticing can end it.
"""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from trenvx.server.app import create_app
from trenvx.server.proxy import ConnectStreamFraming, announced_domain, end_stream_error

from .server_fakes import ThreadedServer, fake_manager, make_config, make_template

CONNECT = "application/connect+json"


def envelope(message: dict, flags: int = 0) -> bytes:
    data = json.dumps(message).encode()
    return struct.pack(">BI", flags, len(data)) + data


def envelopes(raw: bytes) -> list[tuple[int, dict]]:
    out, i = [], 0
    while i < len(raw):
        assert len(raw) - i >= 5, f"truncated envelope header at {i}: {raw[i:]!r}"
        flags, n = struct.unpack(">BI", raw[i:i + 5])
        assert len(raw) - i - 5 >= n, "truncated envelope"
        out.append((flags, json.loads(raw[i + 5:i + 5 + n])))
        i += 5 + n
    return out


# ----------------------------------------------------------------------------- framing


def test_framing_follows_envelopes_split_anywhere() -> None:
    body = envelope({"event": {"start": {"pid": 1}}}) + envelope({"x": "y" * 300}) + envelope({}, 0x02)
    for size in (1, 2, 3, 5, 7, 64, len(body)):
        f = ConnectStreamFraming()
        boundaries = []
        for i in range(0, len(body), size):
            f.feed(body[i:i + size])
            boundaries.append((i + size, f.at_boundary))
            if i + size < len(body):
                assert not f.ended
        assert f.at_boundary and f.ended
        first_end = len(envelope({"event": {"start": {"pid": 1}}}))
        assert all(not ok for pos, ok in boundaries if pos < first_end)


def test_framing_is_unknown_while_a_send_is_in_flight() -> None:
    f = ConnectStreamFraming()
    f.feed(envelope({"a": 1}))
    assert f.at_boundary
    f.unknown = True
    assert not f.at_boundary


@pytest.mark.parametrize("status, ctype, tracked", [
    (200, "application/connect+json", True), (200, "application/connect+proto; charset=x", True),
    (200, "application/json", False), (200, "text/plain", False), (404, "application/connect+json", False),
    (200, None, False),
])
def test_framing_only_for_connect_streams(status: int, ctype: str | None, tracked: bool) -> None:
    assert (ConnectStreamFraming.for_response(status, ctype) is not None) is tracked


def test_end_stream_error_is_a_connect_end_envelope() -> None:
    assert envelopes(end_stream_error("gone")) == [(0x02, {"error": {"code": "unavailable", "message": "gone"}})]


# ----------------------------------------------------------------------------- domain


@pytest.mark.parametrize("configured, host, expected", [
    ("localhost", "127.0.0.1:3000", "localhost:3000"),
    ("localhost", "localhost:49999", "localhost:49999"),
    ("localhost", "[::1]:3000", "localhost:3000"),
    ("localhost", "127.0.0.1", "localhost"),          # port 80: nothing to add
    ("localhost", None, "localhost"),
    ("localhost", "h:notaport", "localhost"),
    ("localhost", "h:99999", "localhost"),
    ("sbx.localhost", "10.0.0.5:3000", "sbx.localhost:3000"),
    ("localhost:8080", "127.0.0.1:3000", "localhost:8080"),   # a configured port wins
    ("sandboxes.example.com", "127.0.0.1:3000", "sandboxes.example.com"),  # real DNS: as configured
    ("notlocalhost", "127.0.0.1:3000", "notlocalhost"),
])
def test_announced_domain(configured: str, host: str | None, expected: str) -> None:
    assert announced_domain(configured, host) == expected


# ----------------------------------------------------------------------------- end to end through the proxy


def upstream() -> Starlette:
    async def connect_forever(request: Request) -> StreamingResponse:
        async def gen():
            yield envelope({"event": {"start": {"pid": 7}}})
            while True:
                await asyncio.sleep(0.05)
                yield envelope({"event": {"keepalive": {}}})
        return StreamingResponse(gen(), media_type=CONNECT)

    async def connect_cut(request: Request) -> StreamingResponse:
        half = request.query_params.get("half") == "1"

        async def gen():
            yield envelope({"event": {"start": {"pid": 7}}})
            await asyncio.sleep(0.1)
            if half:
                yield envelope({"event": {"data": {"stdout": "aGk="}}})[:7]
                await asyncio.sleep(0.1)
            raise RuntimeError("the agent went away")  # uvicorn cuts the connection mid-body
        return StreamingResponse(gen(), media_type=CONNECT)

    async def plain_forever(request: Request) -> StreamingResponse:
        async def gen():
            while True:
                yield b"tick\n"
                await asyncio.sleep(0.05)
        return StreamingResponse(gen(), media_type="text/plain")

    async def ws(websocket: WebSocket) -> None:  # accepts, then stays quiet (like a VM gone silent)
        await websocket.accept()
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass

    return Starlette(routes=[Route("/connect-forever", connect_forever, methods=["POST"]),
                             Route("/connect-cut", connect_cut, methods=["POST"]),
                             Route("/plain-forever", plain_forever), WebSocketRoute("/ws", ws)])


@pytest.fixture(scope="module")
def up():
    with ThreadedServer(upstream()) as s:
        yield s


@pytest.fixture(scope="module")
def server(tmp_path_factory, up):
    root: Path = tmp_path_factory.mktemp("proxy-end")
    make_template(root, "tpl")
    cfg = make_config(root)
    m = fake_manager(cfg, up.port, forwards={8000: up.port})
    with ThreadedServer(create_app(cfg, manager=m), lifespan="on") as s:
        s.url = f"http://127.0.0.1:{s.port}"  # type: ignore[attr-defined]
        yield s


def create(server) -> str:
    r = httpx.post(f"{server.url}/sandboxes", json={"templateID": "tpl"})
    assert r.status_code == 201
    return r.json()["sandboxID"]


def hdr(sid: str, port: int = 49983) -> dict[str, str]:
    return {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": str(port), "Content-Type": CONNECT}


def test_connect_stream_of_a_killed_sandbox_ends_with_not_found(server) -> None:
    sid = create(server)
    raw = b""
    with httpx.stream("POST", f"{server.url}/connect-forever", headers=hdr(sid), content=b"",
                      timeout=httpx.Timeout(30)) as r:
        assert r.status_code == 200
        it = r.iter_raw()
        raw += next(it)
        assert httpx.delete(f"{server.url}/sandboxes/{sid}").status_code == 204
        for chunk in it:  # ends: the proxy noticed the sandbox is gone
            raw += chunk
    messages = envelopes(raw)
    assert messages[0] == (0, {"event": {"start": {"pid": 7}}})
    flags, last = messages[-1]
    assert flags == 0x02 and last["error"]["code"] == "unavailable"
    assert f"The sandbox {sid} was not found" in last["error"]["message"]


def test_plain_stream_of_a_killed_sandbox_is_aborted(server) -> None:
    sid = create(server)
    got = b""
    with pytest.raises(httpx.RemoteProtocolError):  # a truncated body, not a normal end
        with httpx.stream("GET", f"{server.url}/plain-forever", headers=hdr(sid, 8000),
                          timeout=httpx.Timeout(30)) as r:
            assert r.status_code == 200
            for chunk in r.iter_raw():
                got += chunk
                if got.count(b"tick") == 2:
                    assert httpx.delete(f"{server.url}/sandboxes/{sid}").status_code == 204
    assert got.startswith(b"tick\n")


def test_connect_stream_cut_by_its_upstream_ends_with_unavailable(server) -> None:
    sid = create(server)
    try:
        r = httpx.post(f"{server.url}/connect-cut", headers=hdr(sid), content=b"", timeout=30)
        assert r.status_code == 200
        messages = envelopes(r.content)
        assert messages[0] == (0, {"event": {"start": {"pid": 7}}})
        flags, last = messages[-1]
        assert flags == 0x02 and last["error"]["code"] == "unavailable"
        assert "ended before the stream completed" in last["error"]["message"]
    finally:
        httpx.delete(f"{server.url}/sandboxes/{sid}")


def test_connect_stream_cut_inside_an_envelope_is_aborted(server) -> None:
    sid = create(server)
    try:
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.post(f"{server.url}/connect-cut?half=1", headers=hdr(sid), content=b"", timeout=30)
    finally:
        httpx.delete(f"{server.url}/sandboxes/{sid}")


async def test_websocket_of_a_killed_sandbox_is_closed(server) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosedError

    sid = await asyncio.to_thread(create, server)
    headers = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "8000"}
    async with connect(f"ws://127.0.0.1:{server.port}/ws", additional_headers=headers) as ws:
        r = await asyncio.to_thread(httpx.delete, f"{server.url}/sandboxes/{sid}")
        assert r.status_code == 204
        with pytest.raises(ConnectionClosedError) as ei:
            await asyncio.wait_for(ws.recv(), 30)
    assert ei.value.rcvd is not None and ei.value.rcvd.code == 1011
    assert "was not found" in ei.value.rcvd.reason


def test_create_announces_a_loopback_domain_with_the_port(server) -> None:
    r = httpx.post(f"{server.url}/sandboxes", json={"templateID": "tpl"})
    try:
        assert r.json()["domain"] == f"localhost:{server.port}"
    finally:
        httpx.delete(f"{server.url}/sandboxes/{r.json()['sandboxID']}")
