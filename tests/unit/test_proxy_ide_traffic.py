"""The proxy carries a web IDE's traffic intact and without stalls (issue 16 item 3), in the host form
(``8080-ID.<domain>``) and the path form (``/sandboxes/ID/ports/8080/``), as a browser sends it to a
private sandbox (with the cookie the token link gave it): a 20 MiB static file (checksum), a long
poll answered after 3 s while other requests go on, and 1000 websocket frames (text, binary, 1 MiB)
echoed in order. Over real sockets (uvicorn both sides), no VMs."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from trenvx.server.app import create_app
from trenvx.server.traffic_auth import COOKIE_NAME, TOKEN_PARAM

from .ide_upstream import BIG_SIZE, big_digest, ide_upstream_app
from .server_fakes import ThreadedServer, fake_manager, make_config, make_template

DOMAIN = "sbx.test"
TOKEN = "ide-traffic-token-0123456789"


@pytest.fixture(scope="module")
def upstream() -> Iterator[ThreadedServer]:
    with ThreadedServer(ide_upstream_app()) as s:
        yield s


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, upstream: ThreadedServer) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("ide")
    make_template(root, "tpl")
    cfg = make_config(root, domain=DOMAIN)
    m = fake_manager(cfg, upstream.port, forwards={8080: upstream.port})
    with ThreadedServer(create_app(cfg, manager=m), lifespan="on") as s:
        s.url = f"http://127.0.0.1:{s.port}"  # type: ignore[attr-defined]
        r = httpx.post(f"{s.url}/sandboxes", json={"templateID": "tpl"})
        assert r.status_code == 201, r.text
        s.sid = r.json()["sandboxID"]  # type: ignore[attr-defined]
        sb = m.get(s.sid)  # type: ignore[attr-defined]
        sb.allow_public_traffic, sb.traffic_access_token = False, TOKEN
        yield s


class Form:
    """How a browser reaches port 8080 of the sandbox in one URL form, after following the token link."""

    def __init__(self, server: Any, kind: str) -> None:
        self.kind = kind
        self.server = server
        sid = server.sid
        if kind == "host":
            self.host = f"8080-{sid}.{DOMAIN}:{server.port}"
            self.base = "/"
        else:
            self.host = f"127.0.0.1:{server.port}"
            self.base = f"/sandboxes/{sid}/ports/8080/"
        r = httpx.get(f"{server.url}{self.base}?{TOKEN_PARAM}={TOKEN}", headers={"Host": self.host})
        assert r.status_code == 303 and r.headers["location"] == self.base
        self.cookie = r.headers["set-cookie"].split(";", 1)[0]
        assert self.cookie.startswith(COOKIE_NAME + "=")

    def url(self, rest: str) -> str:
        return f"{self.server.url}{self.base}{rest}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Host": self.host, "Cookie": self.cookie}

    def ws(self, rest: str, **kw: Any) -> Any:
        from websockets.asyncio.client import connect

        return connect(f"ws://{self.host}{self.base}{rest}", host="127.0.0.1", port=self.server.port, proxy=None,
                       additional_headers={"Cookie": self.cookie, "Origin": f"http://{self.host}"}, **kw)


@pytest.fixture(scope="module", params=["host", "path"])
def form(request: pytest.FixtureRequest, server: Any) -> Form:
    return Form(server, request.param)


def test_a_20_mib_static_file_arrives_intact(form: Form) -> None:
    t0 = time.monotonic()
    with httpx.Client(timeout=60) as c:
        r = c.get(form.url("big.bin"), headers=form.headers)
        assert r.status_code == 200
        assert int(r.headers["content-length"]) == BIG_SIZE
        assert len(r.content) == BIG_SIZE and hashlib.sha256(r.content).hexdigest() == big_digest()
        # streamed, twice in a row on one kept-alive connection, and a HEAD
        digest = hashlib.sha256()
        with c.stream("GET", form.url("big.bin"), headers=form.headers) as s:
            for chunk in s.iter_raw():
                digest.update(chunk)
        assert digest.hexdigest() == big_digest()
        head = c.head(form.url("big.bin"), headers=form.headers)
        assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) == BIG_SIZE
    assert time.monotonic() - t0 < 30


async def test_a_long_poll_answered_after_3_s_stalls_nothing(form: Form) -> None:
    async with httpx.AsyncClient(timeout=30) as c:
        t0 = time.monotonic()
        poll = asyncio.ensure_future(c.get(form.url("poll?after=3"), headers=form.headers))
        await asyncio.sleep(0.3)
        # meanwhile the page goes on: other requests are answered at once
        for i in range(5):
            t1 = time.monotonic()
            r = await c.get(form.url(f"static/app.js?i={i}"), headers=form.headers)
            assert r.status_code == 200 and r.json()["query"] == f"i={i}"
            assert time.monotonic() - t1 < 1.0
        assert not poll.done()
        r = await poll
        elapsed = time.monotonic() - t0
    assert r.status_code == 200 and r.text == "event: late"
    assert 3.0 <= elapsed < 6.0, elapsed


def _frames() -> list[str | bytes]:
    """1000 frames: text and binary, small and empty, ten of 1 MiB, every byte value."""
    out: list[str | bytes] = []
    for i in range(1000):
        if i % 100 == 50:
            out.append(bytes((i + j) % 256 for j in range(256)) * 4096)  # 1 MiB
        elif i % 3 == 0:
            out.append(f"text frame {i} ✓ " + "x" * (i % 97))
        elif i % 3 == 1:
            out.append(bytes(range(256))[i % 256:] + i.to_bytes(4, "big"))
        else:
            out.append(b"" if i % 50 == 2 else f"{i}".encode() * (i % 13 + 1))
    return out


async def test_1000_websocket_frames_echo_in_order(form: Form) -> None:
    frames = _frames()
    assert sum(1 for f in frames if len(f) == 1 << 20) == 10
    async with form.ws("ws", max_size=None, open_timeout=10) as ws:
        async def sender() -> None:
            for f in frames:
                await ws.send(f)

        sending = asyncio.ensure_future(sender())
        received = []
        for _ in frames:
            received.append(await asyncio.wait_for(ws.recv(), 20))
        await sending
    for i, (sent, got) in enumerate(zip(frames, received)):
        assert type(got) is type(sent) and got == sent, f"frame {i} differs"


async def test_the_websocket_reaches_the_ide_as_its_origin_check_wants(form: Form) -> None:
    import json

    async with form.ws("ws-report") as ws:
        seen = json.loads(await ws.recv())
    assert seen["path"] == "/ws-report"
    assert seen["headers"]["origin"] == f"http://{form.host}"
    assert seen["headers"]["x-forwarded-host"] == form.host  # what code-server compares the Origin with
    assert "cookie" not in seen["headers"]
