"""Defaults of the SDK (TrEnv-X's ``sandbox_sdk.constants`` names where they still apply)."""

import os

from ._config import DEFAULT_PORT, DEFAULT_REQUEST_TIMEOUT, ENVD_PORT

#: Address of the backend when ``target_addr`` is not given.
BACKEND_ADDR = os.getenv("SANDBOX_BACKEND_ADDR") or "127.0.0.1"
#: Port of the backend's HTTP API (TrEnv-X called it the orchestrator port).
ORCHESTRATOR_PORT = DEFAULT_PORT
#: The backend also proxies requests into sandboxes, on the same port.
SANDBOX_PORT = DEFAULT_PORT
#: Default request timeout of the TrEnv-X surface, in seconds.
TIMEOUT = 60

__all__ = ["BACKEND_ADDR", "ORCHESTRATOR_PORT", "SANDBOX_PORT", "ENVD_PORT", "TIMEOUT", "DEFAULT_REQUEST_TIMEOUT"]
