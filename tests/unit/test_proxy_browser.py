"""A browser reaching a private sandbox's port (issue 16): the traffic token in a link, traded for a
cookie by a redirect; and the path form ``/sandboxes/ID/ports/PORT/...`` for where no wildcard DNS
exists. Over a real socket (uvicorn), against a stand-in web application; no VMs."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from trenvx.server import traffic_auth
from trenvx.server.app import create_app
from trenvx.server.port_paths import prefixed_location, prefixed_set_cookie
from trenvx.server.traffic_auth import COOKIE_NAME, TOKEN_PARAM

from .ide_upstream import ide_upstream_app
from .server_fakes import ThreadedServer, fake_manager, free_port, make_config, make_template

DOMAIN = "sbx.test"
MISSING = "Sandbox is secured with traffic access token. Token header 'e2b-traffic-access-token' is missing"
INVALID = "Sandbox is secured with traffic access token. Provided token in header 'e2b-traffic-access-token' is invalid"


@pytest.fixture(scope="module")
def upstream() -> Iterator[ThreadedServer]:
    with ThreadedServer(ide_upstream_app()) as s:
        yield s


def _new_server(root: Any, upstream_port: int, **server_kw: Any) -> Any:
    make_template(root, "tpl")
    cfg = make_config(root, domain=DOMAIN)
    m = fake_manager(cfg, upstream_port, forwards={8080: upstream_port, 8081: upstream_port})
    return cfg, m


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, upstream: ThreadedServer) -> Iterator[Any]:
    cfg, m = _new_server(tmp_path_factory.mktemp("browser"), upstream.port)
    with ThreadedServer(create_app(cfg, manager=m), lifespan="on") as s:
        s.url = f"http://127.0.0.1:{s.port}"  # type: ignore[attr-defined]
        s.manager = m  # type: ignore[attr-defined]
        yield s


def _sandbox(server: Any, token: str | None) -> str:
    r = httpx.post(f"{server.url}/sandboxes", json={"templateID": "tpl"})
    assert r.status_code == 201, r.text
    sid = r.json()["sandboxID"]
    if token is not None:
        sb = server.manager.get(sid)
        sb.allow_public_traffic, sb.traffic_access_token = False, token
    return str(sid)


@pytest.fixture(scope="module")
def private(server: Any) -> tuple[str, str]:
    return _sandbox(server, "tok-A_secret-0123456789"), "tok-A_secret-0123456789"


@pytest.fixture(scope="module")
def other(server: Any) -> tuple[str, str]:
    return _sandbox(server, "tok-B_secret-9876543210"), "tok-B_secret-9876543210"


def host(sid: str, server: Any, port: int = 8080) -> str:
    return f"{port}-{sid}.{DOMAIN}:{server.port}"


def cookie_of(r: httpx.Response) -> tuple[str, dict[str, str]]:
    """The proxy's cookie in a response: its value and its attributes (lower-case names)."""
    [raw] = [v for v in r.headers.get_list("set-cookie") if v.startswith(COOKIE_NAME + "=")]
    first, *attrs = [p.strip() for p in raw.split(";")]
    return first.split("=", 1)[1], {a.split("=", 1)[0].lower(): (a.split("=", 1)[1] if "=" in a else "") for a in attrs}


# -- the host form -----------------------------------------------------------------------------


def test_a_link_with_the_token_is_traded_for_a_cookie(server, private) -> None:
    sid, token = private
    r = httpx.get(f"{server.url}/app/page?folder=/home/user/workspace&{TOKEN_PARAM}={token}&x=1",
                  headers={"Host": host(sid, server)})
    assert r.status_code == 303
    assert r.headers["location"] == "/app/page?folder=/home/user/workspace&x=1"
    assert r.headers["cache-control"] == "no-store"
    value, attrs = cookie_of(r)
    assert attrs == {"path": "/", "httponly": "", "samesite": "Lax"}  # host-only: no Domain; plain HTTP: no Secure
    assert token not in value and value == traffic_auth.cookie_value(sid, 8080, token)
    assert token not in str(r.headers)

    after = httpx.get(f"{server.url}{r.headers['location']}",
                      headers={"Host": host(sid, server), "Cookie": f"theme=dark; {COOKIE_NAME}={value}; b=2"})
    assert after.status_code == 200, after.text
    seen = after.json()
    assert seen["path"] == "/app/page" and seen["query"] == "folder=/home/user/workspace&x=1"
    assert seen["cookies"] == {"theme": "dark", "b": "2"}  # the proxy's cookie stays out of the sandbox
    assert COOKIE_NAME not in str(seen["headers"]) and token not in str(seen["headers"])


def test_the_cookie_opens_only_its_own_sandbox_and_port(server, private, other) -> None:
    sid, token = private
    other_sid, _ = other
    mine = traffic_auth.cookie_value(sid, 8080, token)
    ok = httpx.get(f"{server.url}/x", headers={"Host": host(sid, server), "Cookie": f"{COOKIE_NAME}={mine}"})
    assert ok.status_code == 200
    for target, cookie in ((host(other_sid, server), mine),  # A's cookie at B
                           (host(sid, server, 8081), mine),  # port 8080's cookie at 8081
                           (host(sid, server), "x" + mine[1:]),
                           (host(sid, server), traffic_auth.cookie_value(sid, 8080, token + "x"))):
        r = httpx.get(f"{server.url}/x", headers={"Host": target, "Cookie": f"{COOKIE_NAME}={cookie}"})
        assert r.status_code == 403 and r.json()["message"] == INVALID, (target, cookie)


def test_a_wrong_or_missing_token_is_refused_with_e2bs_messages(server, private) -> None:
    sid, token = private
    missing = httpx.get(f"{server.url}/", headers={"Host": host(sid, server)})
    assert missing.status_code == 403 and missing.json()["message"] == MISSING
    for wrong in ("", "nope", token[:-1], token + "x", token.upper()):
        r = httpx.get(f"{server.url}/?{TOKEN_PARAM}={wrong}", headers={"Host": host(sid, server)})
        assert r.status_code == 403 and r.json()["message"] == INVALID, wrong
        assert "set-cookie" not in r.headers
    # another sandbox's token is a wrong token
    r = httpx.get(f"{server.url}/?{TOKEN_PARAM}=tok-B_secret-9876543210", headers={"Host": host(sid, server)})
    assert r.status_code == 403


def test_secure_cookie_over_https(server, private) -> None:
    """Behind a TLS-terminating proxy the server's scheme is https (uvicorn trusts X-Forwarded-Proto
    from loopback): the cookie is then Secure."""
    sid, token = private
    r = httpx.get(f"{server.url}/?{TOKEN_PARAM}={token}",
                  headers={"Host": host(sid, server), "X-Forwarded-Proto": "https"})
    assert r.status_code == 303
    assert "secure" in cookie_of(r)[1]


def test_other_methods_and_programs_pass_with_the_token_without_a_redirect(server, private) -> None:
    sid, token = private
    post = httpx.post(f"{server.url}/form?{TOKEN_PARAM}={token}", headers={"Host": host(sid, server)}, content=b"x")
    assert post.status_code == 200 and post.json()["query"] == "" and "set-cookie" not in post.headers
    e2b = httpx.get(f"{server.url}/q?a=1&{TOKEN_PARAM}={token}",
                    headers={"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "8080"})
    assert e2b.status_code == 200 and e2b.json()["query"] == "a=1"
    header = httpx.get(f"{server.url}/", headers={"Host": host(sid, server), "e2b-traffic-access-token": token})
    assert header.status_code == 200


def test_a_public_sandbox_never_sees_the_parameter_or_the_cookie(server) -> None:
    sid = _sandbox(server, None)
    r = httpx.get(f"{server.url}/p?{TOKEN_PARAM}=whatever&k=v",
                  headers={"Host": host(sid, server), "Cookie": f"{COOKIE_NAME}=abc; keep=1"})
    assert r.status_code == 200
    assert r.json()["query"] == "k=v" and r.json()["cookies"] == {"keep": "1"}


async def test_websockets_pass_with_the_cookie_or_the_token(server, private) -> None:
    from websockets.asyncio.client import connect

    sid, token = private
    cookie = f"{COOKIE_NAME}={traffic_auth.cookie_value(sid, 8080, token)}; other=1"
    uri = f"ws://{host(sid, server)}/ws-report?q=1"
    kw: dict[str, Any] = {"host": "127.0.0.1", "port": server.port, "proxy": None}
    async with connect(uri, additional_headers={"Cookie": cookie, "Origin": f"http://{host(sid, server)}"},
                       **kw) as ws:
        import json

        seen = json.loads(await ws.recv())
    assert seen["path"] == "/ws-report" and seen["query"] == "q=1"
    assert seen["headers"]["cookie"] == "other=1"
    # the web IDE's origin check: Origin against X-Forwarded-Host (its Host is the upstream's address)
    assert seen["headers"]["x-forwarded-host"] == host(sid, server)
    assert seen["headers"]["origin"] == f"http://{host(sid, server)}"
    async with connect(f"ws://{host(sid, server)}/ws-report?{TOKEN_PARAM}={token}&q=2", **kw) as ws:
        seen = json.loads(await ws.recv())
    assert seen["query"] == "q=2"
    for headers in ({}, {"Cookie": f"{COOKIE_NAME}={traffic_auth.cookie_value(sid, 8081, token)}"}):
        with pytest.raises(Exception) as ei:
            async with connect(uri, additional_headers=headers, **kw):
                pass
        assert "403" in str(ei.value)


# -- the path form -----------------------------------------------------------------------------


def test_the_path_form_redirects_to_its_slash_and_trades_the_token(server, private) -> None:
    sid, token = private
    prefix = f"/sandboxes/{sid}/ports/8080"
    r = httpx.get(f"{server.url}{prefix}?folder=/w&{TOKEN_PARAM}={token}")
    assert r.status_code == 303 and r.headers["location"] == f"{prefix}/?folder=/w"
    value, attrs = cookie_of(r)
    assert attrs["path"] == prefix and value == traffic_auth.cookie_value(sid, 8080, token)

    page = httpx.get(f"{server.url}{prefix}/?folder=/w", headers={"Cookie": f"{COOKIE_NAME}={value}"})
    assert page.status_code == 200
    seen = page.json()
    assert seen["path"] == "/" and seen["query"] == "folder=/w" and seen["cookies"] == {}
    assert seen["headers"]["x-forwarded-prefix"] == prefix
    assert seen["headers"]["x-forwarded-host"] == f"127.0.0.1:{server.port}"
    assert seen["headers"]["x-forwarded-proto"] == "http"
    deep = httpx.get(f"{server.url}{prefix}/static/a%20b.js?v=1", headers={"Cookie": f"{COOKIE_NAME}={value}"})
    assert deep.json()["path"] == "/static/a b.js" and deep.json()["query"] == "v=1"

    assert httpx.get(f"{server.url}{prefix}/").json()["message"] == MISSING
    assert httpx.get(f"{server.url}{prefix}").status_code == 403  # no redirect before the token


def test_the_path_form_of_a_public_sandbox_and_bad_ports(server) -> None:
    sid = _sandbox(server, None)
    r = httpx.get(f"{server.url}/sandboxes/{sid}/ports/8080?a=1&a=2")
    assert r.status_code == 307 and r.headers["location"] == f"/sandboxes/{sid}/ports/8080/?a=1&a=2"
    assert httpx.get(f"{server.url}/sandboxes/{sid}/ports/8080", follow_redirects=True).json()["path"] == "/"
    assert httpx.get(f"{server.url}/sandboxes/{sid}/ports/70000/").status_code == 400
    assert httpx.get(f"{server.url}/sandboxes/{sid}/ports/9999/").status_code == 502  # nothing listens
    nf = httpx.get(f"{server.url}/sandboxes/nosuchsandbox/ports/8080/")
    assert nf.status_code == 502 and "was not found" in nf.json()["message"]
    # the API's own routes under /sandboxes/{id} are untouched
    assert httpx.get(f"{server.url}/sandboxes/{sid}").json()["sandboxID"] == sid
    assert httpx.post(f"{server.url}/sandboxes/{sid}/timeout", json={"timeout": 300}).status_code == 204


def test_the_path_form_keeps_redirects_and_cookies_under_its_prefix(server) -> None:
    sid = _sandbox(server, None)
    prefix = f"/sandboxes/{sid}/ports/8080"
    r = httpx.get(f"{server.url}{prefix}/go-login")
    assert r.status_code == 302 and r.headers["location"] == f"{prefix}/login?next=%2F"
    assert httpx.get(f"{server.url}{prefix}/go-relative").headers["location"] == "./login"
    own = httpx.get(f"{server.url}{prefix}/go-own-host")
    assert own.headers["location"] == f"http://127.0.0.1:{server.port}{prefix}/abs"
    cookies = httpx.get(f"{server.url}{prefix}/set-cookies").headers.get_list("set-cookie")
    assert cookies == [f"session=s1; Path={prefix}; HttpOnly", f"deep=d1; Path={prefix}/static; SameSite=Lax",
                       "plain=p1"]  # and not the sandbox's own trenvx_traffic: the proxy's cookie is the proxy's
    by_host = httpx.get(f"{server.url}/set-cookies", headers={"Host": host(sid, server)}).headers.get_list("set-cookie")
    assert by_host == ["session=s1; Path=/; HttpOnly", "deep=d1; Path=/static; SameSite=Lax", "plain=p1"]
    # the host form leaves them as the application sent them
    assert httpx.get(f"{server.url}/go-login", headers={"Host": host(sid, server)}).headers["location"] == \
        "/login?next=%2F"


async def test_a_websocket_in_the_path_form(server, private) -> None:
    import json

    from websockets.asyncio.client import connect

    sid, token = private
    prefix = f"/sandboxes/{sid}/ports/8080"
    cookie = f"{COOKIE_NAME}={traffic_auth.cookie_value(sid, 8080, token)}"
    async with connect(f"ws://127.0.0.1:{server.port}{prefix}/ws-report?x=1", additional_headers={"Cookie": cookie},
                       proxy=None) as ws:
        seen = json.loads(await ws.recv())
    assert seen["path"] == "/ws-report" and seen["query"] == "x=1"
    assert seen["headers"]["x-forwarded-prefix"] == prefix and "cookie" not in seen["headers"]
    with pytest.raises(Exception) as ei:
        async with connect(f"ws://127.0.0.1:{server.port}{prefix}/ws-report", proxy=None):
            pass
    assert "403" in str(ei.value)


# -- never logged ------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_the_token_is_not_in_the_access_log(tmp_path, upstream, private, server) -> None:
    """A server with its access log on (``trenvx serve --access-log``) records the URL without the token."""
    cfg, m = _new_server(tmp_path, upstream.port)
    records = _Records()
    watched = [logging.getLogger(n) for n in ("uvicorn.access", "uvicorn.error", "trenvx")]
    levels = [lg.level for lg in watched]
    for lg in watched:
        lg.addHandler(records)
        lg.setLevel(logging.DEBUG)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(cfg, manager=m), host="127.0.0.1", port=port, log_config=None,
                                        log_level="debug", access_log=True, lifespan="on"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    try:
        deadline = time.time() + 10
        while not srv.started and time.time() < deadline:
            time.sleep(0.01)
        assert srv.started
        sid = httpx.post(f"http://127.0.0.1:{port}/sandboxes", json={"templateID": "tpl"}).json()["sandboxID"]
        sb = m.get(sid)
        secret = "never-log-this-token-4242"
        sb.allow_public_traffic, sb.traffic_access_token = False, secret
        r = httpx.get(f"http://127.0.0.1:{port}/sandboxes/{sid}/ports/8080/page?{TOKEN_PARAM}={secret}&z=9")
        assert r.status_code == 303
        r = httpx.get(f"http://127.0.0.1:{port}/page?{TOKEN_PARAM}={secret}", headers={"Host": f"8080-{sid}.{DOMAIN}"})
        assert r.status_code == 303
        httpx.get(f"http://127.0.0.1:{port}/page?{TOKEN_PARAM}={secret}x", headers={"Host": f"8080-{sid}.{DOMAIN}"})
    finally:
        srv.should_exit = True
        t.join(10)
        for lg, level in zip(watched, levels):
            lg.removeHandler(records)
            lg.setLevel(level)
    access = [line for line in records.lines if "/page" in line]
    assert any("z=9" in line for line in access), records.lines  # the access log did record the requests
    assert not [line for line in records.lines if secret in line or TOKEN_PARAM in line], records.lines


# -- the pieces --------------------------------------------------------------------------------


def test_token_parameter_and_cookie_handling() -> None:
    take = traffic_auth.take_token_param
    assert take(b"") == (b"", None)
    assert take(b"a=1&b=%2F") == (b"a=1&b=%2F", None)
    assert take(b"a=1&trenvx_token=t%2Bx&b=%2F") == (b"a=1&b=%2F", "t+x")
    assert take(b"trenvx_token=a&trenvx%5Ftoken=b") == (b"", "b")
    assert take(b"trenvx_tokens=a") == (b"trenvx_tokens=a", None)
    headers = [(b"host", b"h"), (b"cookie", b"a=1; trenvx_traffic=v1"), (b"cookie", b"trenvx_traffic=v2"),
               (b"cookie", b"b=2;c=3")]
    assert traffic_auth.cookies_presented(headers) == ["v1", "v2"]
    assert traffic_auth.without_cookie(headers) == [(b"host", b"h"), (b"cookie", b"a=1"), (b"cookie", b"b=2;c=3")]
    values = {traffic_auth.cookie_value(s, p, t) for s in ("a", "b") for p in (8080, 8081) for t in ("x", "y")}
    assert len(values) == 8
    v = traffic_auth.check([], None, "s", 1, "")
    assert v.refusal == MISSING
    assert traffic_auth.check([], "t", "s", 1, "").refusal == INVALID  # a private sandbox without a token: nobody
    assert traffic_auth.check([], "t", "s", 1, "t") == traffic_auth.Verdict(None, by_param=True)
    assert traffic_auth.sets_cookie(b"trenvx_traffic=x; Path=/") and traffic_auth.sets_cookie(b" trenvx_traffic = x")
    assert not traffic_auth.sets_cookie(b"trenvx_traffic2=x") and not traffic_auth.sets_cookie(b"a=trenvx_traffic")


def test_prefixing_locations_and_cookies() -> None:
    p = "/sandboxes/abc/ports/8080"
    assert prefixed_location(b"/x?y=1", p, b"h:1") == p.encode() + b"/x?y=1"
    assert prefixed_location(b"//evil.example/x", p, b"h:1") == b"//evil.example/x"
    assert prefixed_location(b"http://h:1/a", p, b"h:1") == f"http://h:1{p}/a".encode()
    assert prefixed_location(b"http://other/a", p, b"h:1") == b"http://other/a"
    assert prefixed_location(b"next", p, b"h:1") == b"next"
    # an application that honours X-Forwarded-Prefix already put it there
    assert prefixed_location(f"{p}/login".encode(), p, b"h:1") == f"{p}/login".encode()
    assert prefixed_location(f"{p}?x=1".encode(), p, b"h:1") == f"{p}?x=1".encode()
    assert prefixed_location(f"http://h:1{p}/a".encode(), p, b"h:1") == f"http://h:1{p}/a".encode()
    assert prefixed_location(f"{p}0/x".encode(), p, b"h:1") == f"{p}{p}0/x".encode()  # not under it: prefixed
    assert prefixed_set_cookie(f"a=1; Path={p}/x".encode(), p) == f"a=1; Path={p}/x".encode()
    assert prefixed_set_cookie(b"a=1; path=/; Secure", p) == f"a=1; path={p}; Secure".encode()
    assert prefixed_set_cookie(b"a=1; Path=/x", p) == f"a=1; Path={p}/x".encode()
    assert prefixed_set_cookie(b"a=1; Max-Age=5", p) == b"a=1; Max-Age=5"


# -- the API and web pages ---------------------------------------------------------------------


def test_a_keyless_server_does_not_answer_web_pages(server, private) -> None:
    """A page a sandbox serves in the path form has the API's origin: on a server without a key (which
    answers every local caller) its scripts must not reach the API, or they would read every token."""
    sid, _ = private
    page_fetch = {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty",
                  "Referer": f"{server.url}/sandboxes/{sid}/ports/8080/"}
    r = httpx.get(f"{server.url}/sandboxes/{sid}", headers=page_fetch)
    assert r.status_code == 403 and "web pages" in r.json()["message"] and "trafficAccessToken" not in r.text
    for headers in ({"Origin": f"http://8080-{sid}.{DOMAIN}:{server.port}"},  # another origin's script or form
                    {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"},
                    {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors"}):
        assert httpx.get(f"{server.url}/sandboxes", headers=headers).status_code == 403, headers
        assert httpx.post(f"{server.url}/sandboxes", json={"templateID": "tpl"}, headers=headers).status_code == 403
    # the user's own typed address, and programs, are answered
    typed = {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    assert httpx.get(f"{server.url}/sandboxes/{sid}", headers=typed).json()["sandboxID"] == sid
    assert httpx.get(f"{server.url}/sandboxes/{sid}").status_code == 200
    # the proxy itself is no API route: the page's own requests to its port pass
    own = httpx.get(f"{server.url}/sandboxes/{sid}/ports/8080/x",
                    headers={**page_fetch, "Cookie": f"{COOKIE_NAME}={traffic_auth.cookie_value(sid, 8080, private[1])}"})
    assert own.status_code == 200


async def test_a_server_with_a_key_answers_pages_that_have_it(tmp_path) -> None:
    from .server_fakes import fake_api

    async with fake_api(tmp_path, free_port(), api_key="the-key") as c:
        page = {"Origin": "http://example.test", "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}
        assert (await c.get("/sandboxes", headers=page)).status_code == 401
        assert (await c.get("/sandboxes", headers={**page, "X-API-Key": "the-key"})).status_code == 200
