"""Connect RPC (https://connectrpc.com/docs/protocol) with the JSON codec, server side.

* Unary: ``POST /<service>/<Method>`` with ``Content-Type: application/json``; the answer
  is the JSON response message (200) or a JSON error ``{"code", "message"}`` with the HTTP
  status mapped from the code.
* Server streaming: request and response are ``application/connect+json`` *envelopes*:
  1 flag byte, a 4-byte big-endian length, the JSON message. The response always has
  status 200 and ends with an end-stream envelope (flag ``0x02``) carrying ``{}`` or
  ``{"error": {...}}``.
* Client streaming: the request is a sequence of envelopes; the response is enveloped
  like a server stream (one message, then the end-stream envelope).

This module holds the error type, the envelope codec, and the glue that runs a handler
function for one RPC on an :class:`~.httpio.Exchange`.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .httpio import BodyTooLarge

if TYPE_CHECKING:
    from .httpio import Exchange

log = logging.getLogger("trenvx_agent.connect")

#: Connect error code -> HTTP status (Connect protocol, "Error codes").
HTTP_STATUS: dict[str, int] = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}

FLAG_COMPRESSED = 0x01
FLAG_END_STREAM = 0x02

#: Largest single request message accepted (a SendInput carrying base64 data, say), compressed or not.
MAX_MESSAGE_BYTES = 64 << 20
#: Most JSON values one request message may hold. Parsed JSON takes ~14 times its size in Python
#: objects when it is made of small values (60 MB of ``"ab",`` became 870 MB): a message's size
#: alone does not bound the agent's memory. Real messages hold a few hundred values; their big
#: part (stdin data) is one base64 string.
MAX_MESSAGE_VALUES = 1 << 20
#: Flag bits a request envelope may carry: compressed, end of stream.
KNOWN_FLAGS = 0x03

UNARY_CONTENT_TYPE = "application/json"
STREAM_CONTENT_TYPE = "application/connect+json"


class ConnectError(Exception):
    """An RPC failure with a Connect code (``"not_found"``, ...) and a human message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        if code not in HTTP_STATUS:
            code = "unknown"
        self.code = code
        self.message = message

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]


class StreamClosed(Exception):
    """The client went away while a stream was being written."""


def encode_envelope(message: dict[str, Any], flags: int = 0) -> bytes:
    """One Connect envelope holding ``message`` as JSON."""
    data = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return struct.pack(">BI", flags, len(data)) + data


def read_envelope(ex: Exchange, compression: str | None) -> tuple[int, dict[str, Any]] | None:
    """Read the next request envelope; None at the end of the body."""
    head = ex.body.read_exact(5)
    if not head:
        return None
    if len(head) < 5:
        raise ConnectError("invalid_argument", "truncated envelope header in request stream")
    flags, length = struct.unpack(">BI", head)
    if flags & ~KNOWN_FLAGS:
        raise ConnectError("invalid_argument", f"envelope flags 0x{flags:02x} carry unknown bits: "
                                               "a request envelope's flags are 0x00, 0x01 (compressed) or 0x02 (end)")
    if length > MAX_MESSAGE_BYTES:
        raise ConnectError("resource_exhausted", f"message of {length} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    data = ex.body.read_exact(length)
    if len(data) < length:
        raise ConnectError("invalid_argument", "truncated envelope in request stream")
    if flags & FLAG_COMPRESSED:
        if compression != "gzip":
            raise ConnectError("internal", f"compressed message with unsupported encoding {compression!r}")
        data = gunzip(data, MAX_MESSAGE_BYTES)
    if flags & FLAG_END_STREAM:
        return flags, {}
    return flags, parse_message(data)


def gunzip(data: bytes, limit: int) -> bytes:
    """``data`` gunzipped, refused past ``limit`` bytes: a small message must not inflate into gigabytes."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise ConnectError("invalid_argument", f"could not decompress message: {exc}") from None
    if len(out) > limit:
        raise ConnectError("resource_exhausted", f"compressed message inflates past the limit of {limit} bytes")
    if not inflater.eof:
        raise ConnectError("invalid_argument", "could not decompress message: the gzip stream is truncated")
    return out


#: A JSON escape of a UTF-16 surrogate (``\ud800``-``\udfff``): legal JSON, but alone it is no character.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_message(data: bytes) -> dict[str, Any]:
    """A JSON request message; empty input is the empty message.

    Refused (``invalid_argument`` / ``resource_exhausted``, never an internal error): text that
    is not JSON, nesting deeper than the parser's recursion, more than :data:`MAX_MESSAGE_VALUES`
    values, lone surrogates (strings no file name or argument can hold)."""
    if not data.strip():
        return {}
    # Every value but the first follows a ',', ':' or '[' (counted in strings too: an upper bound).
    values = data.count(b",") + data.count(b":") + data.count(b"[")
    if values > MAX_MESSAGE_VALUES:
        raise ConnectError("resource_exhausted", f"request message holds more than {MAX_MESSAGE_VALUES} JSON values")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConnectError("invalid_argument", f"could not parse request message as JSON: {exc}") from None
    except RecursionError:
        raise ConnectError("invalid_argument", "request message is nested too deeply") from None
    if not isinstance(obj, dict):
        raise ConnectError("invalid_argument", "request message must be a JSON object")
    if _SURROGATE_ESCAPE.search(data):
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ConnectError("invalid_argument", "request message holds a lone UTF-16 surrogate "
                                                   "(\\ud800-\\udfff not in a pair): not a character") from None
    return obj


@dataclass
class RpcContext:
    """What a handler knows about the call besides its message."""

    exchange: Exchange
    #: Username named by ``Authorization: Basic base64("user:")``, or None.
    basic_user: str | None
    #: Absolute ``time.monotonic()`` deadline from ``Connect-Timeout-Ms``, or None.
    deadline: float | None
    #: Seconds between keepalive messages on idle server streams.
    keepalive_interval: float

    @property
    def timeout_s(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def client_gone(self) -> bool:
        return self.exchange.client_gone()


class ServerStream:
    """The writer of a server-streaming (or client-streaming) response."""

    def __init__(self, ex: Exchange) -> None:
        self._ex = ex
        self.started = False

    def _open(self) -> None:
        if not self.started:
            self._ex.start_stream(200, STREAM_CONTENT_TYPE)
            self.started = True

    def send(self, message: dict[str, Any]) -> None:
        """Send one response message; raises :class:`StreamClosed` if the client is gone."""
        try:
            self._open()
            self._ex.write(encode_envelope(message))
        except OSError as exc:
            raise StreamClosed(str(exc)) from None

    def finish(self, error: ConnectError | None = None) -> None:
        """Send the end-stream envelope (with the error, if any) and end the body."""
        end: dict[str, Any] = {"error": error.to_json()} if error else {}
        try:
            self._open()
            self._ex.write(encode_envelope(end, FLAG_END_STREAM))
            self._ex.end_stream()
        except OSError:
            self._ex.close_after()


UnaryHandler = Callable[[RpcContext, dict[str, Any]], dict[str, Any]]
ServerStreamHandler = Callable[[RpcContext, dict[str, Any], ServerStream], None]
ClientStreamHandler = Callable[[RpcContext, Iterator[dict[str, Any]]], dict[str, Any]]


@dataclass(frozen=True)
class Rpc:
    """One RPC method: its kind (``unary``, ``server_stream``, ``client_stream``) and handler."""

    kind: str
    handler: Callable[..., Any]


def _content_type(ex: Exchange) -> str:
    return (ex.header("Content-Type") or "").split(";", 1)[0].strip().lower()


def _check_protocol_version(ex: Exchange) -> None:
    version = ex.header("Connect-Protocol-Version")
    if version is not None and version.strip() != "1":
        raise ConnectError("invalid_argument", f"connect-protocol-version must be '1': got '{version}'")


#: The Connect protocol allows at most 10 digits in ``Connect-Timeout-Ms``.
MAX_TIMEOUT_DIGITS = 10


def parse_timeout_ms(value: str | None) -> int | None:
    """Milliseconds in a ``Connect-Timeout-Ms`` header; None when absent or 0 (no deadline).

    The protocol's form is a positive integer of at most 10 digits; anything else is refused
    with ``invalid_argument`` (as connect-go does) rather than silently running without a limit.
    E2B's SDKs send no header for "no limit"; a ``0`` is taken the same way, as envd does.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > MAX_TIMEOUT_DIGITS:
        raise ConnectError(
            "invalid_argument",
            f"invalid Connect-Timeout-Ms header {value[:40]!r}: give the timeout as a whole number of "
            f"milliseconds (at most {MAX_TIMEOUT_DIGITS} digits), or leave the header out for no limit",
        )
    ms = int(text)
    return ms or None


def _deadline(ex: Exchange) -> float | None:
    ms = parse_timeout_ms(ex.header("Connect-Timeout-Ms"))
    if ms is None:
        return None
    return time.monotonic() + ms / 1000.0


def _unsupported_media_type(ex: Exchange, expected: str) -> None:
    ex.body.drain()
    ex.respond_json(
        415,
        {"code": "unknown", "message": f"unsupported content-type '{_content_type(ex)}', expected '{expected}'"},
        headers={"Accept-Post": expected},
    )


def serve_rpc(ex: Exchange, rpc: Rpc, make_context: Callable[[Exchange, float | None], RpcContext]) -> None:
    """Run ``rpc`` on the exchange, turning every failure into a Connect error response."""
    if rpc.kind == "unary":
        _serve_unary(ex, rpc, make_context)
    else:
        _serve_streaming(ex, rpc, make_context)


def _serve_unary(ex: Exchange, rpc: Rpc, make_context: Callable[[Exchange, float | None], RpcContext]) -> None:
    if ex.method != "POST":
        ex.body.drain()
        ex.respond_json(405, {"code": "unimplemented", "message": f"method {ex.method} not allowed, use POST"},
                        headers={"Allow": "POST"})
        return
    if _content_type(ex) != UNARY_CONTENT_TYPE:
        _unsupported_media_type(ex, UNARY_CONTENT_TYPE)
        return
    try:
        _check_protocol_version(ex)
        if (ex.header("Content-Encoding") or "identity").lower() not in ("identity", ""):
            raise ConnectError("unimplemented", "compressed unary requests are not supported")
        ctx = make_context(ex, _deadline(ex))
        try:
            body = ex.body.read_all(MAX_MESSAGE_BYTES)
        except BodyTooLarge as exc:
            ex.close_after()
            raise ConnectError("resource_exhausted", str(exc)) from None
        response = rpc.handler(ctx, parse_message(body))
    except ConnectError as err:
        if not ex.body.finished and not ex.body.drain():
            ex.close_after()
        ex.respond_json(err.http_status, err.to_json())
        return
    ex.respond_json(200, response)


def _serve_streaming(ex: Exchange, rpc: Rpc, make_context: Callable[[Exchange, float | None], RpcContext]) -> None:
    if ex.method != "POST":
        ex.body.drain()
        ex.respond_json(405, {"code": "unimplemented", "message": f"method {ex.method} not allowed, use POST"},
                        headers={"Allow": "POST"})
        return
    if _content_type(ex) != STREAM_CONTENT_TYPE:
        _unsupported_media_type(ex, STREAM_CONTENT_TYPE)
        return
    stream = ServerStream(ex)
    compression = (ex.header("Connect-Content-Encoding") or "").lower() or None
    try:
        _check_protocol_version(ex)
        ctx = make_context(ex, _deadline(ex))
        if rpc.kind == "server_stream":
            first = read_envelope(ex, compression)
            if first is None:
                raise ConnectError("invalid_argument", "server-streaming request carries no message")
            # Anything after the single request message is ignored.
            if not ex.body.drain():
                ex.close_after()
            rpc.handler(ctx, first[1], stream)
        else:
            def messages() -> Iterator[dict[str, Any]]:
                while True:
                    item = read_envelope(ex, compression)
                    if item is None or item[0] & FLAG_END_STREAM:
                        return
                    yield item[1]

            response = rpc.handler(ctx, messages())
            if not ex.body.finished and not ex.body.drain():
                ex.close_after()
            stream.send(response)
    except StreamClosed:
        ex.close_after()
        return
    except ConnectError as err:
        if not ex.body.finished and not ex.body.drain():
            ex.close_after()
        stream.finish(err)
        return
    except Exception as exc:  # a bug: report it on the stream rather than killing the connection
        log.exception("internal error in %s", ex.path)
        ex.close_after()
        stream.finish(ConnectError("internal", f"internal error: {exc}"))
        return
    stream.finish()
