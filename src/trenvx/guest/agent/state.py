"""The agent's mutable identity: what ``POST /init`` sets and every request reads."""

from __future__ import annotations

import hmac
import threading
from dataclasses import dataclass, field


@dataclass
class AgentState:
    """Sandbox identity, default environment and the access token, shared by all threads."""

    sandbox_id: str | None = None
    #: Environment variables every new process starts with (request envs override them).
    env_vars: dict[str, str] = field(default_factory=dict)
    #: User for requests that name none (``Authorization`` header / ``username`` param).
    default_user: str = "root"
    #: Working directory for processes and relative paths when the request gives none.
    default_workdir: str | None = None
    _token: bytes | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def has_token(self) -> bool:
        return self._token is not None

    def set_token(self, token: str | None) -> None:
        with self._lock:
            self._token = token.encode("utf-8") if token else None

    def token_bytes(self) -> bytes | None:
        """The access token (also the key of signed ``/files`` URLs), None while none is set."""
        return self._token

    def token_matches(self, presented: str | None) -> bool:
        """Constant-time check of an ``X-Access-Token`` header; True when no token is set."""
        token = self._token
        if token is None:
            return True
        if presented is None:
            return False
        return hmac.compare_digest(token, presented.encode("utf-8", "surrogateescape"))

    def update_env(self, env_vars: dict[str, str]) -> None:
        with self._lock:
            self.env_vars = {**self.env_vars, **env_vars}

    def env_snapshot(self) -> dict[str, str]:
        with self._lock:
            return dict(self.env_vars)
