"""Issue 3 end to end: the real server (``trenvx serve`` in a subprocess) with real VMs.

create/list/get/kill, timeout expiry, the proxy (agent calls, a web server and a websocket
server started inside a sandbox), per-sandbox access tokens, bad requests, a VMM that dies on
its own, clean stop, the data_root lock.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from trenvx.guest.client import AgentError

from .server_helpers import ServerProc, make_server, pid_running, running_server, through_proxy, vm_pid, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory, e2e_config, test_template):
    with running_server(tmp_path_factory.mktemp("server"), e2e_config, template=test_template,
                        reaper_interval_s=0.2) as srv:
        yield srv


def create(srv: ServerProc, **body) -> dict:
    with srv.client() as c:
        r = c.post("/sandboxes", json={"templateID": "base", **body})
    assert r.status_code == 201, r.text
    return r.json()


async def run(srv: ServerProc, created: dict, script: str, token: str | None = None) -> tuple[bytes, bytes, int]:
    out, err, code = b"", b"", -1
    async with through_proxy(srv.url, created, token) as c:
        async for ev in c.start(["/bin/sh", "-c", script]):
            if ev.kind == "stdout":
                out += ev.data
            elif ev.kind == "stderr":
                err += ev.data
            elif ev.kind == "end":
                code = ev.exit_code
    return out, err, code


async def test_create_list_get_kill(server: ServerProc, test_template: str) -> None:
    t0 = time.perf_counter()
    sb = create(server, metadata={"suite": "e2e"}, envVars={"GREETING": "hello"})
    created_s = time.perf_counter() - t0
    sid = sb["sandboxID"]
    assert sb["templateID"] == test_template and sb["envdAccessToken"] and sb["envdVersion"]
    assert {"load", "resume", "init"} <= set(sb["startTimes"]), sb["startTimes"]
    print(f"\ncreate over HTTP: {created_s * 1000:.0f} ms, stages (ms): {sb['startTimes']}")
    with server.client() as c:
        listed = c.get("/v2/sandboxes", params={"metadata": "suite=e2e"}).json()
        assert [s["sandboxID"] for s in listed] == [sid]
        d = c.get(f"/sandboxes/{sid}").json()
        assert d["state"] == "running" and d["memoryMB"] > 0 and d["trenvx"]["pssBytes"] > 0
        pid = d["trenvx"]["pid"]
        assert pid_running(pid)
    out, _, code = await run(server, sb, "python3 -c \"print('Hello World')\"; echo $GREETING")
    assert (out, code) == (b"Hello World\nhello\n", 0)
    with server.client() as c:
        assert c.delete(f"/sandboxes/{sid}").status_code == 204
        assert c.get(f"/sandboxes/{sid}").status_code == 404
        assert c.delete(f"/sandboxes/{sid}").status_code == 404
        assert sid not in [s["sandboxID"] for s in c.get("/sandboxes").json()]
    assert not pid_running(pid)
    assert sid not in server.sandbox_dirs()


async def test_timeout_expires_and_can_be_changed(server: ServerProc) -> None:
    extended = create(server, timeout=30)  # changed below, long before it would expire on a loaded host
    short = create(server, timeout=3)
    with server.client() as c:
        r = c.get(f"/sandboxes/{short['sandboxID']}")
        pid = r.json()["trenvx"]["pid"] if r.status_code == 200 else None  # None: expired already (a slow host)
        assert c.post(f"/sandboxes/{extended['sandboxID']}/timeout", json={"timeout": 120}).status_code == 204
        assert wait_until(lambda: c.get(f"/sandboxes/{short['sandboxID']}").status_code == 404, 10)
        msg = c.get(f"/sandboxes/{short['sandboxID']}").json()["message"]
        assert "timeout expired" in msg
        assert c.get(f"/sandboxes/{extended['sandboxID']}").status_code == 200
        assert c.post(f"/sandboxes/{extended['sandboxID']}/refreshes", json={"duration": 10}).status_code == 204
        left = c.get(f"/sandboxes/{extended['sandboxID']}").json()["trenvx"]["timeoutLeft"]
        assert 100 < left <= 120, "a refresh never shortens"
        c.delete(f"/sandboxes/{extended['sandboxID']}")
    assert wait_until(lambda: (pid is None or not pid_running(pid)) and short["sandboxID"] not in server.sandbox_dirs(), 5)


async def test_each_sandbox_token_drives_only_its_sandbox(server: ServerProc) -> None:
    a, b = create(server), create(server)
    try:
        assert (await run(server, a, "echo mine"))[0] == b"mine\n"
        with pytest.raises(AgentError) as ei:
            await run(server, b, "echo stolen", token=a["envdAccessToken"])
        assert "401" in str(ei.value) or "unauthenticated" in str(ei.value).lower()
    finally:
        with server.client() as c:
            c.delete(f"/sandboxes/{a['sandboxID']}")
            c.delete(f"/sandboxes/{b['sandboxID']}")


WS_SERVER = r'''
import base64, hashlib, socket, struct, threading
def serve(conn):
    req = b""
    while b"\r\n\r\n" not in req:
        req += conn.recv(4096)
    key = [l.split(b":", 1)[1].strip() for l in req.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key")][0]
    acc = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + acc + b"\r\n\r\n")
    f = conn.makefile("rb")
    while True:
        h = f.read(2)
        if len(h) < 2: return
        op, n = h[0] & 15, h[1] & 127
        if n == 126: n = struct.unpack(">H", f.read(2))[0]
        elif n == 127: n = struct.unpack(">Q", f.read(8))[0]
        mask = f.read(4); data = bytes(b ^ mask[i % 4] for i, b in enumerate(f.read(n)))
        if op == 8: conn.sendall(b"\x88\x00"); return
        out = b"guest:" + data
        conn.sendall(bytes([0x80 | op, len(out)]) + out)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8765)); s.listen()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
'''


async def test_proxy_reaches_web_and_websocket_servers_started_in_the_sandbox(server: ServerProc) -> None:
    sb = create(server)
    sid = sb["sandboxID"]
    try:
        ws_src = base64.b64encode(WS_SERVER.encode()).decode()
        script = (
            "mkdir -p /tmp/site && echo served-from-$(hostname) > /tmp/site/index.html && "
            "cd /tmp/site && (nohup python3 -m http.server 8000 >/dev/null 2>&1 &) && "
            f"echo {ws_src} | base64 -d > /tmp/ws.py && (nohup python3 /tmp/ws.py >/dev/null 2>&1 &) && echo ok"
        )
        assert (await run(server, sb, script))[0] == b"ok\n"
        headers = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "8000"}
        assert wait_until(lambda: httpx.get(f"{server.url}/index.html", headers=headers).status_code == 200, 30, 0.3)
        assert httpx.get(f"{server.url}/index.html", headers=headers).text == f"served-from-{sid}\n"
        by_host = httpx.get(f"{server.url}/", headers={"Host": f"8000-{sid}.localhost:{server.port}"})
        assert by_host.status_code == 200 and f"served-from-{sid}" in httpx.get(
            f"{server.url}/index.html", headers={"Host": f"8000-{sid}.localhost"}).text
        closed = httpx.get(f"{server.url}/", headers={"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "8001"})
        assert closed.status_code == 502 and "port is not open" in closed.json()["message"]

        from websockets.asyncio.client import connect

        async def ws_roundtrip() -> str:
            async with connect(f"ws://127.0.0.1:{server.port}/",
                               additional_headers={"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "8765"},
                               open_timeout=10) as ws:
                await ws.send("ping")
                return await ws.recv()

        deadline = time.time() + 30
        while True:
            try:
                assert await ws_roundtrip() == "guest:ping"
                break
            except Exception:  # noqa: BLE001 - the guest's server may still be starting
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
    finally:
        with server.client() as c:
            c.delete(f"/sandboxes/{sid}")


async def test_uploads_and_downloads_stream_through_the_proxy(server: ServerProc, tmp_path: Path) -> None:
    sb = create(server)
    data = os.urandom(20 * 2**20)
    hdrs = {"E2b-Sandbox-Id": sb["sandboxID"], "E2b-Sandbox-Port": "49983", "X-Access-Token": sb["envdAccessToken"],
            "Authorization": "Basic " + base64.b64encode(b"root:").decode()}
    try:
        with httpx.Client(base_url=server.url, headers=hdrs, timeout=120) as c:
            # /files acts as the user its username parameter names (E2B's), here root: the
            # template's default user may not write /root.
            r = c.post("/files", params={"path": "/root/big.bin", "username": "root"},
                       files={"file": ("big.bin", data, "application/octet-stream")})
            assert r.status_code == 200, r.text
            out, _, _ = await run(server, sb, "sha256sum /root/big.bin")
            assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()
            got = c.get("/files", params={"path": "/root/big.bin", "username": "root"})
            assert got.status_code == 200 and hashlib.sha256(got.content).digest() == hashlib.sha256(data).digest()
            # path games stay inside the sandbox's agent: they never reach the API or the host
            r = c.get("/files", params={"path": "/root/../../no/such/../file", "username": "root"})
            assert r.status_code == 404, r.text
            r = c.get("/../../sandboxes")
            assert r.status_code == 404 and not isinstance(r.json(), list)
    finally:
        with server.client() as c:
            c.delete(f"/sandboxes/{sb['sandboxID']}")


def test_bad_requests_get_the_right_4xx(server: ServerProc) -> None:
    with server.client() as c:
        cases = [
            (c.post("/sandboxes", json={"templateID": 42}), 400, "templateID"),
            (c.post("/sandboxes", json={"templateID": "base", "timeout": "soon"}), 400, "timeout"),
            (c.post("/sandboxes", json={"templateID": "base", "envVars": ["A=1"]}), 400, "envVars"),
            (c.post("/sandboxes", json={"templateID": "../../../etc/passwd"}), 400, "templateID"),
            (c.post("/sandboxes", json={"templateID": "no-such-template"}), 404, "templateID"),
            (c.post("/sandboxes", content=b"x" * (3 << 20), headers={"content-type": "application/json"}), 413, "larger"),
            (c.get("/sandboxes/%2E%2E%2F%2E%2E%2Fetc"), 404, "etc"),
            (c.get("/sandboxes/..%5C..%5Cetc"), 404, "does not exist"),
            (c.post("/sandboxes/nosuch/timeout", json={"timeout": 5}), 404, "nosuch"),
            (c.get("/templates/no-such-template"), 404, "does not exist"),
        ]
    for r, status, word in cases:
        assert r.status_code == status, (r.request.url, r.text)
        assert r.json()["code"] == status and word in r.json()["message"], r.text


async def test_a_vmm_that_dies_is_reported_gone_within_seconds(server: ServerProc) -> None:
    sb = create(server)
    sid = sb["sandboxID"]
    pid = vm_pid(server, sid)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with server.client() as c:
        assert wait_until(lambda: c.get(f"/sandboxes/{sid}").status_code == 404, 5)
        noticed = time.monotonic() - t0
        assert "exited on its own" in c.get(f"/sandboxes/{sid}").json()["message"]
        ended = c.get("/v2/sandboxes", params={"state": "exited"}).json()
        assert any(s["sandboxID"] == sid and s["trenvx"]["endReason"].startswith("died") for s in ended)
    assert noticed < 3, noticed
    assert wait_until(lambda: sid not in server.sandbox_dirs(), 5)
    r = httpx.get(f"{server.url}/health", headers={"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983"})
    assert r.status_code == 502 and "was not found" in r.json()["message"]


def test_a_second_server_on_the_same_data_root_refuses(server: ServerProc) -> None:
    r = subprocess.run([sys.executable, "-m", "trenvx.cli.admin", "serve", "--config", str(server.config_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "already running" in r.stderr and "data_root" in r.stderr, r.stderr


def test_stop_kills_every_sandbox_and_removes_its_files(tmp_path: Path, e2e_config, test_template) -> None:
    srv = make_server(tmp_path, e2e_config, template=test_template).start()
    try:
        ids = [create(srv)["sandboxID"] for _ in range(3)]
        pids = [vm_pid(srv, i) for i in ids]
    finally:
        rc = srv.stop(signal.SIGINT)
    assert rc == 0
    assert not any(pid_running(p) for p in pids)
    assert srv.sandbox_dirs() == []
    log = (srv.data_root / "run" / "server.log").read_text()
    srv.cleanup()
    assert all(f"sandbox {i} ended: shutdown" in log for i in ids), log[-2000:]


def test_api_key_when_configured(tmp_path: Path, e2e_config, test_template) -> None:
    with running_server(tmp_path, e2e_config, template=test_template, api_key="e2e-secret") as srv:
        assert httpx.get(f"{srv.url}/sandboxes").status_code == 401
        assert httpx.get(f"{srv.url}/sandboxes", headers={"X-API-Key": "e2e-secreT"}).status_code == 401
        assert httpx.post(f"{srv.url}/sandboxes", json={"templateID": "base"}).status_code == 401
        assert httpx.get(f"{srv.url}/health").status_code == 200
        sb = create(srv)
        with srv.client() as c:
            assert c.get("/sandboxes").status_code == 200
            assert c.delete(f"/sandboxes/{sb['sandboxID']}").status_code == 204
        spec = httpx.get(f"{srv.url}/openapi.json").json()
        assert "X-API-Key" in json.dumps(spec["components"]["securitySchemes"])
