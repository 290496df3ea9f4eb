"""The proxy to ports inside sandboxes: how clients reach each sandbox's agent and web servers.

A request is for a sandbox when it carries the headers ``E2b-Sandbox-Id`` and
``E2b-Sandbox-Port`` (what E2B's SDKs send to ``E2B_SANDBOX_URL``), or when its Host is
``PORT-SANDBOXID.<domain>`` (what ``sandbox.get_host(port)`` gives). Everything else goes to the
API. The proxy streams both ways without buffering: request bodies (uploads, Connect client
streams) and response bodies (downloads, Connect server streams) are forwarded chunk by chunk,
and websockets are relayed message by message. When the client goes away the upstream
connection is closed, so a command stream nobody reads is not kept open.

Where a port is reached comes from :meth:`SandboxManager.port_endpoint`: on QEMU, a TCP port
on 127.0.0.1 (the agent's port 49983 is forwarded when the sandbox starts, another port on first
use); on Firecracker and Cloud Hypervisor, the agent's port through the VM's hybrid vsock socket
(other ports are not reachable there until tap networking exists). HTTP goes through the clients
of :mod:`.upstreams`; a websocket opens its own connection (a TCP connect, or
:func:`~trenvx.guest.vsock.vsock_socket` for vsock).

Errors follow E2B's proxy, whose messages E2B's SDKs recognise: 502 ``The sandbox ... was not
found`` (killed, timed out or never existed) and 502 ``... port is not open``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpcore
import httpx

from ..guest.endpoint import AgentEndpoint, HybridVsockEndpoint
from ..sandbox.manager import PortUnavailable, SandboxConflict, SandboxManager, SandboxNotFound
from .errors import error_body
from .upstreams import UpstreamClients

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

SANDBOX_ID_HEADER = b"e2b-sandbox-id"
SANDBOX_PORT_HEADER = b"e2b-sandbox-port"
HOST_RE = re.compile(r"^(\d{1,5})-([a-z0-9][a-z0-9-]{0,63})\.(.+)$")

HOP_BY_HOP = {
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"trailers", b"transfer-encoding", b"upgrade", b"proxy-connection",
}
REQUEST_DROP = HOP_BY_HOP | {SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER}
WS_REQUEST_DROP = REQUEST_DROP | {b"host", b"sec-websocket-key", b"sec-websocket-version",
                                  b"sec-websocket-extensions", b"sec-websocket-protocol", b"content-length"}


class BadTarget(Exception):
    pass


def _strip_port(host: str) -> str:
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def target_of(scope: Scope, domain: str) -> tuple[str, int] | None:
    """(sandbox id, port) this request is for, None if it is for the API; :class:`BadTarget` if malformed."""
    sid = port = host = None
    for name, value in scope.get("headers", ()):
        if name == SANDBOX_ID_HEADER:
            sid = value.decode("latin-1").strip()
        elif name == SANDBOX_PORT_HEADER:
            port = value.decode("latin-1").strip()
        elif name == b"host":
            host = value.decode("latin-1").strip().lower()
    if sid is not None or port is not None:
        if not sid or not port:
            raise BadTarget("send both E2b-Sandbox-Id and E2b-Sandbox-Port headers to reach a sandbox")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise BadTarget(f"header E2b-Sandbox-Port: {port[:20]!r} is not a port number (1-65535)")
        return sid, int(port)
    if host:
        m = HOST_RE.match(host)
        if m and _strip_port(m.group(3)) == _strip_port(domain.lower()):
            p = int(m.group(1))
            if not 1 <= p <= 65535:
                raise BadTarget(f"Host: {p} is not a port number (1-65535)")
            return m.group(2), p
    return None


class SandboxProxy:
    """ASGI middleware: requests for a sandbox are proxied, the rest go to ``app``."""

    def __init__(self, app: Any, manager: SandboxManager | None = None, domain: str = "localhost",
                 manager_getter: Callable[[], SandboxManager] | None = None) -> None:
        self.app = app
        self._manager = manager
        self._manager_getter = manager_getter
        self.domain = domain
        self.upstreams = UpstreamClients(self._is_running)

    @property
    def manager(self) -> SandboxManager:
        if self._manager is not None:
            return self._manager
        assert self._manager_getter is not None
        return self._manager_getter()

    def _is_running(self, sandbox_id: str) -> bool:
        try:
            self.manager.get(sandbox_id)
        except SandboxNotFound:
            return False
        return True

    async def aclose(self) -> None:
        await self.upstreams.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        try:
            target = target_of(scope, self.domain)
        except BadTarget as e:
            if scope["type"] == "http":
                return await _respond(send, 400, str(e))
            return await _ws_refuse(scope, receive, send, 400, str(e))
        if target is None:
            return await self.app(scope, receive, send)
        sid, port = target
        try:
            endpoint = await self.manager.port_endpoint(sid, port)
        except SandboxNotFound as e:
            msg = f"The sandbox {sid} was not found" + (f": {e.reason}" if e.reason else "")
            return await self._refuse(scope, receive, send, 502, msg, sandboxId=sid)
        except SandboxConflict as e:
            return await self._refuse(scope, receive, send, 409, str(e), sandboxId=sid)
        except PortUnavailable as e:
            return await self._refuse(scope, receive, send, 502,
                                      f"The sandbox {sid} is running but port is not open (port {port}: {e})", sandboxId=sid)
        if scope["type"] == "http":
            await self._http(scope, receive, send, sid, port, endpoint)
        else:
            await self._websocket(scope, receive, send, sid, port, endpoint)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, message: str, **extra: Any) -> None:
        if scope["type"] == "http":
            await _respond(send, status, message, **extra)
        else:
            await _ws_refuse(scope, receive, send, status, message)

    # -- HTTP ------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send, sid: str, port: int, endpoint: AgentEndpoint) -> None:
        headers = [(k, v) for k, v in scope["headers"] if k not in REQUEST_DROP]
        has_body = any(
            (k == b"content-length" and v.strip() not in (b"", b"0")) or (k == b"transfer-encoding")
            for k, v in scope["headers"]
        )
        client_addr = scope.get("client") or ("", 0)
        headers.append((b"x-forwarded-for", str(client_addr[0]).encode()))
        headers.append((b"x-forwarded-proto", scope.get("scheme", "http").encode()))
        body_done = asyncio.Event()
        disconnected = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    disconnected.set()
                    raise ClientDisconnected()
                chunk = msg.get("body", b"")
                if chunk:
                    yield chunk
                if not msg.get("more_body", False):
                    break
            body_done.set()

        if not has_body:
            body_done.set()
        raw_path = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            raw_path += b"?" + scope["query_string"]
        client = self.upstreams.client_for(sid, endpoint)
        url = httpx.URL(endpoint.base_url, raw_path=raw_path)
        request = client.build_request(scope["method"], url, headers=headers, content=body() if has_body else None)
        try:
            upstream = await client.send(request, stream=True)
        except ClientDisconnected:
            return
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
            if disconnected.is_set():
                return
            log.warning("proxy %s %s to sandbox %s port %d failed: %r (cause %r)", scope["method"],
                        scope["path"], sid, port, e, e.__cause__ or e.__context__)
            try:
                self.manager.get(sid)
            except SandboxNotFound as nf:
                return await _respond(send, 502, f"The sandbox {sid} was not found" +
                                      (f": {nf.reason}" if nf.reason else ""), sandboxId=sid)
            return await _respond(send, 502, f"The sandbox {sid} is running but port is not open "
                                  f"(nothing answered on port {port}: {type(e).__name__})", sandboxId=sid)
        except httpx.HTTPError as e:
            return await _respond(send, 502, f"proxying to port {port} of sandbox {sid} failed: {e}", sandboxId=sid)

        try:
            out_headers = [(k.lower(), v) for k, v in upstream.headers.raw if k.lower() not in HOP_BY_HOP]
            await send({"type": "http.response.start", "status": upstream.status_code, "headers": out_headers})
            pump = asyncio.ensure_future(self._pump(upstream, send))
            watch = asyncio.ensure_future(_wait_disconnect(receive, body_done, disconnected))
            try:
                await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (pump, watch):
                    if not t.done():
                        t.cancel()
                for t in (pump, watch):
                    with contextlib.suppress(BaseException):
                        await t
            if pump.done() and not pump.cancelled() and pump.exception() is not None:
                log.debug("proxy stream from %s:%d ended early: %r", sid, port, pump.exception())
        finally:
            await upstream.aclose()

    @staticmethod
    async def _pump(upstream: httpx.Response, send: Send) -> None:
        try:
            async for chunk in upstream.aiter_raw():
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    # -- websockets ----------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send, sid: str, port: int,
                         endpoint: AgentEndpoint) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake

        first = await receive()
        if first["type"] != "websocket.connect":
            return
        path = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            path += b"?" + scope["query_string"]
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k not in WS_REQUEST_DROP]
        uri = "ws" + endpoint.base_url.removeprefix("http") + path.decode("latin-1")
        sock = None
        transport: dict[str, Any] = {}
        try:
            if isinstance(endpoint, HybridVsockEndpoint):
                from ..guest.vsock import vsock_socket

                sock = transport["sock"] = await vsock_socket(endpoint.uds_path, endpoint.port, timeout=10)
            upstream = await connect(
                uri, additional_headers=headers, subprotocols=scope.get("subprotocols") or None, open_timeout=10,
                max_size=None, ping_interval=None, compression=None, **transport,
            )
        except (OSError, InvalidHandshake, asyncio.TimeoutError, httpcore.ConnectError) as e:
            if sock is not None:
                sock.close()
            await _ws_deny(scope, send, 502, f"The sandbox {sid} is running but port is not open (websocket to port {port}: {e})")
            return
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})

        async def client_to_upstream() -> None:
            while True:
                msg = await receive()
                if msg["type"] == "websocket.receive":
                    if msg.get("bytes") is not None:
                        await upstream.send(msg["bytes"])
                    elif msg.get("text") is not None:
                        await upstream.send(msg["text"])
                elif msg["type"] == "websocket.disconnect":
                    await upstream.close(code=msg.get("code", 1000) or 1000)
                    return

        async def upstream_to_client() -> None:
            try:
                async for m in upstream:
                    if isinstance(m, bytes):
                        await send({"type": "websocket.send", "bytes": m})
                    else:
                        await send({"type": "websocket.send", "text": m})
            except ConnectionClosed:
                pass
            code = upstream.close_code or 1000
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": code if code != 1005 else 1000,
                            "reason": upstream.close_reason or ""})

        tasks = [asyncio.ensure_future(client_to_upstream()), asyncio.ensure_future(upstream_to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t
            with contextlib.suppress(Exception):
                await upstream.close()


class ClientDisconnected(Exception):
    pass


async def _wait_disconnect(receive: Receive, body_done: asyncio.Event, disconnected: asyncio.Event) -> None:
    """Returns when the client disconnects (after its request body was read)."""
    await body_done.wait()
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            disconnected.set()
            return


async def _respond(send: Send, status: int, message: str, **extra: Any) -> None:
    body = error_body(status, message, **extra)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _ws_deny(scope: Scope, send: Send, status: int, message: str) -> None:
    """Refuse a websocket handshake with an HTTP error if the server supports it, else close."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        body = error_body(status, message)
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1011 if status >= 500 else 1008, "reason": message[:120]})


async def _ws_refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    msg = await receive()
    if msg["type"] != "websocket.connect":
        return
    await _ws_deny(scope, send, status, message)
