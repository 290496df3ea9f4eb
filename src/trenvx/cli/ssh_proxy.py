"""The ssh ``ProxyCommand`` of trenvx sandboxes: ``python -m trenvx.cli.ssh_proxy [options] SANDBOX_ID``.

ssh runs it (see :mod:`.ssh_config`) with the sandbox id as the host name and speaks the SSH
protocol over its stdin and stdout. It

1. asks the backend to start sshd in the sandbox and let the caller's public key in
   (``POST /sandboxes/{id}/ssh``, :mod:`trenvx.server.routes_ssh`), which answers the sandbox's
   host keys;
2. pins those keys for the sandbox id in trenvx's known_hosts (``--known-hosts``), before ssh
   reads that file (it does so only after the first bytes from sshd, which come after this);
3. relays stdin and stdout to the sandbox's port 22 over the backend's websocket
   (``/sandboxes/{id}/ssh/tunnel``, :mod:`trenvx.server.tcp_tunnel`): binary messages both ways,
   the text ``eof`` when stdin ends. It exits when the sandbox's side closes.

Errors go to stderr, which ssh shows, with exit code 1. ``--is-sandbox`` is the ``Match exec``
test instead: exit 0 when the backend has a sandbox of that id, 1 otherwise (quietly for a name it
never knew, which may be an ordinary host). The backend: ``--ip``/``--port`` (default
``TRENVX_IP``/``TRENVX_PORT``, else 127.0.0.1:5000); its API key: ``TRENVX_API_KEY``, else
``--api-key-file``. Kept free of the CLI's framework: ssh starts it twice per connection.

``sandbox-cli sandbox ssh-proxy`` is the same command under the CLI.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import Any

import httpx

from ..guest.ssh_keys import InvalidPublicKey, PublicKey, parse_public_key
from .ssh_config import SANDBOX_ID_RE, SshSetupError, pin_host_keys

DEFAULT_IP = "127.0.0.1"
DEFAULT_PORT = 5000
CHUNK = 64 * 1024
EOF_MESSAGE = "eof"
"""Ends what the client sends (trenvx.server.tcp_tunnel.EOF_MESSAGE: the protocol's, written here
again so that this module needs nothing of the server)."""
PREPARE_TIMEOUT_S = 120.0
"""Starting sshd the first time (a host key to make; TCG guests are slow)."""
CHECK_TIMEOUT_S = 5.0


class ProxyError(Exception):
    """What to tell the user (on stderr) before exiting 1."""


def backend_url(ip: str, port: int) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}"


def read_api_key(path: Path | None) -> str | None:
    """``TRENVX_API_KEY``, else the first line of ``path``; None when neither has one."""
    key = os.environ.get("TRENVX_API_KEY")
    if key:
        return key
    if path is None:
        return None
    try:
        return path.read_text().strip() or None
    except OSError as e:
        raise ProxyError(f"cannot read the API key file {path}: {e.strerror or e}") from None


def _message(r: httpx.Response) -> str:
    try:
        return str(r.json().get("message") or r.text)
    except ValueError:
        return r.text.strip() or f"HTTP {r.status_code}"


def is_sandbox(url: str, api_key: str | None, name: str) -> bool:
    """Whether the backend has a sandbox (running or paused) whose id is ``name``."""
    if not SANDBOX_ID_RE.match(name):
        return False
    headers = {"X-API-Key": api_key} if api_key else {}
    try:
        r = httpx.get(f"{url}/sandboxes/{name}", headers=headers, timeout=CHECK_TIMEOUT_S)
    except httpx.HTTPError as e:
        print(f"trenvx: the backend at {url} does not answer ({type(e).__name__}); ssh takes {name} for a host name",
              file=sys.stderr)
        return False
    if r.status_code == 200:
        return True
    message = _message(r)
    if r.status_code != 404 or "anymore" in message:  # an ended sandbox, a refused key: worth saying
        print(f"trenvx: {message} (HTTP {r.status_code}); ssh takes {name} for a host name", file=sys.stderr)
    return False


def prepare(url: str, api_key: str | None, sandbox_id: str, key: PublicKey) -> list[PublicKey]:
    """Have the backend start sshd in the sandbox and let ``key`` in; the sandbox's host keys."""
    headers = {"X-API-Key": api_key} if api_key else {}
    try:
        r = httpx.post(f"{url}/sandboxes/{sandbox_id}/ssh", json={"publicKeys": [key.line()]}, headers=headers,
                       timeout=httpx.Timeout(PREPARE_TIMEOUT_S, connect=5.0))
    except httpx.ConnectError:
        raise ProxyError(f"cannot reach the trenvx backend at {url}; start it with `scripts/start.sh run`, or "
                         "give --ip/--port (sandbox-cli ssh-config --ip ... --port ...)") from None
    except httpx.HTTPError as e:
        raise ProxyError(f"starting sshd in sandbox {sandbox_id} failed: {type(e).__name__}: {e}") from None
    if r.status_code != 200:
        raise ProxyError(f"{_message(r)} (HTTP {r.status_code})")
    try:
        return [parse_public_key(k) for k in r.json()["hostKeys"]]
    except (ValueError, KeyError, TypeError, InvalidPublicKey) as e:
        raise ProxyError(f"the backend's answer names no valid host key for sandbox {sandbox_id}: {e}") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def relay(url: str, api_key: str | None, sandbox_id: str, stdin_fd: int = 0, stdout_fd: int = 1) -> int:
    """Relay ``stdin_fd``/``stdout_fd`` to the sandbox's port 22 until its side closes; the exit code."""
    from websockets.exceptions import InvalidHandshake, InvalidStatus
    from websockets.sync.client import connect

    ws_url = "ws" + url.removeprefix("http") + f"/sandboxes/{sandbox_id}/ssh/tunnel"
    headers = {"X-API-Key": api_key} if api_key else {}
    try:
        ws = connect(ws_url, additional_headers=headers, max_size=None, compression=None, open_timeout=30,
                     ping_interval=None, close_timeout=5)
    except InvalidStatus as e:
        body = e.response.body or b""
        try:
            import json

            message = json.loads(body).get("message") or body.decode(errors="replace")
        except ValueError:
            message = body.decode(errors="replace")
        raise ProxyError(f"{message or 'the tunnel was refused'} (HTTP {e.response.status_code})") from None
    except (OSError, InvalidHandshake, TimeoutError) as e:
        raise ProxyError(f"cannot open the tunnel to sandbox {sandbox_id} at {ws_url}: {type(e).__name__}: {e}") from None

    with ws:
        return _pump(ws, sandbox_id, stdin_fd, stdout_fd)


def _pump(ws: Any, sandbox_id: str, stdin_fd: int, stdout_fd: int) -> int:
    """Both directions of an open tunnel: stdin in a thread, the sandbox's bytes here; the exit code."""
    from websockets.exceptions import ConnectionClosed

    def pump_stdin() -> None:
        try:
            while True:
                data = os.read(stdin_fd, CHUNK)
                if not data:
                    ws.send(EOF_MESSAGE)
                    return
                ws.send(data)
        except (ConnectionClosed, OSError):
            return

    threading.Thread(target=pump_stdin, name="stdin-to-sandbox", daemon=True).start()
    try:
        for message in ws:
            if isinstance(message, bytes):
                _write_all(stdout_fd, message)
    except ConnectionClosed:
        pass
    except OSError:  # ssh closed our stdout: it is done
        return 0
    code = ws.close_code
    if code not in (None, 1000):
        reason = ws.close_reason or "no reason given"
        print(f"trenvx: the tunnel to sandbox {sandbox_id} ended: {reason} (code {code})", file=sys.stderr)
        return 1
    return 0


def run_proxy(url: str, api_key: str | None, sandbox_id: str, public_key: Path | None, known_hosts: Path | None) -> int:
    """The whole ProxyCommand: prepare, pin, relay. Raises :class:`ProxyError`."""
    if not SANDBOX_ID_RE.match(sandbox_id):
        raise ProxyError(f"{sandbox_id!r} is not a sandbox id (20 lowercase letters and digits)")
    if public_key is None:
        raise ProxyError("no --public-key: which key should the sandbox let in? (sandbox-cli ssh-config sets it)")
    try:
        key = parse_public_key(public_key.read_text(errors="replace"))
    except OSError as e:
        raise ProxyError(f"cannot read the public key {public_key}: {e.strerror or e}") from None
    except InvalidPublicKey as e:
        raise ProxyError(f"{public_key}: {e}") from None
    host_keys = prepare(url, api_key, sandbox_id, key)
    if known_hosts is not None:
        try:
            pin_host_keys(known_hosts, sandbox_id, host_keys)
        except (OSError, SshSetupError) as e:
            raise ProxyError(f"cannot pin the host key of sandbox {sandbox_id} in {known_hosts}: {e}") from None
    return relay(url, api_key, sandbox_id)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trenvx.cli.ssh_proxy",
                                description="ssh ProxyCommand for trenvx sandboxes (see sandbox-cli ssh-config)")
    p.add_argument("sandbox_id", help="the sandbox id (ssh's %%h)")
    p.add_argument("--ip", default=os.environ.get("TRENVX_IP") or DEFAULT_IP)
    p.add_argument("--port", type=int, default=int(os.environ.get("TRENVX_PORT") or DEFAULT_PORT))
    p.add_argument("--api-key-file", type=Path, help="file holding the API key (TRENVX_API_KEY wins)")
    p.add_argument("--public-key", type=Path, help="the .pub file of the key ssh logs in with")
    p.add_argument("--known-hosts", type=Path, help="where to pin the sandbox's host key")
    p.add_argument("--is-sandbox", action="store_true", help="only test whether the backend has this sandbox")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    url = backend_url(args.ip, args.port)
    try:
        api_key = read_api_key(args.api_key_file)
        if args.is_sandbox:
            return 0 if is_sandbox(url, api_key, args.sandbox_id) else 1
        return run_proxy(url, api_key, args.sandbox_id, args.public_key, args.known_hosts)
    except ProxyError as e:
        print(f"trenvx: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
