"""A minimal asyncio HTTP/1.1 server on a unix socket (keep-alive, Content-Length bodies), enough
for a stand-in of a VMM's API: each request goes to ``handler(method, path, body)`` which returns
``(status, json-able body or None)``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

Handler = Callable[[str, str, bytes], tuple[int, Any]]
REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           500: "Internal Server Error"}


class UdsHttpServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status, answer = self.handler(method, target, body)
                data = b"" if answer is None else json.dumps(answer).encode()
                writer.write(
                    f"HTTP/1.1 {status} {REASONS.get(status, 'X')}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n".encode() + data
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def check_fields(body: Any, schema: dict[str, Any], where: str, *, closed: bool = True) -> str | None:
    """None if ``body`` matches ``schema`` ({field: (type or tuple of types, required)}), else why not.
    Nested schemas are dicts; ``closed`` refuses unknown fields (serde's deny_unknown_fields)."""
    if not isinstance(body, dict):
        return f"{where}: expected a JSON object, got {type(body).__name__}"
    for name, (kind, required) in schema.items():
        if name not in body:
            if required:
                return f"{where}: missing field `{name}`"
            continue
        value = body[name]
        if isinstance(kind, dict):
            err = check_fields(value, kind, f"{where}.{name}", closed=closed)
            if err:
                return err
        elif isinstance(kind, list):  # a list of objects of schema kind[0]
            if not isinstance(value, list):
                return f"{where}.{name}: expected an array"
            for i, item in enumerate(value):
                err = check_fields(item, kind[0], f"{where}.{name}[{i}]", closed=closed)
                if err:
                    return err
        elif kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            return f"{where}.{name}: expected an integer, got {value!r}"
        elif not isinstance(value, kind):
            return f"{where}.{name}: invalid type {type(value).__name__}, expected {getattr(kind, '__name__', kind)}"
    if closed:
        unknown = sorted(set(body) - set(schema))
        if unknown:
            return f"{where}: unknown field `{unknown[0]}`, expected one of {', '.join(sorted(schema))}"
    return None
