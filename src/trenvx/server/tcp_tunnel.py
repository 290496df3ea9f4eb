"""A TCP connection carried over a websocket: the bytes of one sandbox port, both ways.

The server's API is HTTP, so a raw TCP stream to a port inside a sandbox (sshd's, for
``ssh root@<sandbox-id>``: :mod:`.routes_ssh`) travels as a websocket between the client and the
server, and as a plain TCP connection from the server to the port
(:meth:`~trenvx.sandbox.manager.SandboxManager.port_endpoint`). The protocol on the websocket:

- binary messages are stream bytes, in order, either way;
- the text message :data:`EOF_MESSAGE` from the client ends what it sends (the TCP connection is
  half-closed: ``shutdown(SHUT_WR)``), as a ``ProxyCommand`` whose stdin ended does, while the
  answer goes on arriving;
- the server closes the websocket (code 1000) once the port's side of the connection ends, and
  with code 1011 and the reason when it broke or the sandbox went away; a client that closes the
  websocket closes the TCP connection.

Flow control holds both ways: a client message is written and drained before the next is read,
and a read from the port waits for its websocket send. :func:`relay` knows nothing of sandboxes:
the route picks the endpoint (only ever the sandbox's own port) and passes what ends the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable

from starlette.websockets import WebSocket, WebSocketDisconnect

from .ws_bridge import cancel_and_wait

log = logging.getLogger(__name__)

EOF_MESSAGE = "eof"
"""Text message: the client sends nothing more (the TCP connection is half-closed)."""
CHUNK = 64 * 1024
"""Largest read from the port, so the largest websocket message the server sends."""
CONNECT_TIMEOUT_S = 10.0


class TunnelProtocolError(Exception):
    """The client sent a text message other than :data:`EOF_MESSAGE`."""


async def open_tcp(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to ``host:port`` within ``timeout`` seconds (OSError or TimeoutError otherwise)."""
    return await asyncio.wait_for(asyncio.open_connection(host, port, limit=CHUNK), timeout)


async def _client_to_tcp(websocket: WebSocket, writer: asyncio.StreamWriter) -> None:
    """Returns when the client disconnects; raises :class:`TunnelProtocolError` on an unknown text message."""
    while True:
        msg = await websocket.receive()
        if msg["type"] == "websocket.disconnect":
            return
        data = msg.get("bytes")
        if data is not None:
            if data:
                writer.write(data)
                await writer.drain()
            continue
        text = msg.get("text")
        if text == EOF_MESSAGE:
            if writer.can_write_eof() and not writer.is_closing():
                writer.write_eof()
        elif text is not None:
            raise TunnelProtocolError(f"unexpected text message {text[:40]!r}: binary messages carry the stream, "
                                      f"{EOF_MESSAGE!r} ends it")


async def _tcp_to_client(reader: asyncio.StreamReader, websocket: WebSocket) -> None:
    """Returns when the port's side ends the connection."""
    while True:
        data = await reader.read(CHUNK)
        if not data:
            return
        await websocket.send_bytes(data)


async def relay(websocket: WebSocket, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                stop: Awaitable[str] | None = None) -> str:
    """Relay between an accepted ``websocket`` and a TCP connection until one side ends; closes both.

    ``stop`` ends the relay early with its result as the close reason (e.g. the sandbox ended).
    Returns why the relay ended (for logs).
    """
    upstream = asyncio.ensure_future(_tcp_to_client(reader, websocket))
    downstream = asyncio.ensure_future(_client_to_tcp(websocket, writer))
    tasks: list[asyncio.Future[object]] = [upstream, downstream]
    stopper = asyncio.ensure_future(stop) if stop is not None else None
    if stopper is not None:
        tasks.append(stopper)
    code, reason = 1000, ""
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if stopper is not None and stopper.done() and not stopper.cancelled() and stopper.exception() is None:
            code, reason = 1011, str(stopper.result())
        elif downstream.done():
            exc = None if downstream.cancelled() else downstream.exception()
            if isinstance(exc, TunnelProtocolError):
                code, reason = 1003, str(exc)
            elif exc is not None and not isinstance(exc, WebSocketDisconnect):
                code, reason = 1011, f"writing to the port failed: {type(exc).__name__}: {exc}"
            else:
                reason = "the client closed the tunnel"
        elif upstream.done():
            exc = None if upstream.cancelled() else upstream.exception()
            if exc is not None and not isinstance(exc, WebSocketDisconnect):
                code, reason = 1011, f"reading from the port failed: {type(exc).__name__}: {exc}"
            else:
                reason = "the port closed the connection"
    finally:
        await cancel_and_wait(tasks)
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 2)
        with contextlib.suppress(Exception):  # already gone when the client left
            await websocket.close(code=code, reason=reason[:120])
    log.debug("tunnel ended (%d): %s", code, reason)
    return reason


__all__ = ["CHUNK", "EOF_MESSAGE", "TunnelProtocolError", "open_tcp", "relay"]
