"""The ssh routes of the server (trenvx.server.routes_ssh, .tcp_tunnel) and the ProxyCommand's relay
(trenvx.cli.ssh_proxy) against the real app with fake sandboxes: no VMs.

Each fake sandbox's "port 22" is a TCP server on the host that greets with the sandbox's own name
(as sshd greets with its banner), echoes, and says ``bye`` when the client's side ends. So:

- bytes go both ways in order (megabytes, under flow control), and the client's end of input is
  a half-close: the answer still arrives after it;
- the tunnel of sandbox A reaches A's port 22 and nothing else: not B's, not another port, not a host
  address, whatever the request adds (query, headers);
- refusals: a missing or wrong API key (401), a caller from elsewhere on a keyless server (403),
  a malformed or unknown id (400, 404), a sandbox on Firecracker (no network device: 502), a port
  where nothing listens (502); the POST names a bad public key (400), a sandbox whose port 22 the
  host cannot reach (409) and an agent that cannot run the setup (502);
- a tunnel whose sandbox is killed ends with the reason.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from trenvx.cli import ssh_proxy
from trenvx.server.app import create_app

from .raw_upstream import RawUpstream
from .server_fakes import ThreadedServer, UpstreamState, fake_manager, make_config, make_template, upstream_app


class PortServer(RawUpstream):
    """Stands in for sshd on a sandbox's port 22: greets with ``hello from NAME``, echoes, and on the
    client's EOF says ``bye from NAME`` and closes."""

    def __init__(self, name: str) -> None:
        self.name = name.encode()
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(b"hello from " + self.name + b"\n")
                while data := conn.recv(65536):
                    conn.sendall(data)
                conn.sendall(b"bye from " + self.name + b"\n")
            except OSError:
                pass



def fake_key() -> str:
    blob = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + b"\x07" * 32
    return "ssh-ed25519 " + base64.b64encode(blob).decode() + " me@host"


@pytest.fixture(scope="module")
def ports() -> Iterator[dict[str, PortServer]]:
    servers = {name: PortServer(name) for name in ("A", "B")}
    yield servers
    for s in servers.values():
        s.close()


def _serve(tmp: Path, api_key: str = "", vmm: str = "qemu") -> Any:
    make_template(tmp, "tpl")
    cfg = make_config(tmp, api_key=api_key)
    upstream = ThreadedServer(upstream_app(UpstreamState())).__enter__()
    m = fake_manager(cfg, upstream.port, vmm=vmm)
    server = ThreadedServer(create_app(cfg, manager=m), lifespan="on").__enter__()
    server.url = f"http://127.0.0.1:{server.port}"
    server.ws = f"ws://127.0.0.1:{server.port}"
    server.manager = m
    server.key = api_key
    server.upstream = upstream
    return server


def _create(server: Any, port22: int | None = None) -> str:
    headers = {"X-API-Key": server.key} if server.key else {}
    r = httpx.post(f"{server.url}/sandboxes", json={"templateID": "tpl"}, headers=headers, timeout=30)
    assert r.status_code == 201, r.text
    sid = r.json()["sandboxID"]
    if port22 is not None:  # this sandbox's port 22 (its own VM's forwards, not the shared default)
        server.manager.get(sid).restored.vm.forwards = {22: port22}
    return sid


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, ports: dict[str, PortServer]) -> Iterator[Any]:
    s = _serve(tmp_path_factory.mktemp("ssh"), api_key="ssh-key")
    s.a = _create(s, ports["A"].port)
    s.b = _create(s, ports["B"].port)
    yield s
    s.__exit__(None, None, None)
    s.upstream.__exit__(None, None, None)


def _open(server: Any, path: str, key: str | None = "same", **kw: Any) -> Any:
    headers = {"X-API-Key": server.key if key == "same" else key} if key else {}
    return connect(server.ws + path, additional_headers=headers, max_size=None, compression=None,
                   ping_interval=None, open_timeout=10, **kw)


def _refused(server: Any, path: str, key: str | None = "same") -> tuple[int, dict[str, Any]]:
    with pytest.raises(InvalidStatus) as e:
        _open(server, path, key)
    return e.value.response.status_code, json.loads(e.value.response.body)


def _collect(ws: Any, until: bytes, timeout: float = 10) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while until not in got:
        got += ws.recv(timeout=max(0.01, deadline - time.monotonic()))
    return got


# -- the relay ------------------------------------------------------------------------------------


def test_bytes_go_both_ways_and_the_clients_eof_is_a_half_close(server: Any) -> None:
    with _open(server, f"/sandboxes/{server.a}/ssh/tunnel") as ws:
        assert _collect(ws, b"\n") == b"hello from A\n"
        ws.send(b"ping\n")
        assert _collect(ws, b"ping\n") == b"ping\n"
        ws.send("eof")  # no more input: the port still answers, then closes
        assert _collect(ws, b"bye from A\n") == b"bye from A\n"
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 1000


def test_the_proxy_commands_relay_carries_megabytes_in_order(server: Any) -> None:
    """trenvx.cli.ssh_proxy.relay on pipes, as ssh runs it: stdin -> port 22 -> stdout."""
    payload = os.urandom(3 << 20)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    result: dict[str, int] = {}

    def run() -> None:
        result["code"] = ssh_proxy.relay(server.url, server.key, server.a, stdin_fd=in_r, stdout_fd=out_w)
        os.close(out_w)

    def feed() -> None:
        with os.fdopen(in_w, "wb") as f:
            for i in range(0, len(payload), 100_000):
                f.write(payload[i:i + 100_000])

    threads = [threading.Thread(target=run, daemon=True), threading.Thread(target=feed, daemon=True)]
    for t in threads:
        t.start()
    got = bytearray()
    with os.fdopen(out_r, "rb") as f:
        while chunk := f.read(65536):
            got += chunk
    for t in threads:
        t.join(30)
    os.close(in_r)
    assert result == {"code": 0}
    assert bytes(got) == b"hello from A\n" + payload + b"bye from A\n"


def test_a_tunnel_reaches_its_own_sandbox_only(server: Any, ports: dict[str, PortServer]) -> None:
    """Nothing in the request chooses where the tunnel goes but the id in its path: not a query, not
    the proxy's headers, not a Host naming another sandbox's port."""
    tricks = [
        f"/sandboxes/{server.a}/ssh/tunnel?sandboxID={server.b}&port=8080&host=127.0.0.1",
        f"/sandboxes/{server.a}/ssh/tunnel?port={ports['B'].port}",
    ]
    for path in tricks:
        with _open(server, path) as ws:
            assert _collect(ws, b"\n") == b"hello from A\n", path
    with _open(server, f"/sandboxes/{server.b}/ssh/tunnel") as ws:
        assert _collect(ws, b"\n") == b"hello from B\n"
    # the only port any tunnel asked for was 22
    for sid in (server.a, server.b):
        assert set(server.manager.get(sid).ports) <= {22}


@pytest.mark.parametrize("path", [
    "/sandboxes/../ssh/tunnel", "/sandboxes/127.0.0.1/ssh/tunnel", "/sandboxes/A%2F..%2F22/ssh/tunnel",
    "/sandboxes/localhost:22/ssh/tunnel",
])
def test_a_host_address_in_place_of_an_id_is_refused(server: Any, path: str) -> None:
    with pytest.raises((InvalidStatus, OSError, ConnectionClosed)) as e:
        _open(server, path)
    if isinstance(e.value, InvalidStatus):
        assert e.value.response.status_code in (400, 403, 404)


def test_refusals_say_why(server: Any) -> None:
    assert _refused(server, f"/sandboxes/{server.a}/ssh/tunnel", key=None) == (
        401, {"code": 401, "message": "missing X-API-Key header: this server requires an API key"})
    assert _refused(server, f"/sandboxes/{server.a}/ssh/tunnel", key="wrong")[0] == 401
    status, body = _refused(server, "/sandboxes/nosuchsandboxxxxxxxxx/ssh/tunnel")
    assert status == 404 and "does not exist" in body["message"]
    status, body = _refused(server, "/sandboxes/Not_An-Id!/ssh/tunnel")
    assert status == 404 and "is not a sandbox id" in body["message"]


def test_nothing_listening_on_port_22_is_a_502_naming_the_setup(server: Any) -> None:
    sid = _create(server, port22=1)  # nothing listens on port 1
    status, body = _refused(server, f"/sandboxes/{sid}/ssh/tunnel")
    assert status == 502 and "nothing answers on port 22" in body["message"] and "/ssh" in body["message"]
    httpx.delete(f"{server.url}/sandboxes/{sid}", headers={"X-API-Key": server.key})


def test_a_killed_sandbox_ends_its_tunnel_with_the_reason(server: Any, ports: dict[str, PortServer]) -> None:
    sid = _create(server, ports["A"].port)
    with _open(server, f"/sandboxes/{sid}/ssh/tunnel") as ws:
        _collect(ws, b"\n")
        assert httpx.delete(f"{server.url}/sandboxes/{sid}", headers={"X-API-Key": server.key}).status_code == 204
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=10)
        assert ws.close_code == 1011 and "killed" in (ws.close_reason or "")


def test_an_unknown_text_message_closes_the_tunnel(server: Any) -> None:
    with _open(server, f"/sandboxes/{server.a}/ssh/tunnel") as ws:
        _collect(ws, b"\n")
        ws.send("not-eof")
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=10)
        assert ws.close_code == 1003


# -- the POST that starts sshd ------------------------------------------------------------------


def test_the_post_checks_keys_and_ids_before_touching_the_sandbox(server: Any) -> None:
    h = {"X-API-Key": server.key}
    r = httpx.post(f"{server.url}/sandboxes/{server.a}/ssh", json={"publicKeys": ["-----BEGIN OPENSSH PRIVATE KEY-----"]},
                   headers=h)
    assert r.status_code == 400 and "publicKeys[0]" in r.json()["message"] and "private key" in r.json()["message"]
    r = httpx.post(f"{server.url}/sandboxes/{server.a}/ssh", json={"publicKeys": []}, headers=h)
    assert r.status_code == 400
    r = httpx.post(f"{server.url}/sandboxes/{server.a}/ssh", json={"publicKeys": [fake_key()]})
    assert r.status_code == 401
    r = httpx.post(f"{server.url}/sandboxes/nosuchsandboxxxxxxxxx/ssh", json={"publicKeys": [fake_key()]}, headers=h)
    assert r.status_code == 404


def test_an_agent_that_cannot_run_the_setup_is_a_502(server: Any) -> None:
    """The fake sandboxes' agent has no process API: the setup cannot run, and the answer says so."""
    r = httpx.post(f"{server.url}/sandboxes/{server.a}/ssh", json={"publicKeys": [fake_key()]},
                   headers={"X-API-Key": server.key}, timeout=30)
    assert r.status_code == 502 and "could not run the sshd setup" in r.json()["message"]


def test_the_proxy_command_reports_the_backends_refusal(server: Any, tmp_path: Path, capsys: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pub = tmp_path / "id.pub"
    pub.write_text(fake_key())
    monkeypatch.setenv("TRENVX_API_KEY", server.key)
    assert ssh_proxy.main(["--ip", "127.0.0.1", "--port", str(server.port), "--public-key", str(pub),
                           "nosuchsandboxxxxxxxx"]) == 1
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.delenv("TRENVX_API_KEY")
    assert ssh_proxy.main(["--port", str(server.port), "--public-key", str(pub), server.a]) == 1
    assert "missing X-API-Key" in capsys.readouterr().err
    assert ssh_proxy.main(["--port", str(server.port), "--public-key", str(pub), "Bad.Host"]) == 1
    assert "is not a sandbox id" in capsys.readouterr().err


def test_is_sandbox_answers_for_ids_of_the_backend_only(server: Any, tmp_path: Path, capsys: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRENVX_API_KEY", raising=False)
    keyfile = tmp_path / "api-key"
    keyfile.write_text(server.key + "\n")
    base = ["--port", str(server.port), "--api-key-file", str(keyfile), "--is-sandbox"]
    assert ssh_proxy.main([*base, server.a]) == 0
    assert ssh_proxy.main([*base, "zzzzzzzzzzzzzzzzzzzz"]) == 1
    assert ssh_proxy.main([*base, "example.com"]) == 1
    assert capsys.readouterr().err == ""  # names it never knew: quietly not a sandbox
    assert ssh_proxy.main(["--port", "1", "--is-sandbox", server.a]) == 1
    assert "does not answer" in capsys.readouterr().err


# -- other servers --------------------------------------------------------------------------------


def test_a_keyless_server_answers_local_callers_only(tmp_path: Path, ports: dict[str, PortServer]) -> None:
    s = _serve(tmp_path)
    try:
        sid = _create(s, ports["A"].port)
        with _open(s, f"/sandboxes/{sid}/ssh/tunnel", key=None) as ws:
            assert _collect(ws, b"\n") == b"hello from A\n"
        from types import SimpleNamespace

        from trenvx.server import routes_ssh

        remote = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(api_key="")),
                                 scope={"client": ("192.0.2.7", 5555)}, headers={})
        status, message = routes_ssh._refusal(remote)  # type: ignore[arg-type]
        assert status == 403 and "loopback" in message
    finally:
        s.__exit__(None, None, None)
        s.upstream.__exit__(None, None, None)


def test_firecracker_sandboxes_have_no_port_22_to_reach(tmp_path: Path) -> None:
    s = _serve(tmp_path, vmm="firecracker")
    try:
        sid = _create(s)
        status, body = _refused(s, f"/sandboxes/{sid}/ssh/tunnel", key=None)
        assert status == 502 and "no network device" in body["message"]
        r = httpx.post(f"{s.url}/sandboxes/{sid}/ssh", json={"publicKeys": [fake_key()]}, timeout=30)
        assert r.status_code == 409 and "no network device" in r.json()["message"]
    finally:
        with contextlib.suppress(Exception):
            s.__exit__(None, None, None)
        s.upstream.__exit__(None, None, None)
