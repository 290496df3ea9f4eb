"""Who may use the API: holders of the API key, or, on a server without one, local callers only.

- **With ``orchestrator.api_key`` set** (or ``TRENVX_API_KEY`` for ``trenvx serve``), every API
  call carries it in ``X-API-Key``; it is compared in constant time (:func:`hmac.compare_digest`
  on bytes). A wrong or missing key is a 401.
- **Without a key**, the API answers only callers on the loopback interface (127.0.0.0/8, ::1, a
  unix socket); anyone else gets a 403 that says how to set a key. ``trenvx serve`` already
  refuses to bind a non-loopback address without a key (see :mod:`.runner`); this check holds
  the same line when the app is served some other way.

``/health`` and the OpenAPI document stay open. Traffic to sandboxes through the proxy
(``E2b-Sandbox-Id``, ``PORT-ID.<domain>`` or ``/sandboxes/ID/ports/PORT/``) never reaches these
routes: it is authorised per sandbox instead, by the sandbox's own agent (the envd access token)
and, for its other ports when ``allowPublicTraffic`` is false, by its traffic access token (a
header, or for a browser a link and then a cookie, see :mod:`.traffic_auth`); the proxy only forwards to
ports of the sandbox named in the request, so it is not a way around this module.

**Who sees a sandbox's tokens.** ``POST /sandboxes``, ``POST /sandboxes/{id}/connect`` and
``GET /sandboxes/{id}`` hand out ``envdAccessToken`` (full control of the sandbox) and
``trafficAccessToken``. They sit behind :func:`require_api_key` like every API route, so the
tokens go only to callers holding the key; on a server without a key, to local callers, who
are the key's holders there (a key would protect nothing from them: they can read the config).
Sandboxes themselves are not local callers: in a network namespace a sandbox cannot reach the
host at all, and under QEMU user networking it is restricted to reach nothing (issue 12), so no
sandbox can ask for another one's tokens.

**Web pages on a server without a key.** A browser on this machine is a local caller, and it may
be showing a page a sandbox serves through the proxy: in the path form
(``/sandboxes/ID/ports/PORT/``) that page even has the API's own origin, so its scripts could read
every sandbox's tokens. A server without a key therefore refuses requests that the browser says a
web page made (:func:`from_web_page`: an ``Origin`` header, or fetch metadata ``Sec-Fetch-Site``
other than ``none``, i.e. anything but an address typed or bookmarked); programs send neither.
Browsers send fetch metadata to loopback addresses and ``localhost`` names, which is how such a
server is reached. A server with a key needs no such rule: pages do not have the key.
"""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import Request, Security
from fastapi.security import APIKeyHeader

from .errors import ApiError

API_KEY_HEADER = "X-API-Key"
API_KEY_ENV = "TRENVX_API_KEY"

HOW_TO_SET_A_KEY = (
    f'set one in the server\'s config ([orchestrator] api_key = "...") or in its environment ({API_KEY_ENV}=...), '
    f"restart it, and send it as {API_KEY_HEADER} (sandbox-cli --api-key or {API_KEY_ENV}; the SDKs: api_key= "
    f"or {API_KEY_ENV} / E2B_API_KEY)"
)

api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="The server's API key, when one is configured.")


def key_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison; an empty ``expected`` means no key is required."""
    if not expected:
        return True
    if given is None:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8", "surrogateescape"))


def is_loopback(host: str | None) -> bool:
    """Is ``host`` (an address or ``localhost``) on the loopback interface? IPv4-mapped IPv6
    (``::ffff:127.0.0.1``) counts; names other than ``localhost`` do not (they are not resolved)."""
    if host is None:
        return False
    h = host.strip().strip("[]").lower()
    if h in ("localhost", "localhost."):
        return True
    try:
        ip = ipaddress.ip_address(h.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def is_local_caller(request: Request) -> bool:
    """A caller on the loopback interface, or over a unix socket (ASGI gives no client address)."""
    client = request.scope.get("client")
    if not client:
        return True
    return is_loopback(str(client[0]))


def from_web_page(request: Request) -> bool:
    """Whether the browser says a web page (its script, form, frame or link) made this request, not
    the user typing an address: an ``Origin`` header, or ``Sec-Fetch-Site`` other than ``none``."""
    if "origin" in request.headers:
        return True
    site = request.headers.get("sec-fetch-site")
    return site is not None and site.strip().lower() != "none"


async def require_api_key(request: Request, key: str | None = Security(api_key_header)) -> None:
    expected: str = request.app.state.api_key
    if not expected:
        if not is_local_caller(request):
            raise ApiError(403, "this trenvx server has no API key, so it answers only callers on this machine "
                                f"(loopback); to use it from elsewhere, {HOW_TO_SET_A_KEY}")
        if from_web_page(request):
            raise ApiError(403, "this trenvx server has no API key, so it does not answer requests made by web "
                                "pages (a page a sandbox serves could otherwise use the API as you); call it from a "
                                f"program, or {HOW_TO_SET_A_KEY}")
        return
    if key is None:
        raise ApiError(401, f"missing {API_KEY_HEADER} header: this server requires an API key",
                       {"WWW-Authenticate": API_KEY_HEADER})
    if not key_matches(expected, key):
        raise ApiError(401, "invalid API key", {"WWW-Authenticate": API_KEY_HEADER})
