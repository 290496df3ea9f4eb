"""Connect RPC (JSON codec) framing, independent of any transport.

Server- and client-streaming RPCs carry *envelopes*: one flag byte, a 4-byte big-endian
length, then that many bytes of JSON. Flag ``0x01`` marks a compressed message (never
requested by this client), flag ``0x02`` the end-of-stream message, whose JSON is ``{}`` or
``{"error": {"code": ..., "message": ...}, "metadata": {...}}``.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Iterator, Optional

FLAG_COMPRESSED = 0x01
FLAG_END_STREAM = 0x02

UNARY_CONTENT_TYPE = "application/json"
STREAM_CONTENT_TYPE = "application/connect+json"
PROTOCOL_VERSION = "1"

_HEADER = struct.Struct(">BI")

#: Largest message accepted from the agent (a 64 MiB chunk of output is already absurd).
MAX_MESSAGE_BYTES = 256 << 20

#: Connect codes (https://connectrpc.com/docs/protocol#error-codes).
CONNECT_CODES = frozenset(
    {
        "canceled",
        "unknown",
        "invalid_argument",
        "deadline_exceeded",
        "not_found",
        "already_exists",
        "permission_denied",
        "resource_exhausted",
        "failed_precondition",
        "aborted",
        "out_of_range",
        "unimplemented",
        "internal",
        "unavailable",
        "data_loss",
        "unauthenticated",
    }
)


class ProtocolError(Exception):
    """The bytes received do not follow the Connect framing."""


def encode_envelope(message: Any, flags: int = 0) -> bytes:
    """One enveloped JSON message.

    >>> encode_envelope({"a": 1})
    b'\\x00\\x00\\x00\\x00\\x07{"a":1}'
    """
    payload = json.dumps(message, separators=(",", ":")).encode()
    return _HEADER.pack(flags, len(payload)) + payload


class EnvelopeDecoder:
    """Incremental envelope parser: feed it bytes as they arrive, get whole messages out.

    >>> d = EnvelopeDecoder()
    >>> list(d.feed(encode_envelope({"a": 1})[:3]))
    []
    >>> list(d.feed(encode_envelope({"a": 1})[3:]))
    [(0, b'{"a":1}')]
    """

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_message_bytes

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        self._buf += data
        while len(self._buf) >= _HEADER.size:
            flags, length = _HEADER.unpack_from(self._buf)
            if length > self._max:
                raise ProtocolError(f"envelope of {length} bytes exceeds the {self._max}-byte limit")
            end = _HEADER.size + length
            if len(self._buf) < end:
                return
            payload = bytes(self._buf[_HEADER.size : end])
            del self._buf[:end]
            yield flags, payload

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole envelope."""
        return len(self._buf)


def decode_message(payload: bytes, flags: int = 0) -> dict[str, Any]:
    """The JSON object inside one envelope."""
    if flags & FLAG_COMPRESSED:
        raise ProtocolError("received a compressed envelope, but no compression was negotiated")
    try:
        value = json.loads(payload or b"{}")
    except ValueError as e:
        raise ProtocolError(f"envelope is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"envelope holds {type(value).__name__}, expected an object")
    return value


def end_stream_error(message: dict[str, Any]) -> Optional[tuple[str, str]]:
    """``(code, message)`` of the error carried by an end-of-stream message, if any."""
    err = message.get("error")
    if not err:
        return None
    if not isinstance(err, dict):
        return ("unknown", str(err))
    code = err.get("code") or "unknown"
    return (str(code), str(err.get("message") or ""))


def unary_error(body: bytes) -> Optional[tuple[str, str]]:
    """``(code, message)`` of a Connect unary error body ``{"code": "not_found", ...}``.

    Returns None when the body is not a Connect error (for example the backend's own JSON
    error ``{"code": 404, "message": ...}`` whose code is a number, or plain text).
    """
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    code = value.get("code")
    if isinstance(code, str) and code in CONNECT_CODES:
        return (code, str(value.get("message") or ""))
    return None


def timeout_header(seconds: Optional[float]) -> dict[str, str]:
    """The ``Connect-Timeout-Ms`` header for a deadline (none for no deadline)."""
    if not seconds or seconds <= 0:
        return {}
    return {"Connect-Timeout-Ms": str(max(1, int(seconds * 1000)))}
