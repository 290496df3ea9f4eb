"""Fixtures of the SDK's end-to-end tests: names for the session backends of tests/conftest.py."""

from __future__ import annotations

import httpx
import pytest


@pytest.fixture(scope="session")
def sdk_backend(backend_url: str) -> str:
    """The backend's base URL, e.g. ``http://127.0.0.1:40123``."""
    return backend_url


@pytest.fixture(scope="session")
def backend_port(sdk_backend: str) -> int:
    return httpx.URL(sdk_backend).port or 80


@pytest.fixture(scope="session")
def keyed_backend(keyed_backend_url: str) -> str:
    """A second backend that requires the API key ``right-key``."""
    return keyed_backend_url
