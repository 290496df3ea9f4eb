"""A sandbox's server that drops a kept-alive connection just as the proxy sends a request down it
(Node closes connections idle for 5 s; under TCG its timer fires while the request is on the way):
an idempotent request is sent once more on a new connection and the client gets its answer, not a
502; a POST is not sent twice. Measured before the fix: code-server's xterm.js failed with a 502 in
about 1 of 4 page loads and the IDE's terminal never opened.

The upstream is a raw socket server: it answers the first request on each connection and keeps the
connection alive, then resets it (SO_LINGER 0) when the next request arrives, without answering
(or, as a server that breaks every connection, resets under the first). Over real sockets, no VMs."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from trenvx.server.app import create_app

from .raw_upstream import RawUpstream
from .server_fakes import ThreadedServer, fake_manager, make_config, make_template

PORT_IN_GUEST = 8080


class ResetOnSecondRequest(RawUpstream):
    """Answers the first request on a connection (``HTTP/1.1 200``, keep-alive), resets on the second
    (``answer_first=False``: resets under the first)."""

    def __init__(self) -> None:
        self.answer_first = True
        self.requests: list[str] = []  # request lines, in arrival order, answered or not
        self.bodies: list[bytes] = []
        self.resets = 0
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        served = 0
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    buf += conn.recv(65536)
                body, buf = buf[:length], buf[length:]
                with self.lock:
                    self.requests.append(head.split(b"\r\n", 1)[0].decode())
                    self.bodies.append(body)
                if served or not self.answer_first:  # the kept-alive connection is dropped under this request: a reset, no answer
                    with self.lock:
                        self.resets += 1
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                served += 1
                body = b"answered"
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: keep-alive\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


@pytest.fixture()
def upstream() -> Iterator[ResetOnSecondRequest]:
    s = ResetOnSecondRequest()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture()
def proxied(tmp_path, upstream: ResetOnSecondRequest) -> Iterator[Any]:
    make_template(tmp_path, "tpl")
    cfg = make_config(tmp_path)
    m = fake_manager(cfg, upstream.port, forwards={PORT_IN_GUEST: upstream.port})
    with ThreadedServer(create_app(cfg, manager=m), lifespan="on") as s:
        url = f"http://127.0.0.1:{s.port}"
        r = httpx.post(f"{url}/sandboxes", json={"templateID": "tpl"})
        assert r.status_code == 201, r.text
        sid = r.json()["sandboxID"]
        yield httpx.Client(base_url=f"{url}/sandboxes/{sid}/ports/{PORT_IN_GUEST}", timeout=30)


def test_a_get_whose_kept_connection_is_reset_is_sent_again(proxied: httpx.Client,
                                                              upstream: ResetOnSecondRequest) -> None:
    with proxied as client:
        first = client.get("/a")
        assert first.status_code == 200 and first.text == "answered", first.text
        second = client.get("/b")  # goes down the kept connection, which the upstream resets
        assert second.status_code == 200 and second.text == "answered", second.text
    assert upstream.resets == 1, upstream.requests
    assert upstream.requests == ["GET /a HTTP/1.1", "GET /b HTTP/1.1", "GET /b HTTP/1.1"]


def sent(upstream: ResetOnSecondRequest) -> list[str]:
    """The requests the proxy passed on. (The fake VM's agent listens on the upstream's port too:
    after a failed request the proxy asks it whether the port listens only on the guest's loopback,
    and its non-JSON answer means no.)"""
    return [r for r in upstream.requests if r != "POST /ports/forward HTTP/1.1"]


def test_a_put_is_sent_again_with_its_whole_body(proxied: httpx.Client, upstream: ResetOnSecondRequest) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: the most a resend keeps
    with proxied as client:
        assert client.get("/a").status_code == 200
        r = client.put("/file", content=payload)
        assert r.status_code == 200 and r.text == "answered", r.text
    assert sent(upstream) == ["GET /a HTTP/1.1", "PUT /file HTTP/1.1", "PUT /file HTTP/1.1"]
    assert upstream.bodies[1] == upstream.bodies[2] == payload


def test_a_put_whose_body_was_not_kept_is_not_sent_again(proxied: httpx.Client,
                                                         upstream: ResetOnSecondRequest) -> None:
    with proxied as client:
        assert client.get("/a").status_code == 200
        r = client.put("/file", content=b"x" * ((1 << 20) + 1))
        assert r.status_code == 502, r.text
    assert sent(upstream) == ["GET /a HTTP/1.1", "PUT /file HTTP/1.1"]


def test_a_post_is_not_sent_twice(proxied: httpx.Client, upstream: ResetOnSecondRequest) -> None:
    with proxied as client:
        assert client.get("/a").status_code == 200
        r = client.post("/order", content=b"one pizza")
        assert r.status_code == 502, r.text
        assert "closed before an answer on port 8080" in r.json()["message"], r.text
    assert sent(upstream) == ["GET /a HTTP/1.1", "POST /order HTTP/1.1"]


def test_a_new_connection_that_breaks_is_not_sent_again(proxied: httpx.Client,
                                                        upstream: ResetOnSecondRequest) -> None:
    """Only a kept connection's break is the idle-close race; a server that breaks every
    connection gets each request once, and the 502 says nothing answered."""
    upstream.answer_first = False
    with proxied as client:
        r = client.get("/a")
        assert r.status_code == 502, r.text
        assert "nothing answered on port 8080" in r.json()["message"], r.text
    assert sent(upstream) == ["GET /a HTTP/1.1"]

