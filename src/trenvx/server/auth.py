"""API keys: when ``orchestrator.api_key`` is set, every API call carries it in ``X-API-Key``.

Compared in constant time (:func:`hmac.compare_digest` on bytes). ``/health`` and the OpenAPI
document stay open; traffic to sandboxes through the proxy is authorised per sandbox instead
(the envd access token, checked by each sandbox's own agent).
"""

from __future__ import annotations

import hmac

from fastapi import Request, Security
from fastapi.security import APIKeyHeader

from .errors import ApiError

API_KEY_HEADER = "X-API-Key"

api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="The server's API key, when one is configured.")


def key_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison; an empty ``expected`` means no key is required."""
    if not expected:
        return True
    if given is None:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8", "surrogateescape"))


async def require_api_key(request: Request, key: str | None = Security(api_key_header)) -> None:
    expected: str = request.app.state.api_key
    if not expected:
        return
    if key is None:
        raise ApiError(401, f"missing {API_KEY_HEADER} header: this server requires an API key",
                       {"WWW-Authenticate": API_KEY_HEADER})
    if not key_matches(expected, key):
        raise ApiError(401, "invalid API key", {"WWW-Authenticate": API_KEY_HEADER})
