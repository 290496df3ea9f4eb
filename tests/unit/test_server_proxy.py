"""The proxy to sandbox ports over a real socket (uvicorn), against a stand-in upstream server:
streaming both ways, websockets, client disconnects reaching the upstream, errors E2B's SDKs
recognise. No VMs: the "agent" and the "web server in the sandbox" are the upstream test app; for
Firecracker / Cloud Hypervisor sandboxes the agent is behind a stand-in hybrid vsock socket."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from trenvx.server.app import create_app

from .server_fakes import ThreadedServer, UpstreamState, fake_manager, make_config, make_template, upstream_app


@pytest.fixture(scope="module")
def upstream_state() -> UpstreamState:
    return UpstreamState()


@pytest.fixture(scope="module")
def upstream(upstream_state):
    with ThreadedServer(upstream_app(upstream_state)) as s:
        yield s


@pytest.fixture(scope="module")
def server(tmp_path_factory, upstream):
    root: Path = tmp_path_factory.mktemp("proxy")
    make_template(root, "tpl")
    cfg = make_config(root, domain="sbx.test")
    m = fake_manager(cfg, upstream.port, forwards={8000: upstream.port})
    with ThreadedServer(create_app(cfg, manager=m), lifespan="on") as s:
        s.url = f"http://127.0.0.1:{s.port}"  # type: ignore[attr-defined]
        yield s


@pytest.fixture(scope="module")
def sandbox(server) -> str:
    r = httpx.post(f"{server.url}/sandboxes", json={"templateID": "tpl"})
    assert r.status_code == 201
    return r.json()["sandboxID"]


def hdr(sid: str, port: int = 49983) -> dict[str, str]:
    return {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": str(port)}


def test_headers_route_to_the_agent_port(server, sandbox) -> None:
    r = httpx.get(f"{server.url}/headers?x=1&y=%2F", headers={**hdr(sandbox), "X-Access-Token": "tok"})
    assert r.status_code == 200
    body = r.json()
    assert body["query"] == "x=1&y=%2F" and body["path"] == "/headers"
    assert body["headers"]["x-access-token"] == "tok"
    assert "e2b-sandbox-id" not in body["headers"]
    assert body["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert httpx.get(f"{server.url}/health", headers=hdr(sandbox)).status_code == 204


def test_host_routing_to_another_port(server, sandbox) -> None:
    r = httpx.get(f"{server.url}/headers", headers={"Host": f"8000-{sandbox}.sbx.test:{server.port}"})
    assert r.status_code == 200 and r.json()["path"] == "/headers"
    r = httpx.get(f"{server.url}/headers", headers={"Host": f"8000-{sandbox}.other.domain"})
    assert r.status_code == 404  # not for a sandbox: the API has no /headers


def test_unknown_sandbox_and_closed_port_give_e2b_502s(server, sandbox) -> None:
    r = httpx.get(f"{server.url}/health", headers=hdr("nosuchsandbox"))
    assert r.status_code == 502 and "was not found" in r.json()["message"]
    r = httpx.get(f"{server.url}/health", headers=hdr(sandbox, 9999))
    assert r.status_code == 502 and "port is not open" in r.json()["message"] and r.json()["code"] == 502
    r = httpx.get(f"{server.url}/health", headers={"E2b-Sandbox-Id": sandbox})
    assert r.status_code == 400 and "E2b-Sandbox-Port" in r.json()["message"]
    r = httpx.get(f"{server.url}/health", headers=hdr(sandbox, 0))
    assert r.status_code == 400


def test_large_upload_streams_through_intact(server, sandbox) -> None:
    data = os.urandom(24 * 2**20)

    def gen():
        for i in range(0, len(data), 1 << 20):
            yield data[i:i + (1 << 20)]

    for content in (data, gen()):  # with Content-Length, and chunked
        r = httpx.post(f"{server.url}/echo", headers=hdr(sandbox), content=content, timeout=60)
        assert r.status_code == 200
        assert hashlib.sha256(r.content).hexdigest() == hashlib.sha256(data).hexdigest()


def test_server_stream_chunks_arrive_as_they_are_produced(server, sandbox) -> None:
    arrivals = []
    t0 = time.monotonic()
    with httpx.stream("GET", f"{server.url}/stream?n=4&delay=0.3", headers=hdr(sandbox)) as r:
        for line in r.iter_lines():
            arrivals.append((line, time.monotonic() - t0))
    assert [a[0] for a in arrivals] == [f"chunk-{i}" for i in range(4)]
    assert arrivals[0][1] < 0.25, f"first chunk was buffered: {arrivals}"
    assert arrivals[-1][1] > 0.8


def test_client_disconnect_closes_the_upstream_stream(server, sandbox, upstream_state) -> None:
    before = upstream_state.stream_cancelled
    with httpx.stream("GET", f"{server.url}/forever", headers=hdr(sandbox)) as r:
        it = r.iter_lines()
        assert next(it) == "tick-0"
    deadline = time.time() + 5
    while upstream_state.stream_cancelled == before and time.time() < deadline:
        time.sleep(0.05)
    assert upstream_state.stream_cancelled > before, "the upstream never saw the client leave"


def test_a_request_waiting_for_its_answer_ends_when_its_sandbox_does(server) -> None:
    # The agent has not answered (it never will: its VM is gone): the client hears so at once,
    # not at its own timeout.
    sid = httpx.post(f"{server.url}/sandboxes", json={"templateID": "tpl"}).json()["sandboxID"]
    outcome: dict[str, object] = {}

    def call() -> None:
        t0 = time.monotonic()
        r = httpx.get(f"{server.url}/stall", headers=hdr(sid), timeout=60)
        outcome.update(status=r.status_code, body=r.json(), seconds=time.monotonic() - t0)

    import threading

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.5)
    assert httpx.delete(f"{server.url}/sandboxes/{sid}").status_code == 204
    t.join(30)
    assert not t.is_alive(), "the request still waits for a sandbox that is gone"
    assert outcome["status"] == 502 and "was not found" in outcome["body"]["message"], outcome
    assert outcome["seconds"] < 10, outcome


async def test_websocket_relay(server, sandbox) -> None:
    from websockets.asyncio.client import connect

    url = f"ws://127.0.0.1:{server.port}/ws"
    async with connect(url, additional_headers=hdr(sandbox, 8000), subprotocols=["chat"]) as ws:
        assert ws.subprotocol == "chat"
        await ws.send("hi")
        assert await ws.recv() == "echo:hi"
        await ws.send(b"\x00\xff")
        assert await ws.recv() == b"echo:\x00\xff"
    async with connect(f"ws://8000-{sandbox}.sbx.test:{server.port}/ws", host="127.0.0.1", port=server.port) as ws:
        await ws.send("host-routed")
        assert await ws.recv() == "echo:host-routed"
    with pytest.raises(Exception) as ei:
        async with connect(url, additional_headers=hdr("nosuchsandbox")):
            pass
    assert "502" in str(ei.value)


async def test_many_concurrent_streams(server, sandbox) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        async def one(i: int) -> bytes:
            r = await c.post("/echo", headers=hdr(sandbox), content=f"payload-{i}".encode() * 1000)
            return r.content

        outs = await asyncio.gather(*(one(i) for i in range(50)))
    assert all(o == f"payload-{i}".encode() * 1000 for i, o in enumerate(outs))


# -- a sandbox whose agent is reached over hybrid vsock (Firecracker, Cloud Hypervisor) ------------


@pytest.fixture(scope="module")
def vsock_server(upstream):
    root = Path(tempfile.mkdtemp(prefix="tx", dir="/tmp"))  # short: sockets live in sandbox workdirs
    make_template(root, "tpl", vmm_type="firecracker")
    cfg = make_config(root, domain="sbx.test")
    m = fake_manager(cfg, upstream.port, vmm="firecracker")
    with ThreadedServer(create_app(cfg, manager=m), lifespan="on") as s:
        s.url = f"http://127.0.0.1:{s.port}"  # type: ignore[attr-defined]
        s.manager = m  # type: ignore[attr-defined]
        yield s
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def vsock_sandbox(vsock_server) -> str:
    r = httpx.post(f"{vsock_server.url}/sandboxes", json={"templateID": "tpl"})
    assert r.status_code == 201
    return r.json()["sandboxID"]


def test_vsock_agent_port_is_proxied_through_the_vsock_socket(vsock_server, vsock_sandbox) -> None:
    vsock = vsock_server.manager.restorer.standins[vsock_sandbox][0]
    before = len(vsock.connects)
    r = httpx.get(f"{vsock_server.url}/headers?x=1", headers={**hdr(vsock_sandbox), "X-Access-Token": "tok"})
    assert r.status_code == 200
    assert r.json()["query"] == "x=1" and r.json()["headers"]["x-access-token"] == "tok"
    assert vsock.connects[before:] == [49983]
    data = os.urandom(3 * 2**20)
    r = httpx.post(f"{vsock_server.url}/echo", headers=hdr(vsock_sandbox), content=data, timeout=60)
    assert r.status_code == 200 and r.content == data
    with httpx.stream("GET", f"{vsock_server.url}/stream?n=3&delay=0.05", headers=hdr(vsock_sandbox)) as r:
        assert list(r.iter_lines()) == ["chunk-0", "chunk-1", "chunk-2"]


async def test_vsock_websocket_and_other_ports(vsock_server, vsock_sandbox) -> None:
    from websockets.asyncio.client import connect

    async with connect(f"ws://127.0.0.1:{vsock_server.port}/ws", additional_headers=hdr(vsock_sandbox)) as ws:
        await ws.send("over vsock")
        assert await ws.recv() == "echo:over vsock"
    r = httpx.get(f"{vsock_server.url}/headers", headers=hdr(vsock_sandbox, 8000))
    assert r.status_code == 502
    assert "port is not open" in r.json()["message"] and "no tap networking" in r.json()["message"]


def test_vsock_clients_are_dropped_with_their_sandbox(vsock_server, vsock_sandbox) -> None:
    other = httpx.post(f"{vsock_server.url}/sandboxes", json={"templateID": "tpl"}).json()["sandboxID"]
    assert httpx.get(f"{vsock_server.url}/health", headers=hdr(other)).status_code == 204
    assert httpx.delete(f"{vsock_server.url}/sandboxes/{other}").status_code == 204
    r = httpx.get(f"{vsock_server.url}/health", headers=hdr(other))
    assert r.status_code == 502 and "was not found" in r.json()["message"]
    third = httpx.post(f"{vsock_server.url}/sandboxes", json={"templateID": "tpl"}).json()["sandboxID"]
    assert httpx.get(f"{vsock_server.url}/health", headers=hdr(third)).status_code == 204
    upstreams = proxy_of(vsock_server).upstreams
    owners = {sid for sid, _ in upstreams.owners()}
    assert other not in owners
    assert {vsock_sandbox, third} <= owners


def proxy_of(server) -> "SandboxProxy":  # noqa: F821
    """The SandboxProxy of a ThreadedServer's app (the outermost middleware)."""
    from trenvx.server.proxy import SandboxProxy

    app = server.server.config.loaded_app
    while not isinstance(app, SandboxProxy):
        app = getattr(app, "middleware_stack", None) or app.app  # FastAPI, then each middleware
    return app
