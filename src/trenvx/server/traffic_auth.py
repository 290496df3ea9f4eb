"""The traffic access token of a private sandbox, as the proxy accepts it: a header, a URL, a cookie.

A sandbox created with ``network.allowPublicTraffic: false`` answers on its ports (all but the
agent's) only requests that prove they hold its traffic access token. Three ways to prove it:

- **the header** ``e2b-traffic-access-token: <token>`` (E2B's; what programs send);
- **the URL**: a query parameter ``trenvx_token=<token>`` (:data:`TOKEN_PARAM`), for a browser,
  which cannot add a header to a link it opens. The proxy answers such a GET with a redirect to
  the same URL without the parameter, setting the cookie below; the token leaves the address bar
  and the browser's history keeps the URL without it;
- **the cookie** ``trenvx_traffic`` (:data:`COOKIE_NAME`) set by that redirect: HttpOnly,
  SameSite=Lax, Secure over HTTPS, scoped to the origin (host form ``PORT-ID.<domain>``: a
  host-only cookie) or to the path prefix (path form ``/sandboxes/ID/ports/PORT``) it was set for.
  Its value is an HMAC-SHA256 keyed by the token over the sandbox id and port
  (:func:`cookie_value`), never the token itself: it opens only that port of that sandbox, and
  only as long as the sandbox has that token.

Whatever carries it, the token is compared in constant time (:func:`hmac.compare_digest`), and
neither the parameter nor the cookie reaches the sandbox: :func:`take_token_param` removes the
parameter from the query (the caller puts the result back into the ASGI scope, so that the
server's access log records the URL without it) and :func:`without_cookie` removes the cookie from
the ``Cookie`` headers that are forwarded. Refusals keep E2B's two messages (header missing,
token invalid), which E2B's SDKs and users know.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

TRAFFIC_TOKEN_HEADER = b"e2b-traffic-access-token"
"""E2B's header for the traffic access token of a sandbox whose ports are not public."""
TOKEN_PARAM = "trenvx_token"
"""The query parameter that carries the traffic access token in a URL a browser opens."""
COOKIE_NAME = "trenvx_traffic"
"""The cookie that proves, after the redirect, that the browser was given the token."""
_COOKIE_CONTEXT = b"trenvx traffic cookie v1"

Headers = list[tuple[bytes, bytes]]

MISSING = ("Sandbox is secured with traffic access token. "
           f"Token header '{TRAFFIC_TOKEN_HEADER.decode()}' is missing")
INVALID = ("Sandbox is secured with traffic access token. "
           f"Provided token in header '{TRAFFIC_TOKEN_HEADER.decode()}' is invalid")


def cookie_value(sandbox_id: str, port: int, token: str) -> str:
    """The cookie that opens ``port`` of ``sandbox_id`` to a browser given ``token``.

    An HMAC keyed by the token: whoever reads the cookie learns nothing of the token, and a
    cookie of one sandbox or port is worth nothing for another."""
    mac = hmac.new(token.encode(), b"\0".join([_COOKIE_CONTEXT, sandbox_id.encode(), str(port).encode()]),
                   hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def take_token_param(query: bytes) -> tuple[bytes, str | None]:
    """``query`` without :data:`TOKEN_PARAM`, and that parameter's (last) value, None when absent.

    The other parameters are kept byte for byte, in their order."""
    if not query:
        return query, None
    kept: list[bytes] = []
    found: str | None = None
    name = TOKEN_PARAM.encode()
    for part in query.split(b"&"):
        key, _, value = part.partition(b"=")
        if unquote_to_bytes(key.replace(b"+", b" ")) == name:
            found = unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8", "replace")
        else:
            kept.append(part)
    if found is None:
        return query, None
    return b"&".join(kept), found


def _cookie_pairs(value: bytes) -> list[tuple[bytes, bytes]]:
    pairs = []
    for item in value.split(b";"):
        name, _, v = item.strip().partition(b"=")
        if name:
            pairs.append((name.strip(), v.strip()))
    return pairs


def cookies_presented(headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
    """The values of every :data:`COOKIE_NAME` cookie in the request's ``Cookie`` headers."""
    name = COOKIE_NAME.encode()
    return [v.strip(b'"').decode("latin-1") for k, value in headers if k == b"cookie"
            for n, v in _cookie_pairs(value) if n == name]


def without_cookie(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """``headers`` with the :data:`COOKIE_NAME` cookie taken out of the ``Cookie`` headers (a header
    left empty is dropped); the other cookies are kept as the client sent them."""
    name = COOKIE_NAME.encode()
    out: Headers = []
    for k, value in headers:
        if k != b"cookie":
            out.append((k, value))
            continue
        items = [item.strip() for item in value.split(b";") if item.strip()]
        kept = [item for item in items if item.partition(b"=")[0].strip() != name]
        if len(kept) == len(items):
            out.append((k, value))
        elif kept:
            out.append((k, b"; ".join(kept)))
    return out


def sets_cookie(set_cookie_value: bytes) -> bool:
    """Whether an answer's ``Set-Cookie`` value sets :data:`COOKIE_NAME`: the proxy drops such a
    header, so that a sandbox cannot replace the cookie the proxy gave its port."""
    return set_cookie_value.split(b";", 1)[0].partition(b"=")[0].strip() == COOKIE_NAME.encode()


@dataclass(frozen=True)
class Verdict:
    """What the proxy does with a request to a private sandbox's port."""

    refusal: str | None
    """E2B's message for the 403, None when the request may pass."""
    by_param: bool = False
    """It passed by the URL's token: a browser's GET is answered with the cookie and a redirect."""


def check(headers: Sequence[tuple[bytes, bytes]], param: str | None, sandbox_id: str, port: int,
          token: str) -> Verdict:
    """Whether a request with ``headers`` (and the URL's token ``param``) may reach ``port`` of
    ``sandbox_id`` whose traffic access token is ``token``.

    Any one valid credential lets it pass; none presented is E2B's "missing", only wrong ones its
    "invalid". An empty ``token`` never matches: a private sandbox without one answers nobody."""
    header = next((v for k, v in headers if k == TRAFFIC_TOKEN_HEADER), None)
    cookies = cookies_presented(headers)
    if header is None and param is None and not cookies:
        return Verdict(MISSING)
    if not token:
        return Verdict(INVALID)
    secret = token.encode()
    if header is not None and hmac.compare_digest(header.strip(), secret):
        return Verdict(None)
    if param is not None and hmac.compare_digest(param.strip().encode(), secret):
        return Verdict(None, by_param=True)
    expected = cookie_value(sandbox_id, port, token).encode()
    # every presented cookie is compared, so that the time taken does not depend on which one matched
    matches = [hmac.compare_digest(c.encode("latin-1"), expected) for c in cookies]
    return Verdict(None) if any(matches) else Verdict(INVALID)


def set_cookie(sandbox_id: str, port: int, token: str, *, path: str, secure: bool) -> bytes:
    """The ``Set-Cookie`` value that opens ``port`` of ``sandbox_id`` for requests under ``path``
    (``/`` on the port's own host, the path prefix in the path form). A session cookie: it goes
    with the browser session, and is worth nothing once the sandbox is gone."""
    attrs = [f"{COOKIE_NAME}={cookie_value(sandbox_id, port, token)}", f"Path={path}", "HttpOnly", "SameSite=Lax"]
    if secure:
        attrs.append("Secure")
    return "; ".join(attrs).encode("latin-1")


__all__ = ["COOKIE_NAME", "TOKEN_PARAM", "TRAFFIC_TOKEN_HEADER", "Verdict", "check", "cookie_value",
           "cookies_presented", "set_cookie", "sets_cookie", "take_token_param", "without_cookie"]
