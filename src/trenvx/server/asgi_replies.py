"""Small ASGI pieces the middlewares in front of the API share (the sandbox proxy, the cluster's
router, the body limit): a request header, and an error answered in the API's JSON shape."""

from __future__ import annotations

from typing import Any

from .errors import error_body


def header_of(scope: dict[str, Any], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case) of the request, or None."""
    return next((v for k, v in scope.get("headers", ()) if k == name), None)


async def respond_error(send: Any, status: int, message: str, headers: dict[str, str] | None = None,
                        **extra: Any) -> None:
    """Answer ``{"code", "message", ...extra}`` with ``status`` (and ``headers``)."""
    body = error_body(status, message, **extra)
    more = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *more]})
    await send({"type": "http.response.body", "body": body})
