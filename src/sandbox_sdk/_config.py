"""Where the backend is, which key to present, how long to wait: one resolved place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Optional
from urllib.parse import urlsplit

#: Port of the trenvx backend (HTTP API and proxy to the sandboxes' agents).
DEFAULT_PORT = 5000
#: Port of the guest agent (E2B's envd) inside every sandbox.
ENVD_PORT = 49983
#: Default timeout of one HTTP request, in seconds.
DEFAULT_REQUEST_TIMEOUT = 30.0
#: Default lifetime of a sandbox created through the E2B-style surface, in seconds.
DEFAULT_SANDBOX_TIMEOUT = 300
#: Default limit on one command (E2B's default), in seconds; 0 means no limit.
DEFAULT_COMMAND_TIMEOUT = 60.0
#: How many times a request that is safe to repeat is retried.
DEFAULT_RETRIES = 2

ENV_ADDR = "SANDBOX_BACKEND_ADDR"
ENV_PORT = "SANDBOX_BACKEND_PORT"
ENV_API_URL = "TRENVX_API_URL"
ENV_API_KEYS = ("TRENVX_API_KEY", "E2B_API_KEY")
ENV_DOMAIN = "TRENVX_DOMAIN"


def resolve_api_url(
    target_addr: Optional[str] = None,
    port: Optional[int] = None,
    api_url: Optional[str] = None,
) -> str:
    """The backend's base URL.

    ``api_url`` wins; else ``target_addr`` (a host, ``host:port`` or a full URL); else the
    environment (``TRENVX_API_URL``, then ``SANDBOX_BACKEND_ADDR``); else ``127.0.0.1``. The
    port is ``port``, else ``SANDBOX_BACKEND_PORT``, else 5000.

    >>> resolve_api_url("10.0.0.5")
    'http://10.0.0.5:5000'
    >>> resolve_api_url("example.org:8080")
    'http://example.org:8080'
    >>> resolve_api_url(api_url="https://api.example.org/")
    'https://api.example.org'
    """
    if api_url:
        return api_url.rstrip("/")
    if not target_addr:
        env_url = os.environ.get(ENV_API_URL)
        if env_url:
            return env_url.rstrip("/")
    addr = (target_addr or os.environ.get(ENV_ADDR) or "127.0.0.1").strip()
    if "://" in addr:
        return addr.rstrip("/")
    if port is None:
        env_port = os.environ.get(ENV_PORT)
        port = int(env_port) if env_port else None
    if addr.count(":") > 1 and not addr.startswith("["):  # bare IPv6 literal, no port
        host, addr_port = f"[{addr}]", None
    else:
        parsed = urlsplit("//" + addr)
        host = parsed.hostname or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        addr_port = parsed.port
    if port is None:
        port = addr_port or DEFAULT_PORT
    return f"http://{host}:{port}"


def resolve_api_key(api_key: Optional[str] = None) -> Optional[str]:
    if api_key:
        return api_key
    for name in ENV_API_KEYS:
        value = os.environ.get(name)
        if value:
            return value
    return None


@dataclass(frozen=True)
class ConnectionConfig:
    """Resolved connection settings shared by every request of one sandbox object.

    ``envd_url`` selects the *direct* (debug) mode: requests to the agent go straight to
    that base URL, without the backend's proxy headers.
    """

    api_url: str
    api_key: Optional[str] = None
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    retries: int = DEFAULT_RETRIES
    headers: Dict[str, str] = field(default_factory=dict)
    envd_url: Optional[str] = None
    #: An httpx transport to use instead of the network (tests, custom TLS, proxies).
    transport: Any = None

    @classmethod
    def resolve(
        cls,
        *,
        target_addr: Optional[str] = None,
        port: Optional[int] = None,
        api_url: Optional[str] = None,
        api_key: Optional[str] = None,
        request_timeout: Optional[float] = None,
        headers: Optional[Dict[str, str]] = None,
        envd_url: Optional[str] = None,
        transport: Any = None,
        retries: Optional[int] = None,
    ) -> "ConnectionConfig":
        return cls(
            api_url=resolve_api_url(target_addr, port, api_url),
            api_key=resolve_api_key(api_key),
            request_timeout=DEFAULT_REQUEST_TIMEOUT if request_timeout is None else float(request_timeout),
            retries=DEFAULT_RETRIES if retries is None else int(retries),
            headers=dict(headers or {}),
            envd_url=envd_url.rstrip("/") if envd_url else None,
            transport=transport,
        )

    def timeout(self, value: Optional[float]) -> Optional[float]:
        """A per-call timeout: the given one, else the default; 0 means no limit (None)."""
        if value is None:
            value = self.request_timeout
        return None if value == 0 else float(value)

    def with_(self, **changes: Any) -> "ConnectionConfig":
        return replace(self, **changes)
