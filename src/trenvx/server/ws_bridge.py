"""Relaying a websocket: an ASGI client's frames to an upstream connection (``websockets``) and
back, until either side closes; and the cancel-then-await that ends a set of relay tasks.

Used by the proxy (a sandbox's port) and by the cluster's router (another node).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel every task, then wait for each to end (whatever it raises)."""
    tasks = list(tasks)
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(BaseException):
            await t


async def relay_websocket(receive: Any, send: Any, upstream: Any, also: Iterable[asyncio.Future[Any]] = ()) -> None:
    """Pass frames both ways between the ASGI client (``receive``/``send``, already accepted) and
    ``upstream`` (an open ``websockets`` client connection) until one side closes or a task of
    ``also`` completes (those are cancelled at the end too; one that had completed keeps its result). The upstream's close code reaches the
    client; the upstream is closed at the end."""
    from websockets.exceptions import ConnectionClosed

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

    extra = list(also)
    tasks = [asyncio.ensure_future(client_to_upstream()), asyncio.ensure_future(upstream_to_client()), *extra]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(tasks)
        with contextlib.suppress(Exception):
            await upstream.close()
