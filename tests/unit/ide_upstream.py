"""A stand-in for a web IDE served in a sandbox (what code-server asks of the proxy), for proxy tests
without VMs: a large static file, a long poll, an exact websocket echo, redirects and cookies as
applications send them, and a report of what reached it (path, query, headers, cookies)."""

from __future__ import annotations

import asyncio
import hashlib
import random
from functools import cache

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

BIG_SIZE = 20 * 1024 * 1024


@cache
def big_file() -> bytes:
    """20 MiB of incompressible bytes, the same in every test run."""
    return random.Random(16).randbytes(BIG_SIZE)


def big_digest() -> str:
    return hashlib.sha256(big_file()).hexdigest()


def ide_upstream_app() -> Starlette:
    async def report(request: Request) -> JSONResponse:
        return JSONResponse({"path": request.url.path, "query": request.url.query,
                             "headers": {k: v for k, v in request.headers.items()},
                             "cookie_headers": request.headers.getlist("cookie"),
                             "cookies": dict(request.cookies)})

    async def big(request: Request) -> Response:
        return Response(big_file(), media_type="application/octet-stream")

    async def poll(request: Request) -> PlainTextResponse:
        await asyncio.sleep(float(request.query_params.get("after", "3")))
        return PlainTextResponse("event: late")

    async def redirect_abs_path(request: Request) -> Response:
        return Response(status_code=302, headers={"location": "/login?next=%2F"})

    async def redirect_relative(request: Request) -> Response:
        return Response(status_code=302, headers={"location": "./login"})

    async def redirect_own_host(request: Request) -> Response:
        return Response(status_code=302, headers={"location": f"http://{request.headers['host']}/abs"})

    async def set_cookies(request: Request) -> Response:
        r = Response("ok")
        r.headers.append("set-cookie", "session=s1; Path=/; HttpOnly")
        r.headers.append("set-cookie", "deep=d1; Path=/static; SameSite=Lax")
        r.headers.append("set-cookie", "plain=p1")
        r.headers.append("set-cookie", "trenvx_traffic=forged-by-the-sandbox; Path=/")
        return r

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                msg = await websocket.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                if msg.get("bytes") is not None:
                    await websocket.send_bytes(msg["bytes"])
                elif msg.get("text") is not None:
                    await websocket.send_text(msg["text"])
        except Exception:  # noqa: BLE001 - the client went away
            return

    async def ws_report(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json({"path": websocket.url.path, "query": websocket.url.query,
                                   "headers": {k: v for k, v in websocket.headers.items()}})
        await websocket.close()

    return Starlette(routes=[
        Route("/big.bin", big), Route("/poll", poll),
        Route("/go-login", redirect_abs_path), Route("/go-relative", redirect_relative),
        Route("/go-own-host", redirect_own_host), Route("/set-cookies", set_cookies),
        WebSocketRoute("/ws", echo), WebSocketRoute("/ws-report", ws_report),
        Route("/{path:path}", report, methods=["GET", "HEAD", "POST"]),
    ])
