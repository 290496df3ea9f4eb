"""The proxy and the guest's loopback, and private sandboxes (issue 12).

- Servers bound to 127.0.0.1 in the guest: the proxy finds the port closed, asks the sandbox's real
  agent (a subprocess on 127.0.0.2, playing the guest's address) to relay it, and connects again.
  Two ways in, as the host has them: QEMU's user networking (a stand-in for its ``hostfwd``, which
  accepts the host's connection and closes it when the guest refuses) and a network slot (the
  guest's address reached directly: a refused connect).
- ``allowPublicTraffic: false``: ports other than the agent's need E2B's ``e2b-traffic-access-token``
  header; it never reaches the sandbox.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from trenvx.guest.endpoint import TcpEndpoint
from trenvx.server.app import create_app
from trenvx.server.proxy import REPLAY_LIMIT, ClientDisconnected, _ReplayableBody

from .raw_upstream import RawUpstream
from .server_fakes import ThreadedServer, UpstreamState, fake_manager, free_port, make_config, make_template, upstream_app
from .test_agent_ports import GUEST, _guest_address_usable, start_guest_agent

TRAFFIC_HEADER = "e2b-traffic-access-token"


def hdr(sid: str, port: int = 49983, **extra: str) -> dict[str, str]:
    return {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": str(port), **extra}


class HostFwd(RawUpstream):
    """Stands in for a QEMU user-networking ``hostfwd``: listens on 127.0.0.1 and, for each connection
    it accepts, connects to ``guest:port``; when the guest refuses, the accepted connection is closed
    (so the host sees a connection that ends before any answer, not a refused connect)."""

    def __init__(self, guest: str, port: int) -> None:
        self.target = (guest, port)
        super().__init__()

    def serve(self, client: socket.socket) -> None:
        try:
            guest = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        guest.settimeout(None)

        def pipe(a: socket.socket, b: socket.socket) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
                b.shutdown(socket.SHUT_WR)
            except OSError:
                for s in (a, b):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        back = threading.Thread(target=pipe, args=(guest, client), daemon=True)
        back.start()
        pipe(client, guest)
        back.join()
        client.close()
        guest.close()


class Guest:
    """Everything of the one fake sandbox whose agent is real: loopback-only servers on ports of
    127.0.0.1, hostfwd stand-ins for them, and the server whose manager reaches them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.token = "sandbox-envd-token"
        self.agent_proc, self.agent_url = start_guest_agent(tmp / "agent.log", self.token)
        self.agent_fwd = HostFwd(GUEST, int(self.agent_url.rsplit(":", 1)[1]))
        self.forwards: dict[int, int] = {}
        self.closers: list[Any] = [self.agent_fwd]

    def port(self, *, serve: bool = True, state: UpstreamState | None = None) -> int:
        """A guest port with a hostfwd stand-in; with ``serve``, the test app listening on its 127.0.0.1."""
        port = free_port()
        if serve:
            server = ThreadedServer(upstream_app(state or UpstreamState()), port=port).__enter__()
            self.closers.append(server)
        fwd = HostFwd(GUEST, port)
        self.closers.append(fwd)
        self.forwards[port] = fwd.port
        return port

    def close(self) -> None:
        for c in reversed(self.closers):
            if isinstance(c, ThreadedServer):
                c.__exit__(None, None, None)
            else:
                c.close()
        self.agent_proc.terminate()
        self.agent_proc.wait(10)


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    if not _guest_address_usable():
        pytest.skip(f"cannot bind {GUEST} on this host")
    g = Guest(tmp_path_factory.mktemp("guest"))
    yield g
    g.close()


@pytest.fixture(scope="module")
def relay_server(tmp_path_factory: pytest.TempPathFactory, guest: Guest) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("relay")
    make_template(root, "tpl")
    cfg = make_config(root, domain="sbx.test")
    m = fake_manager(cfg, guest.agent_fwd.port)
    m.restorer.forwards = guest.forwards  # type: ignore[attr-defined]  # the same dict, filled as tests go
    with ThreadedServer(create_app(cfg, manager=m), lifespan="on") as s:
        s.url = f"http://127.0.0.1:{s.port}"  # type: ignore[attr-defined]
        s.manager = m  # type: ignore[attr-defined]
        r = httpx.post(f"{s.url}/sandboxes", json={"templateID": "tpl"})
        assert r.status_code == 201, r.text
        s.sid = r.json()["sandboxID"]  # type: ignore[attr-defined]
        # The fake restorer gave the sandbox a token of its own: the agent must take it (as after /init).
        s.manager.get(s.sid).agent.access_token = guest.token  # type: ignore[attr-defined]
        yield s


def relays(guest: Guest) -> list[dict[str, Any]]:
    r = httpx.get(guest.agent_url + "/ports/forward", headers={"X-Access-Token": guest.token})
    assert r.status_code == 200
    return list(r.json()["relays"])


def test_a_loopback_server_is_reached_through_a_qemu_style_forward(relay_server, guest: Guest) -> None:
    state = UpstreamState()
    port = guest.port(state=state)
    r = httpx.get(f"{relay_server.url}/headers?q=1", headers=hdr(relay_server.sid, port))
    assert r.status_code == 200, r.text
    assert r.json()["path"] == "/headers" and r.json()["query"] == "q=1"
    assert [(x["address"], x["port"], x["target"]) for x in relays(guest)
            if x["port"] == port] == [(GUEST, port, "127.0.0.1")]
    # Later requests go straight through the relay; the agent keeps one.
    by_host = httpx.get(f"{relay_server.url}/headers", headers={"Host": f"{port}-{relay_server.sid}.sbx.test"})
    assert by_host.status_code == 200
    assert len([x for x in relays(guest) if x["port"] == port]) == 1


def test_a_request_body_is_sent_again_on_the_retry(relay_server, guest: Guest) -> None:
    port = guest.port()
    data = b"0123456789abcdef" * 40000  # 640 kB, under the replay limit
    assert len(data) < REPLAY_LIMIT

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(data), 65536):
            yield data[i:i + 65536]

    r = httpx.post(f"{relay_server.url}/echo", headers=hdr(relay_server.sid, port), content=chunks(), timeout=30)
    assert r.status_code == 200 and r.content == data


async def test_a_websocket_to_a_loopback_server(relay_server, guest: Guest) -> None:
    from websockets.asyncio.client import connect

    port = guest.port()
    async with connect(f"ws://127.0.0.1:{relay_server.port}/ws", additional_headers=hdr(relay_server.sid, port)) as ws:
        await ws.send("through the relay")
        assert await ws.recv() == "echo:through the relay"


def test_a_slot_style_endpoint_refusing_the_connect(relay_server, guest: Guest, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a network slot the host reaches the guest's address directly: a loopback-only port refuses."""
    port = guest.port()
    m = relay_server.manager
    original = m.port_endpoint

    async def direct(sid: str, p: int) -> Any:
        return TcpEndpoint(GUEST, p) if p == port else await original(sid, p)

    monkeypatch.setattr(m, "port_endpoint", direct)
    r = httpx.get(f"{relay_server.url}/headers", headers=hdr(relay_server.sid, port))
    assert r.status_code == 200 and r.json()["path"] == "/headers"


async def test_nothing_listening_is_still_e2bs_502(relay_server, guest: Guest) -> None:
    from websockets.asyncio.client import connect

    port = guest.port(serve=False)
    r = httpx.get(f"{relay_server.url}/", headers=hdr(relay_server.sid, port))
    assert r.status_code == 502 and "port is not open" in r.json()["message"] and r.json()["code"] == 502
    assert not [x for x in relays(guest) if x["port"] == port]
    with pytest.raises(Exception) as ei:
        async with connect(f"ws://127.0.0.1:{relay_server.port}/ws", additional_headers=hdr(relay_server.sid, port)):
            pass
    assert "502" in str(ei.value)


async def test_the_replayable_body_sends_what_it_kept_then_reads_on() -> None:
    messages = [{"type": "http.request", "body": b"ab", "more_body": True},
                {"type": "http.request", "body": b"cd", "more_body": True},
                {"type": "http.request", "body": b"ef", "more_body": False}]
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    body = _ReplayableBody(receive, limit=100)
    first = body.stream()
    assert [await first.__anext__(), await first.__anext__()] == [b"ab", b"cd"]  # the first try fails here
    assert [c async for c in body.stream()] == [b"ab", b"cd", b"ef"]
    assert body.done.is_set() and body.replayable
    # Over the limit: not kept, not sent again.
    queue[:] = [{"type": "http.request", "body": b"x" * 60, "more_body": True},
                {"type": "http.request", "body": b"y" * 60, "more_body": False}]
    big = _ReplayableBody(receive, limit=100)
    assert [c async for c in big.stream()] == [b"x" * 60, b"y" * 60]
    assert not big.replayable
    with pytest.raises(RuntimeError):
        await big.stream().__anext__()
    # The client leaving ends the stream.
    queue[:] = [{"type": "http.disconnect"}]
    gone = _ReplayableBody(receive, limit=100)
    with pytest.raises(ClientDisconnected):
        await gone.stream().__anext__()
    assert gone.disconnected.is_set()


# -- allowPublicTraffic: false -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream_state() -> UpstreamState:
    return UpstreamState()


@pytest.fixture(scope="module")
def upstream(upstream_state):
    with ThreadedServer(upstream_app(upstream_state)) as s:
        yield s


@pytest.fixture(scope="module")
def server(tmp_path_factory, upstream):
    root = tmp_path_factory.mktemp("private")
    make_template(root, "tpl")
    cfg = make_config(root, domain="sbx.test")
    m = fake_manager(cfg, upstream.port, forwards={8000: upstream.port})
    with ThreadedServer(create_app(cfg, manager=m), lifespan="on") as s:
        s.url = f"http://127.0.0.1:{s.port}"  # type: ignore[attr-defined]
        s.manager = m  # type: ignore[attr-defined]
        yield s


@pytest.fixture(scope="module")
def private(server) -> tuple[str, str]:
    """A sandbox whose ports are private: (id, traffic access token)."""
    r = httpx.post(f"{server.url}/sandboxes", json={"templateID": "tpl"})
    assert r.status_code == 201
    sid = r.json()["sandboxID"]
    sb = server.manager.get(sid)
    sb.allow_public_traffic, sb.traffic_access_token = False, "traffic-secret"
    return sid, "traffic-secret"


def test_a_private_port_needs_the_traffic_token(server, private) -> None:
    sid, token = private
    missing = httpx.get(f"{server.url}/headers", headers=hdr(sid, 8000))
    assert missing.status_code == 403
    assert missing.json() == {
        "code": 403, "sandboxId": sid,
        "message": f"Sandbox is secured with traffic access token. Token header '{TRAFFIC_HEADER}' is missing",
    }
    wrong = httpx.get(f"{server.url}/headers", headers=hdr(sid, 8000, **{TRAFFIC_HEADER: "nope"}))
    assert wrong.status_code == 403 and "is invalid" in wrong.json()["message"]
    by_host = httpx.get(f"{server.url}/headers", headers={"Host": f"8000-{sid}.sbx.test"})
    assert by_host.status_code == 403
    ok = httpx.get(f"{server.url}/headers", headers=hdr(sid, 8000, **{TRAFFIC_HEADER: token}))
    assert ok.status_code == 200 and TRAFFIC_HEADER not in ok.json()["headers"]
    ok = httpx.get(f"{server.url}/headers", headers={"Host": f"8000-{sid}.sbx.test", TRAFFIC_HEADER: token})
    assert ok.status_code == 200


def test_the_agent_port_of_a_private_sandbox_needs_no_traffic_token(server, private) -> None:
    sid, _ = private
    r = httpx.get(f"{server.url}/headers", headers={**hdr(sid), "X-Access-Token": "tok"})
    assert r.status_code == 200 and r.json()["headers"]["x-access-token"] == "tok"


def test_a_public_sandbox_ignores_and_drops_the_header(server) -> None:
    sid = httpx.post(f"{server.url}/sandboxes", json={"templateID": "tpl"}).json()["sandboxID"]
    r = httpx.get(f"{server.url}/headers", headers=hdr(sid, 8000, **{TRAFFIC_HEADER: "anything"}))
    assert r.status_code == 200 and TRAFFIC_HEADER not in r.json()["headers"]
    r = httpx.get(f"{server.url}/headers", headers=hdr(sid, 49983, **{TRAFFIC_HEADER: "anything"}))
    assert r.status_code == 200 and TRAFFIC_HEADER not in r.json()["headers"]


async def test_a_private_websocket_needs_the_traffic_token(server, private) -> None:
    from websockets.asyncio.client import connect

    sid, token = private
    url = f"ws://127.0.0.1:{server.port}/ws"
    with pytest.raises(Exception) as ei:
        async with connect(url, additional_headers=hdr(sid, 8000)):
            pass
    assert "403" in str(ei.value)
    with pytest.raises(Exception) as ei:
        async with connect(url, additional_headers=hdr(sid, 8000, **{TRAFFIC_HEADER: "wrong"})):
            pass
    assert "403" in str(ei.value)
    async with connect(url, additional_headers=hdr(sid, 8000, **{TRAFFIC_HEADER: token})) as ws:
        await ws.send("private")
        assert await ws.recv() == "echo:private"


def test_an_unknown_sandbox_is_not_found_before_any_token_check(server) -> None:
    r = httpx.get(f"{server.url}/", headers=hdr("nosuchsandbox", 8000))
    assert r.status_code == 502 and "was not found" in r.json()["message"]


def test_wrong_tokens_of_any_length_are_refused(server, private) -> None:
    sid, token = private
    for presented in ("", token[:-1], token + "x", token.upper(), "\u00e9" * 4):
        headers: dict[str, Any] = {**hdr(sid, 8000), TRAFFIC_HEADER: presented.encode("utf-8")}
        r = httpx.get(f"{server.url}/headers", headers=headers)
        assert r.status_code == 403, presented
