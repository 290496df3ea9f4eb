"""The agent's port relays (``POST /ports/forward``): a server bound to the guest's loopback made
reachable on the guest address the host used.

The real agent runs as a subprocess listening on 127.0.0.2, which plays the guest's own address
(10.0.2.15 in a VM): a request to it arrives on 127.0.0.2, so that is where the agent relays. The
"loopback-only server in the guest" listens on 127.0.0.1. Parsing, limits and idle closing are
tested on :class:`PortForwarder` in-process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from trenvx.guest.agent.ports import (
    NothingListens,
    PortForwarder,
    TooManyRelays,
    guest_addresses,
    listening_sockets,
)
from trenvx.guest.client import AgentClient, AgentError

from .raw_upstream import RawUpstream
from .test_agent_harness import SRC

GUEST = "127.0.0.2"
"""The guest's own address in these tests (a loopback address other than 127.0.0.1)."""
TOKEN = "relay-token"


def _guest_address_usable() -> bool:
    try:
        with socket.socket() as s:
            s.bind((GUEST, 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _guest_address_usable(), reason=f"cannot bind {GUEST} on this host")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EchoServer(RawUpstream):
    """A TCP server on 127.0.0.1 only (the loopback-only server in the guest): echoes each connection,
    upper-cased, until EOF, then half-closes."""

    def serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data.upper())
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def roundtrip(port: int, payload: bytes, host: str = GUEST) -> bytes:
    """Send ``payload``, half-close, read until EOF."""
    with socket.create_connection((host, port), timeout=10) as c:
        sender = threading.Thread(target=lambda: (c.sendall(payload), c.shutdown(socket.SHUT_WR)))
        sender.start()
        parts = []
        while data := c.recv(65536):
            parts.append(data)
        sender.join()
        return b"".join(parts)


def refused(port: int, host: str = GUEST) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def start_guest_agent(log: Path, token: str) -> tuple[subprocess.Popen[bytes], str]:
    """The real agent on a free port of 127.0.0.2, its access token set by /init; (process, URL)."""
    port = free_port(GUEST)
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "trenvx.guest.agent", "--host", GUEST, "--port", str(port),
                                 "--skip", "all", "--log-level", "DEBUG"], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://{GUEST}:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 204:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.02)
        r = httpx.post(url + "/init", json={"sandboxId": "sbx-ports", "accessToken": token})
        assert r.status_code == 204, r.text
    except BaseException:
        proc.terminate()
        proc.wait(10)
        raise
    return proc, url


@pytest.fixture(scope="module")
def agent_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real agent on 127.0.0.2 with the access token ``TOKEN``."""
    proc, url = start_guest_agent(tmp_path_factory.mktemp("agent-ports") / "agent.log", TOKEN)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
async def client(agent_url: str) -> Iterator[AgentClient]:
    c = AgentClient(agent_url, access_token=TOKEN, timeout=10)
    yield c
    await c.aclose()


def forward_raw(agent_url: str, body: object, token: str | None = TOKEN, method: str = "POST") -> httpx.Response:
    headers = {"X-Access-Token": token} if token is not None else {}
    return httpx.request(method, agent_url + "/ports/forward", json=body, headers=headers, timeout=10)


async def relays_of(client: AgentClient, port: int) -> list[dict]:
    return [r for r in await client.forwarded_ports() if r["port"] == port]


async def wait_no_relay(client: AgentClient, port: int) -> None:
    deadline = time.monotonic() + 5
    while await relays_of(client, port):
        assert time.monotonic() < deadline, await client.forwarded_ports()
        time.sleep(0.02)


# -- over HTTP, against the agent subprocess ---------------------------------------------------------


def test_the_token_is_required(agent_url: str) -> None:
    server = EchoServer()
    try:
        for token in (None, "wrong"):
            r = forward_raw(agent_url, {"port": server.port}, token=token)
            assert r.status_code == 401 and "X-Access-Token" in r.json()["message"]
            assert forward_raw(agent_url, None, token=token, method="GET").status_code == 401
        assert refused(server.port), "an unauthenticated request made a relay"
    finally:
        server.close()


def test_bad_requests_are_400_and_405(agent_url: str) -> None:
    for body in ({}, {"port": 0}, {"port": 70000}, {"port": "80"}, {"port": True}, [1]):
        r = forward_raw(agent_url, body)
        assert r.status_code == 400 and "port" in r.json()["message"], (body, r.text)
    r = httpx.put(agent_url + "/ports/forward", headers={"X-Access-Token": TOKEN})
    assert r.status_code == 405


async def test_nothing_listening_is_404(agent_url: str, client: AgentClient) -> None:
    port = free_port()
    r = forward_raw(agent_url, {"port": port})
    assert r.status_code == 404
    assert f"nothing listens on port {port}" in r.json()["message"] and "127.0.0.1" in r.json()["message"]
    assert await client.forward_port(port) is False
    assert await relays_of(client, port) == []


async def test_a_loopback_server_is_relayed_both_ways_and_idempotently(agent_url: str, client: AgentClient) -> None:
    server = EchoServer()
    try:
        assert refused(server.port), "the loopback-only server must not be reachable on the guest address yet"
        first = forward_raw(agent_url, {"port": server.port})
        assert first.status_code == 200, first.text
        assert first.json() | {"message": ""} == {
            "port": server.port, "forwarded": True, "addresses": [GUEST], "target": "127.0.0.1", "created": True,
            "message": "",
        }
        # Data both ways, large, with the half-close passed on in both directions.
        payload = os.urandom(3 << 20)
        assert roundtrip(server.port, payload) == payload.upper()
        assert roundtrip(server.port, b"hello") == b"HELLO"
        # Asking again changes nothing: the same relay, not a second one.
        again = forward_raw(agent_url, {"port": server.port})
        assert again.status_code == 200 and again.json()["forwarded"] and not again.json()["created"]
        assert await client.forward_port(server.port) is True
        assert [(r["address"], r["target"]) for r in await relays_of(client, server.port)] == [(GUEST, "127.0.0.1")]
        # Many connections at once.
        outs: list[bytes] = []
        threads = [threading.Thread(target=lambda i=i: outs.append(roundtrip(server.port, b"c%d" % i))) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert sorted(outs) == sorted(b"C%d" % i for i in range(20))
    finally:
        server.close()
    await client.forward_port(server.port)  # nothing listens now: the relay goes


async def test_an_http_server_on_loopback_answers_through_the_relay(client: AgentClient) -> None:
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = b"served on loopback"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{GUEST}:{port}/")
        assert await client.forward_port(port) is True
        r = httpx.get(f"http://{GUEST}:{port}/")
        assert r.status_code == 200 and r.text == "served on loopback"
    finally:
        httpd.shutdown()
        httpd.server_close()
    await client.forward_port(port)


async def test_a_port_already_on_the_guest_address_is_not_relayed(agent_url: str, client: AgentClient) -> None:
    direct = socket.socket()
    direct.bind((GUEST, 0))
    direct.listen()
    port = direct.getsockname()[1]
    loopback = socket.socket()
    loopback.bind(("127.0.0.1", port))  # the same port on loopback too: still nothing to relay
    loopback.listen()
    try:
        r = forward_raw(agent_url, {"port": port})
        assert r.status_code == 200 and r.json()["forwarded"] is False and r.json()["addresses"] == [GUEST]
        assert "already listens" in r.json()["message"]
        assert await client.forward_port(port) is False
        assert await relays_of(client, port) == []
    finally:
        direct.close()
        loopback.close()


async def test_the_relay_closes_when_the_loopback_server_goes_away(agent_url: str, client: AgentClient) -> None:
    server = EchoServer()
    port = server.port
    assert await client.forward_port(port) is True
    # A connection open through the relay when the server goes: it ends, cleanly, with the server's.
    held = socket.create_connection((GUEST, port), timeout=10)
    held.sendall(b"x")
    assert held.recv(10) == b"X"
    server.close()
    held.shutdown(socket.SHUT_WR)
    assert held.recv(10) == b""
    held.close()
    # The next connection is refused upstream: the relay closes and its address is free again.
    with socket.create_connection((GUEST, port), timeout=10) as c:
        c.settimeout(10)
        try:
            assert c.recv(10) == b""
        except ConnectionResetError:
            pass
    await wait_no_relay(client, port)
    assert refused(port)
    # Asked again: nothing listens any more.
    assert forward_raw(agent_url, {"port": port}).status_code == 404
    # The server comes back (on loopback again): relayed again, on request.
    server = EchoServer(port)
    try:
        assert await client.forward_port(port) is True
        assert roundtrip(port, b"back") == b"BACK"
    finally:
        server.close()
    # A forward request itself notices that the server went and drops the relay at once.
    assert await client.forward_port(port) is False
    assert await relays_of(client, port) == []
    assert refused(port)


async def test_forward_port_raises_on_a_wrong_token_and_is_false_on_an_older_agent(client: AgentClient) -> None:
    async with AgentClient(client.base_url, access_token="wrong") as bad:
        with pytest.raises(AgentError) as ei:
            await bad.forward_port(free_port())
        assert ei.value.status == 401
    # Templates built before /ports/forward existed answer "no such endpoint": no relay, no error.
    older = httpx.MockTransport(lambda request: httpx.Response(404, json={"code": 404, "message": "no such endpoint"}))
    async with AgentClient("http://agent", transport=older) as old:
        assert await old.forward_port(8080) is False


# -- PortForwarder in-process --------------------------------------------------------------------------


def test_listening_sockets_and_guest_addresses_from_proc(tmp_path: Path) -> None:
    (tmp_path / "tcp").write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1\n"
        "   1: 0F02000A:C383 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2\n"
        "   2: 0F02000A:C383 0202000A:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 3\n"
        "   3: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4\n"
    )
    (tmp_path / "tcp6").write_text(
        "  sl  local_address                         remote_address                        st\n"
        "   0: 00000000000000000000000001000000:1F91 00000000000000000000000000000000:0000 0A\n"
        "   1: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A\n"
        "   2: 0000000000000000FFFF00000100007F:1F92 00000000000000000000000000000000:0000 0A\n"
    )
    if sys.byteorder != "little":
        pytest.skip("the sample /proc lines are a little-endian host's")
    assert listening_sockets(str(tmp_path)) == {
        ("127.0.0.1", 8080), ("10.0.2.15", 50051), ("0.0.0.0", 22), ("::1", 8081), ("::", 80), ("127.0.0.1", 8082),
    }
    assert listening_sockets(str(tmp_path / "missing")) is None
    (tmp_path / "fib_trie").write_text(
        "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n"
        "     +-- 10.0.2.0/24 2 0 2\n        +-- 10.0.2.0/28 2 0 2\n           |-- 10.0.2.0\n"
        "              /24 link UNICAST\n           |-- 10.0.2.15\n              /32 host LOCAL\n"
        "        |-- 10.0.2.255\n           /32 link BROADCAST\n"
        "     +-- 127.0.0.0/8 2 0 2\n        |-- 127.0.0.1\n           /32 host LOCAL\n"
        "Local:\n  +-- 0.0.0.0/0 3 0 5\n        |-- 10.0.2.15\n              /32 host LOCAL\n"
    )
    assert guest_addresses(str(tmp_path / "fib_trie")) == ["10.0.2.15"]
    assert guest_addresses(str(tmp_path / "missing")) == []


def test_limits_idle_close_and_shutdown() -> None:
    servers = [EchoServer(), EchoServer()]
    forwarder = PortForwarder(max_relays=1, idle_close_s=0.3, max_connections=1)
    try:
        first = forwarder.forward(servers[0].port, GUEST)
        assert first.forwarded and first.created and first.target == "127.0.0.1"
        with pytest.raises(TooManyRelays):
            forwarder.forward(servers[1].port, GUEST)
        with pytest.raises(NothingListens):
            forwarder.forward(free_port(), GUEST)
        # One connection at a time: a second one is closed at once, the first one is served.
        held = socket.create_connection((GUEST, servers[0].port), timeout=10)
        held.sendall(b"a")
        assert held.recv(10) == b"A"
        extra = socket.create_connection((GUEST, servers[0].port), timeout=10)
        try:
            assert extra.recv(10) == b""
        except ConnectionResetError:
            pass
        extra.close()
        held.close()
        # Idle for idle_close_s: the relay closes by itself and frees its slot.
        deadline = time.monotonic() + 5
        while forwarder.relays():
            assert time.monotonic() < deadline, forwarder.relays()
            time.sleep(0.05)
        assert refused(servers[0].port)
        second = forwarder.forward(servers[1].port, GUEST)
        assert second.forwarded and second.created
        held = socket.create_connection((GUEST, servers[1].port), timeout=10)
        held.sendall(b"b")
        assert held.recv(10) == b"B"
        relay = forwarder.relays()[0]
        forwarder.shutdown()  # the agent stops: relays and their connections end
        assert relay.closed.is_set() and "stopping" in relay.close_reason
        try:
            assert held.recv(10) == b""
        except ConnectionResetError:
            pass
        held.close()
        assert forwarder.relays() == [] and refused(servers[1].port)
    finally:
        forwarder.shutdown()
        for s in servers:
            s.close()


def test_a_vsock_request_relays_on_every_guest_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """No IP address on the request (vsock): the relay listens on the guest's addresses from the FIB."""
    import trenvx.guest.agent.ports as ports

    monkeypatch.setattr(ports, "guest_addresses", lambda path="": [GUEST])
    server = EchoServer()
    forwarder = PortForwarder()
    try:
        result = forwarder.forward(server.port, None)
        assert result.forwarded and result.addresses == [GUEST]
        assert roundtrip(server.port, b"vsock") == b"VSOCK"
    finally:
        forwarder.shutdown()
        server.close()
