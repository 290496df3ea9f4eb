"""``get_host(port)`` on a single machine: no wildcard DNS, no TLS (issue 13 item 12).

The server announces its sandbox domain as ``localhost:<the API's port>``, so E2B's
``sandbox.get_host(8000)`` is ``8000-<id>.localhost:<port>``: plain HTTP to the server's own
port, which proxies it by its Host. Where ``*.localhost`` resolves to loopback (curl, browsers,
systemd's nss-myhostname) that URL works as it is; elsewhere (Python's resolver without
nss-myhostname) the same host goes in a Host header to the server's address. Driven through the
unmodified ``e2b`` package and through ``sandbox_sdk``.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time

import httpx
import pytest

pytestmark = pytest.mark.e2e

e2b = pytest.importorskip("e2b")

PORT = 8000
WAIT_S = 60.0
PAGE = "hello from get_host\n"


def _serve(sbx) -> None:
    """``python3 -m http.server 8000`` in the sandbox, serving one page, as the default user."""
    sbx.files.write("/tmp/www/index.html", PAGE)
    sbx.commands.run(f"python3 -m http.server {PORT} --directory /tmp/www", background=True, timeout=0)


def _curl(url: str, *headers: str) -> tuple[int, str]:
    """curl resolves ``*.localhost`` to loopback by itself, as browsers do."""
    argv = ["curl", "-sS", "--max-time", "30", "-o", "-", "-w", "\n%{http_code}", url]
    for h in headers:
        argv += ["-H", h]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    body, _, code = done.stdout.rpartition("\n")
    return int(code or 0), body


def _until_served(get) -> tuple[int, str]:
    """Ask until the server in the sandbox listens (it takes a moment to start), bounded."""
    end = time.monotonic() + WAIT_S
    while True:
        status, text = get()
        if status == 200 or time.monotonic() > end:
            return status, text
        time.sleep(0.2)


def _resolves(name: str) -> bool:
    try:
        socket.getaddrinfo(name, 80)
    except OSError:
        return False
    return True


def test_e2b_get_host_reaches_a_port_over_plain_http(e2b_env: str, test_template: str) -> None:
    from e2b import Sandbox

    server_port = httpx.URL(e2b_env).port
    sbx = Sandbox.create(test_template, timeout=300)
    try:
        assert sbx.sandbox_domain == f"localhost:{server_port}"
        host = sbx.get_host(PORT)
        assert host == f"{PORT}-{sbx.sandbox_id}.localhost:{server_port}"
        assert Sandbox.connect(sbx.sandbox_id).get_host(PORT) == host
        _serve(sbx)

        # The documented Python form where *.localhost does not resolve: the server's address, that Host.
        def via_host_header() -> tuple[int, str]:
            r = httpx.get(f"{e2b_env}/index.html", headers={"Host": host}, timeout=30)
            return r.status_code, r.text
        assert _until_served(via_host_header) == (200, PAGE)

        # E2B's routing headers to the server's address reach the same port.
        r = httpx.get(f"{e2b_env}/index.html", timeout=30,
                      headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": str(PORT)})
        assert (r.status_code, r.text) == (200, PAGE)

        # The URL itself, as a user types it: curl (and browsers) resolve *.localhost to loopback.
        if shutil.which("curl"):
            assert _curl(f"http://{host}/index.html") == (200, PAGE)
        if _resolves(f"x-{sbx.sandbox_id}.localhost"):  # systemd's nss-myhostname, for example
            r = httpx.get(f"http://{host}/index.html", timeout=30)
            assert (r.status_code, r.text) == (200, PAGE)
    finally:
        sbx.kill()


def test_private_sandbox_refuses_a_guessed_host_without_its_token(e2b_env: str, test_template: str) -> None:
    from e2b import Sandbox

    private = Sandbox.create(test_template, timeout=300, network={"allow_public_traffic": False})
    try:
        token = private.traffic_access_token
        assert token
        _serve(private)
        host = private.get_host(PORT)

        def with_token() -> tuple[int, str]:
            r = httpx.get(f"{e2b_env}/index.html", timeout=30,
                          headers={"Host": host, "e2b-traffic-access-token": token})
            return r.status_code, r.text
        assert _until_served(with_token) == (200, PAGE)

        # Anyone who knows (or guesses) the id but not the token is refused, whichever form they use.
        r = httpx.get(f"{e2b_env}/index.html", headers={"Host": host}, timeout=30)
        assert r.status_code == 403 and "traffic access token" in r.json()["message"]
        r = httpx.get(f"{e2b_env}/index.html", timeout=30,
                      headers={"E2b-Sandbox-Id": private.sandbox_id, "E2b-Sandbox-Port": str(PORT),
                               "e2b-traffic-access-token": "guessed"})
        assert r.status_code == 403 and "invalid" in r.json()["message"]
        if shutil.which("curl"):
            assert _curl(f"http://{host}/index.html")[0] == 403
            assert _curl(f"http://{host}/index.html", f"e2b-traffic-access-token: {token}") == (200, PAGE)
        # A made-up id reaches nothing.
        r = httpx.get(f"{e2b_env}/index.html", headers={"Host": host.replace(private.sandbox_id, "nosuchsandbox0")},
                      timeout=30)
        assert r.status_code == 502 and "was not found" in r.json()["message"]
    finally:
        private.kill()


async def test_sandbox_sdk_get_host_and_get_hostname(sdk_backend: str, test_template: str) -> None:
    from sandbox_sdk.e2b import AsyncSandbox
    from sandbox_sdk.sandbox import Sandbox as TrenvxSandbox

    server_port = httpx.URL(sdk_backend).port
    sbx = await AsyncSandbox.create(test_template, timeout=300, api_url=sdk_backend)
    try:
        host = sbx.get_host(PORT)
        assert host == f"{PORT}-{sbx.sandbox_id}.localhost:{server_port}"
        await sbx.files.write("/tmp/www/index.html", PAGE)
        await sbx.commands.run(f"python3 -m http.server {PORT} --directory /tmp/www", background=True, timeout=0)
        async with httpx.AsyncClient(timeout=30) as c:
            end = time.monotonic() + WAIT_S
            while True:
                r = await c.get(f"{sdk_backend}/index.html", headers={"Host": host})
                if r.status_code == 200 or time.monotonic() > end:
                    break
                await asyncio.sleep(0.2)
        assert (r.status_code, r.text) == (200, PAGE)
        trenvx_view = await TrenvxSandbox.connect(sbx.sandbox_id, api_url=sdk_backend)
        try:
            assert trenvx_view.get_hostname(PORT) == host
        finally:
            await trenvx_view.close()
    finally:
        await sbx.kill()
        await sbx.close()
