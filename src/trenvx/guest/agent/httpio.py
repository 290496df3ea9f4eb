"""HTTP/1.1 plumbing on top of ``http.server``: request bodies and response writers.

:class:`RequestBody` reads a request body incrementally whether it comes with a
``Content-Length`` or ``Transfer-Encoding: chunked`` (what httpx sends for streamed
uploads and client-streaming RPCs). :class:`Exchange` is one request/response pair as the
route handlers see it: parsed path and query, headers, the body, and writers for plain,
JSON, fixed-length and chunked (streamed) responses.
"""

from __future__ import annotations

import io
import json
import select
import socket
from email.message import Message
from http.server import BaseHTTPRequestHandler
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlsplit


class BadRequest(Exception):
    """The request's framing is broken (bad chunk size, early EOF): the connection closes."""


class RequestBody:
    """A request body read incrementally from the connection."""

    def __init__(self, rfile: io.BufferedIOBase, headers: Message) -> None:
        self._rfile = rfile
        te = (headers.get("Transfer-Encoding") or "").lower()
        self.chunked = "chunked" in te
        self._remaining = 0  # bytes left in the body (length mode) or current chunk
        self._done = False
        if not self.chunked:
            length = headers.get("Content-Length")
            try:
                self._remaining = int(length) if length else 0
            except ValueError:
                raise BadRequest(f"invalid Content-Length: {length!r}") from None
            if self._remaining < 0:
                raise BadRequest(f"invalid Content-Length: {length!r}")
            self.length: int | None = self._remaining
            self._done = self._remaining == 0
        else:
            self.length = None

    @property
    def finished(self) -> bool:
        """Whether the whole body has been consumed (the connection can be reused)."""
        return self._done

    def _next_chunk(self) -> None:
        line = self._rfile.readline(1024)
        if not line.endswith(b"\n"):
            raise BadRequest("connection closed inside a chunked body")
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise BadRequest(f"invalid chunk size {size_text!r}") from None
        if size < 0:
            raise BadRequest("negative chunk size")
        if size == 0:
            # Trailers until the empty line.
            while True:
                trailer = self._rfile.readline(8192)
                if trailer in (b"\r\n", b"\n", b""):
                    break
            self._done = True
        self._remaining = size

    def read(self, n: int = 65536) -> bytes:
        """Up to ``n`` bytes of the body; ``b""`` once it is finished."""
        while not self._done:
            if self._remaining == 0:
                if not self.chunked:
                    self._done = True
                    break
                self._next_chunk()
                continue
            data: bytes = self._rfile.read1(min(n, self._remaining))
            if not data:
                raise BadRequest("connection closed before the end of the request body")
            self._remaining -= len(data)
            if self._remaining == 0:
                if self.chunked:
                    crlf = self._rfile.readline(8)
                    if crlf not in (b"\r\n", b"\n"):
                        raise BadRequest("missing CRLF after a chunk")
                else:
                    self._done = True
            return data
        return b""

    def read_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or fewer only when the body ends first."""
        parts: list[bytes] = []
        got = 0
        while got < n:
            data = self.read(n - got)
            if not data:
                break
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def read_all(self, limit: int) -> bytes:
        """The rest of the body; raises :class:`BodyTooLarge` past ``limit`` bytes."""
        parts: list[bytes] = []
        size = 0
        while True:
            data = self.read(1 << 20)
            if not data:
                return b"".join(parts)
            size += len(data)
            if size > limit:
                raise BodyTooLarge(limit)
            parts.append(data)

    def drain(self, limit: int = 1 << 20) -> bool:
        """Discard up to ``limit`` unread bytes; True when the body is then finished."""
        seen = 0
        try:
            while not self._done and seen <= limit:
                data = self.read(65536)
                if not data:
                    break
                seen += len(data)
        except (BadRequest, OSError):
            return False
        return self._done


class BodyTooLarge(Exception):
    """A request body is larger than the handler accepts."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit


class Exchange:
    """One HTTP request and its response, as seen by the route handlers."""

    def __init__(self, handler: BaseHTTPRequestHandler) -> None:
        self._h = handler
        parts = urlsplit(handler.path)
        self.method: str = handler.command
        self.path: str = parts.path
        self.query: dict[str, list[str]] = parse_qs(parts.query, keep_blank_values=True)
        self.headers: Message = handler.headers
        self.body = RequestBody(handler.rfile, handler.headers)
        self.headers_sent = False
        self.status: int | None = None
        self._chunked = False
        self._stream_open = False

    # ---------------------------------------------------------------- request side
    def query_param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def client_gone(self) -> bool:
        """Whether the client has closed its side of the connection (for idle streams)."""
        sock = self._h.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            peeked: bytes = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            return peeked == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True

    def local_address(self) -> str | None:
        """The IP address this request arrived on (the guest address the host used); None over vsock."""
        try:
            name = self._h.connection.getsockname()
        except (OSError, AttributeError):
            return None
        if isinstance(name, tuple) and name and isinstance(name[0], str) and name[0]:
            return name[0]
        return None  # AF_VSOCK: (cid, port), both integers

    def close_after(self) -> None:
        """Close the connection after this response (instead of keeping it alive)."""
        self._h.close_connection = True

    # ---------------------------------------------------------------- response side
    def _send_head(self, status: int, headers: dict[str, str]) -> None:
        h = self._h
        h.send_response(status)
        if self.headers.get("Origin"):  # browsers (E2B's JS SDK) need CORS
            h.send_header("Access-Control-Allow-Origin", "*")
            h.send_header("Access-Control-Expose-Headers", "*")
        for key, value in headers.items():
            h.send_header(key, value)
        if h.close_connection:
            h.send_header("Connection", "close")
        h.end_headers()
        self.headers_sent = True
        self.status = status

    def respond(self, status: int, body: bytes = b"", content_type: str | None = None,
                headers: dict[str, str] | None = None) -> None:
        """A complete response with a fixed body."""
        out = dict(headers or {})
        if content_type:
            out["Content-Type"] = content_type
        if status != 204 and status != 304:
            out["Content-Length"] = str(len(body))
        self._send_head(status, out)
        if body and status not in (204, 304):
            self._h.wfile.write(body)

    def respond_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        self.respond(status, data, "application/json", headers)

    def start_stream(self, status: int, content_type: str, length: int | None = None,
                     headers: dict[str, str] | None = None) -> None:
        """Send the head of a streamed response: ``Content-Length`` when known, else chunked."""
        out = dict(headers or {})
        out["Content-Type"] = content_type
        if length is None:
            out["Transfer-Encoding"] = "chunked"
            self._chunked = True
        else:
            out["Content-Length"] = str(length)
        self._send_head(status, out)
        self._stream_open = True

    def write(self, data: bytes) -> None:
        """Write part of a streamed body (one chunk in chunked mode). Raises OSError if gone."""
        if not data:
            return
        if self._chunked:
            self._h.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n")
        else:
            self._h.wfile.write(data)

    def sendfile(self, file: BinaryIO, count: int) -> None:
        """Send ``count`` bytes of ``file`` on a fixed-length response with sendfile(2)."""
        self._h.connection.sendfile(file, 0, count)

    def end_stream(self) -> None:
        if self._stream_open and self._chunked:
            self._h.wfile.write(b"0\r\n\r\n")
        self._stream_open = False
