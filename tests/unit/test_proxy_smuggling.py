"""Request smuggling and header injection through the sandbox proxy fail (issue 18, item 4).

A real server (uvicorn, the app of ``trenvx serve``) over a fake manager with two sandboxes, A and
B; their ports are answered by :class:`Recorder`, a raw HTTP/1.1 server that parses what reaches
it with h11 and records every request (method, target, headers, body). The manager's
``port_endpoint`` is wrapped to record which sandbox and port the proxy asked for. Each test
writes bytes on a raw socket, aimed at sandbox A, and asserts that the upstream never received a
second (smuggled) request, an injected header, a raw CR/LF, or anything for sandbox B or the
server's API.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h11
import httpx
import pytest
import uvicorn

from trenvx.server.app import create_app

from .raw_upstream import RawUpstream
from .server_fakes import ThreadedServer, fake_manager, make_config, make_template

DOMAIN = "sbx.test"
SMUGGLED = b"/smuggled"


@dataclass
class Seen:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""


class Recorder(RawUpstream):
    """A raw upstream: parses each connection with h11, records every request, answers 200."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.errors: list[str] = []
        self.raw: list[bytes] = []
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        h = h11.Connection(h11.SERVER)
        current: Seen | None = None
        with conn:
            conn.settimeout(30)
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                with self.lock:
                    self.raw.append(data)
                h.receive_data(data)
                while True:
                    try:
                        event = h.next_event()
                    except h11.RemoteProtocolError as e:
                        with self.lock:
                            self.errors.append(str(e))
                        return
                    if event is h11.NEED_DATA or event is h11.PAUSED:
                        break
                    if isinstance(event, h11.Request):
                        current = Seen(event.method, event.target, list(event.headers.raw_items()))
                        with self.lock:
                            self.requests.append(current)
                    elif isinstance(event, h11.Data) and current is not None:
                        current.body += bytes(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        conn.sendall(h.send(h11.Response(status_code=200, headers=[("content-length", "2")])) +
                                     h.send(h11.Data(data=b"ok")) + h.send(h11.EndOfMessage()))
                        try:
                            h.start_next_cycle()
                        except h11.LocalProtocolError:
                            return
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                if h.their_state is h11.CLOSED or not data:
                    return

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()
            self.errors.clear()
            self.raw.clear()


@dataclass
class Rig:
    url: str
    port: int
    recorder: Recorder
    a: str
    b: str
    asked: list[tuple[str, int]]
    api_calls: list[str]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    root: Path = tmp_path_factory.mktemp("smuggling")
    make_template(root, "tpl")
    recorder = Recorder()
    cfg = make_config(root, domain=DOMAIN)
    m = fake_manager(cfg, recorder.port, forwards={8000: recorder.port})
    if not hasattr(m.restorer, "jail"):  # (a manager that jails VMMs asks its restorer for the policy)
        m.restorer.jail = None  # type: ignore[attr-defined]
    asked: list[tuple[str, int]] = []
    real = m.port_endpoint

    async def recording_port_endpoint(sandbox_id: str, port: int):  # type: ignore[no-untyped-def]
        asked.append((sandbox_id, port))
        return await real(sandbox_id, port)

    m.port_endpoint = recording_port_endpoint  # type: ignore[method-assign]
    app = create_app(cfg, manager=m)
    api_calls: list[str] = []

    with _serve(_api_spy(app, api_calls)) as srv:
        url = f"http://127.0.0.1:{srv.port}"
        a = httpx.post(f"{url}/sandboxes", json={"templateID": "tpl"}).json()["sandboxID"]
        b = httpx.post(f"{url}/sandboxes", json={"templateID": "tpl"}).json()["sandboxID"]
        yield Rig(url, srv.port, recorder, a, b, asked, api_calls)
    recorder.close()


def _serve(app) -> ThreadedServer:  # type: ignore[no-untyped-def]
    """The app on uvicorn as ``trenvx serve`` runs it (runner.serve): no trust in X-Forwarded-*."""
    srv = ThreadedServer(app, lifespan="on")
    srv.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=srv.port, log_level="warning",
                                               lifespan="on", ws="auto", proxy_headers=False, server_header=False))
    srv.thread = threading.Thread(target=srv.server.run, daemon=True)
    return srv


def _api_spy(app, calls: list[str]):  # type: ignore[no-untyped-def]
    """The app with its API's router (where the proxy passes on what is not for a sandbox) recording
    the paths it is asked."""
    inner = app.router.middleware_stack

    async def spy(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "http":
            calls.append(scope["path"])
        return await inner(scope, receive, send)

    app.router.middleware_stack = spy
    return app


def raw_exchange(rig: Rig, payload: bytes, settle_s: float = 0.1, quiet_s: float = 0.5) -> bytes:
    """Send ``payload`` on one connection; read what comes back until the server closes or is quiet
    for ``quiet_s`` (it keeps the connection open after its answers; half-closing ours would make it
    drop them)."""
    with socket.create_connection(("127.0.0.1", rig.port), timeout=5) as s:
        s.sendall(payload)
        s.settimeout(quiet_s)
        chunks = []
        while True:
            try:
                data = s.recv(65536)
            except (TimeoutError, socket.timeout, ConnectionResetError):
                break
            if not data:
                break
            chunks.append(data)
    time.sleep(settle_s)  # what the proxy forwards arrives upstream
    return b"".join(chunks)


def statuses(reply: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)]


MANAGER_PATHS = {b"/health", b"/metrics", b"/init", b"/envs"}


def proxied(rig: Rig) -> list[Seen]:
    """What reached the upstream but the manager's own calls to the "agent" (health, metrics)."""
    return [r for r in rig.recorder.requests
            if not (r.target in MANAGER_PATHS and not any(k.lower() == b"x-forwarded-host" for k, _ in r.headers))]


@pytest.fixture
def clean(rig: Rig) -> Rig:
    rig.recorder.clear()
    rig.asked.clear()
    rig.api_calls.clear()
    return rig


def host(rig: Rig, port: int = 8000, sid: str | None = None) -> bytes:
    return f"{port}-{sid or rig.a}.{DOMAIN}".encode()


def assert_nothing_smuggled(rig: Rig, answered: int = 1) -> None:
    """No request reached the upstream that the server did not see and answer as one of its own:
    each carries the proxy's X-Forwarded-Host (a request hidden in another's body would not), and
    there are no more of them than the client got answers."""
    seen = proxied(rig)
    assert len(seen) <= answered, [(r.method, r.target) for r in seen]
    for r in seen:
        assert any(k.lower() == b"x-forwarded-host" for k, _ in r.headers), f"smuggled: {r}"
        assert b"smuggled" not in r.body.lower() or r.body.startswith(b"0"), r
        names = [k.lower() for k, _ in r.headers]
        assert b"x-injected" not in names, r.headers
        for k, v in r.headers:
            assert b"\r" not in v and b"\n" not in v and b"\x00" not in v, (k, v)
        assert b"\r" not in r.target and b"\n" not in r.target and b" " not in r.target, r.target
    assert all(sid == rig.a for sid, _ in rig.asked), rig.asked
    assert not any("smuggled" in p for p in rig.api_calls), rig.api_calls


SMUGGLE_LINE = b"GET /smuggled HTTP/1.1\r\nHost: " + b"%b" + b"\r\n\r\n"


def smuggled(rig: Rig) -> bytes:
    return b"GET /smuggled HTTP/1.1\r\nHost: " + host(rig) + b"\r\n\r\n"


# ---------------------------------------------------------------------------------- framing


@pytest.mark.parametrize("headers", [
    b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",              # CL.TE
    b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",              # TE.CL
    b"Content-Length: 4\r\nContent-Length: 60\r\n",                      # two lengths
    b"Content-Length: 4, 60\r\n",
    b"Transfer-Encoding: xchunked\r\nContent-Length: 4\r\n",
    b"Transfer-Encoding : chunked\r\nContent-Length: 4\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\nContent-Length: 4\r\n",
    b"Transfer-Encoding: identity, chunked\r\nContent-Length: 4\r\n",
    b"Transfer-Encoding:\tchunked\r\nContent-Length: 4\r\n",
    b"X-Fold: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",  # obs-fold
    b"Content-Length: +4\r\n",
    b"Content-Length: 0x4\r\n",
], ids=lambda h: h.decode().replace("\r\n", " | ")[:60])
@pytest.mark.parametrize("form", ["host", "headers", "path"])
def test_conflicting_framing_smuggles_nothing(clean: Rig, headers: bytes, form: str) -> None:
    rig = clean
    target, route = _route(rig, form)
    body = b"0\r\n\r\n" + smuggled(rig)
    payload = (b"POST " + target + b" HTTP/1.1\r\n" + route + headers + b"\r\n" + body)
    reply = raw_exchange(rig, payload)
    codes = statuses(reply)
    assert codes, reply
    assert all(c in (200, 400, 411, 413, 501) for c in codes), reply
    # The bytes after the body are, at most, a next request the server itself parsed and answered.
    assert_nothing_smuggled(rig, answered=len(codes))


def _route(rig: Rig, form: str) -> tuple[bytes, bytes]:
    if form == "host":
        return b"/echo", b"Host: " + host(rig) + b"\r\n"
    if form == "headers":
        return b"/echo", (b"Host: 127.0.0.1\r\nE2b-Sandbox-Id: " + rig.a.encode() + b"\r\nE2b-Sandbox-Port: 8000\r\n")
    return f"/sandboxes/{rig.a}/ports/8000/echo".encode(), b"Host: 127.0.0.1\r\n"


def test_chunked_body_is_forwarded_with_its_own_framing(clean: Rig) -> None:
    """A chunked upload reaches the upstream as one request whose body is the client's data, not
    the client's Content-Length (which a chunked request must not have)."""
    rig = clean
    body = b"5\r\nhello\r\n0\r\n\r\n"
    reply = raw_exchange(rig, b"POST /echo HTTP/1.1\r\nHost: " + host(rig) +
                         b"\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert statuses(reply) == [200], reply
    [seen] = proxied(rig)
    assert seen.body == b"hello"
    assert not any(k.lower() == b"content-length" for k, _ in seen.headers)


def test_pipelined_requests_stay_separate(clean: Rig) -> None:
    rig = clean
    one = b"GET /first HTTP/1.1\r\nHost: " + host(rig) + b"\r\n\r\n"
    two = b"GET /second HTTP/1.1\r\nHost: " + host(rig) + b"\r\nConnection: close\r\n\r\n"
    reply = raw_exchange(rig, one + two)
    assert statuses(reply) == [200, 200], reply
    assert [r.target for r in proxied(rig)] == [b"/first", b"/second"]


# ---------------------------------------------------------------------------------- injection


# (A bare LF ends a header line for the server as for the upstream: "a\nX-Injected: 1" is two headers
# the client sent, the same on both sides, not an injection; h11 parses it so.)
@pytest.mark.parametrize("line", [
    b"X-Value: a\rX-Injected: 1\r\n",
    b"X-Value: a\x00X-Injected: 1\r\n",
    b"X-Value: a\r\n\tX-Injected: 1\r\n",           # obs-fold of an injected-looking header
    b"X-Value\r\n: X-Injected: 1\r\n",
    b"X-Value : a\r\nX-Injected\t: 1\r\n",
], ids=["CR", "NUL", "fold", "empty-name", "space-before-colon"])
def test_crlf_in_header_values_injects_nothing(clean: Rig, line: bytes) -> None:
    rig = clean
    reply = raw_exchange(rig, b"GET /headers HTTP/1.1\r\nHost: " + host(rig) + b"\r\n" + line + b"\r\n")
    assert statuses(reply), reply
    assert_nothing_smuggled(rig)


@pytest.mark.parametrize("target", [
    b"/x%0d%0aX-Injected:%201",
    b"/x%0D%0A%0D%0AGET%20/smuggled%20HTTP/1.1",
    b"/x?q=%0d%0aX-Injected:%201",
    b"/x?q=1%0d%0a%0d%0aGET%20/smuggled%20HTTP/1.1%0d%0a",
    b"/x\rX-Injected: 1",
    b"/x\nX-Injected: 1",
])
@pytest.mark.parametrize("form", ["host", "path"])
def test_crlf_in_the_path_or_query_stays_encoded(clean: Rig, target: bytes, form: str) -> None:
    rig = clean
    if form == "path":
        target = f"/sandboxes/{rig.a}/ports/8000".encode() + target
        route = b"Host: 127.0.0.1\r\n"
    else:
        route = b"Host: " + host(rig) + b"\r\n"
    reply = raw_exchange(rig, b"GET " + target + b" HTTP/1.1\r\n" + route + b"\r\n")
    assert statuses(reply), reply
    assert_nothing_smuggled(rig)
    for r in proxied(rig):  # what did arrive keeps its escapes
        assert b"%0" in r.target.lower(), r.target


# ---------------------------------------------------------------------------------- where it goes


@pytest.mark.parametrize("make", [
    lambda r: b"GET http://" + host(r, sid=r.b) + b"/smuggled HTTP/1.1\r\nHost: " + host(r) + b"\r\n\r\n",
    lambda r: b"GET http://127.0.0.1/smuggled HTTP/1.1\r\nHost: " + host(r) + b"\r\n\r\n",
    lambda r: b"GET http://" + host(r, sid=r.b) + b"/ HTTP/1.1\r\nHost: " + host(r) + b"\r\n\r\n",
    lambda r: b"GET //" + host(r, sid=r.b) + b"/ HTTP/1.1\r\nHost: " + host(r) + b"\r\n\r\n",
], ids=["absolute-form-other-sandbox", "absolute-form-api", "absolute-form-root", "network-path"])
def test_absolute_form_targets_reach_only_the_hosts_sandbox(clean: Rig, make) -> None:  # type: ignore[no-untyped-def]
    rig = clean
    reply = raw_exchange(rig, make(rig))
    assert statuses(reply), reply
    assert all(sid == rig.a for sid, _ in rig.asked), rig.asked
    for r in proxied(rig):  # origin-form upstream (a "//..." path is one too)
        assert r.target.startswith(b"/"), r.target
    assert not rig.api_calls, rig.api_calls


@pytest.mark.parametrize("make", [
    lambda r: b"Host: " + host(r) + b"\r\nHost: " + host(r, sid=r.b) + b"\r\n",
    lambda r: b"Host: " + host(r, sid=r.b) + b"\r\nHost: " + host(r) + b"\r\n",
    lambda r: b"Host: " + host(r) + b", " + host(r, sid=r.b) + b"\r\n",
    lambda r: b"Host: " + host(r) + b"@" + host(r, sid=r.b) + b"\r\n",
    lambda r: b"Host: " + host(r, sid=r.b) + b"." + b"\r\n",
    lambda r: b"Host: " + host(r).upper() + b"\r\nE2b-Sandbox-Id: \r\n",
    lambda r: b"Host: 127.0.0.1\r\nE2b-Sandbox-Id: " + r.b.encode() + b"\x00\r\nE2b-Sandbox-Port: 8000\r\n",
    lambda r: b"Host: 127.0.0.1\r\nE2b-Sandbox-Id: " + r.a.encode() + b"\r\nE2b-Sandbox-Port: \xb2\r\n",
    lambda r: b"Host: 127.0.0.1\r\nE2b-Sandbox-Id: " + r.a.encode() + b"\r\nE2b-Sandbox-Port: 8000\xb9\r\n",
    lambda r: b"Host: 127.0.0.1\r\nE2b-Sandbox-Id: ../" + r.b.encode() + b"\r\nE2b-Sandbox-Port: 8000\r\n",
    lambda r: b"Host: 127.0.0.1\r\nE2b-Sandbox-Id: " + r.a.encode() + b"/../" + r.b.encode() +
    b"\r\nE2b-Sandbox-Port: 8000\r\n",
], ids=["two-hosts", "two-hosts-reversed", "host-list", "host-userinfo", "trailing-dot", "empty-id-header",
        "nul-in-id", "superscript-port", "port-with-superscript", "dotdot-id", "id-path"])
def test_host_games_never_reach_the_other_sandbox(clean: Rig, make) -> None:  # type: ignore[no-untyped-def]
    rig = clean
    reply = raw_exchange(rig, b"GET /who HTTP/1.1\r\n" + make(rig) + b"Connection: close\r\n\r\n")
    codes = statuses(reply)
    assert codes and all(c < 500 or c == 502 for c in codes), reply
    reached = {sid for sid, _ in rig.asked}
    assert rig.b not in reached, (rig.asked, reply)
    assert reached <= {rig.a}, rig.asked


@pytest.mark.parametrize("path", [
    "/sandboxes/{a}/ports/8000/../../{b}/ports/8000/smuggled",
    "/sandboxes/{a}/ports/8000/%2e%2e/%2e%2e/{b}/ports/8000/smuggled",
    "/sandboxes/{a}/ports/8000/..%2f..%2f{b}%2fports%2f8000%2fsmuggled",
    "/sandboxes/{a}/ports/8000/%2E%2E%2F%2E%2E%2F%2E%2E%2Fsandboxes",
    "/sandboxes/{a}/ports/8000/../../../sandboxes",
])
def test_dot_segments_stay_inside_the_sandbox_port(clean: Rig, path: str) -> None:
    rig = clean
    target = path.format(a=rig.a, b=rig.b).encode()
    reply = raw_exchange(rig, b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert statuses(reply), reply
    assert rig.asked == [(rig.a, 8000)] or rig.asked == [], rig.asked
    assert not rig.api_calls, rig.api_calls


def test_dot_segments_outside_the_prefix_do_not_reach_a_sandbox(clean: Rig) -> None:
    """``/sandboxes/../sandboxes/B/ports/...`` is not the path form: the API answers it (404), no sandbox."""
    rig = clean
    for target in (f"/sandboxes/../sandboxes/{rig.b}/ports/8000/x", f"/x/../sandboxes/{rig.b}/ports/8000/x",
                   f"/sandboxes/%2e%2e/sandboxes/{rig.b}/ports/8000/x", f"/sandboxes/{rig.b}%2fports/8000/x"):
        reply = raw_exchange(rig, b"GET " + target.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                             settle_s=0)
        assert statuses(reply) and statuses(reply)[0] in (400, 404, 405), (target, reply)
    assert rig.asked == [] and proxied(rig) == []


# ---------------------------------------------------------------------------------- hop-by-hop and size


def test_hop_by_hop_and_connection_listed_headers(clean: Rig) -> None:
    """Hop-by-hop headers and the ones the client's ``Connection`` names stay with the proxy; the
    proxy's own ``X-Forwarded-*`` cannot be removed by naming them, nor spoofed by sending them."""
    rig = clean
    reply = raw_exchange(rig, b"GET /headers HTTP/1.1\r\nHost: " + host(rig) + b"\r\n"
                         b"Connection: keep-alive, X-Drop-Me, X-Forwarded-For, X-Forwarded-Host, Host\r\n"
                         b"X-Drop-Me: 1\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil.test\r\n"
                         b"Forwarded: for=6.6.6.6;host=evil.test\r\nX-Keep: 1\r\n"
                         b"Keep-Alive: timeout=999\r\nTE: trailers\r\nTrailer: X-Late\r\nUpgrade: h2c\r\n"
                         b"Proxy-Authorization: Basic eDp5\r\nE2b-Traffic-Access-Token: t\r\n\r\n")
    assert statuses(reply)[:1] == [200], reply
    [seen] = proxied(rig)
    headers: dict[bytes, list[bytes]] = {}
    for k, v in seen.headers:
        headers.setdefault(k.lower(), []).append(v)
    for name in (b"x-drop-me", b"keep-alive", b"te", b"trailer", b"upgrade", b"proxy-authorization",
                 b"e2b-traffic-access-token", b"forwarded"):
        assert name not in headers, (name, seen.headers)
    assert headers.get(b"x-forwarded-for") == [b"127.0.0.1"], seen.headers
    assert headers.get(b"x-forwarded-host") == [host(rig)], seen.headers
    assert headers.get(b"x-keep") == [b"1"]
    assert len(headers.get(b"host", [])) == 1


@pytest.mark.parametrize("size", [70_000, 1_000_000])
def test_oversize_headers_are_refused_before_the_upstream(clean: Rig, size: int) -> None:
    rig = clean
    reply = raw_exchange(rig, b"GET /headers HTTP/1.1\r\nHost: " + host(rig) + b"\r\nX-Big: " + b"a" * size +
                         b"\r\n\r\n")
    assert statuses(reply) in ([], [400], [431]), reply[:200]
    assert proxied(rig) == [] and rig.asked == []
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(5000))
    reply = raw_exchange(rig, b"GET /headers HTTP/1.1\r\nHost: " + host(rig) + b"\r\n" + many + b"\r\n")
    assert statuses(reply) in ([], [400], [431]), reply[:200]
    assert proxied(rig) == []


def test_the_server_still_answers_after_the_abuse(rig: Rig) -> None:
    r = httpx.get(f"{rig.url}/headers", headers={"Host": host(rig).decode()}, timeout=5)
    assert r.status_code == 200 and r.content == b"ok"
    assert httpx.get(f"{rig.url}/health", timeout=5).status_code in (200, 204)
