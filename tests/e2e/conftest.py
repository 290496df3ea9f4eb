"""Fixtures of the SDK's end-to-end tests: names for the session backends of tests/conftest.py,
and the shipped ``default-sandbox`` template built into the session's data_root."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from tests.e2e.server_helpers import e2b_pointed_at
from trenvx.build_errors import BuildError
from trenvx.config import Config, load_config
from trenvx.template.store import TemplateBuild

REPO = Path(__file__).resolve().parents[2]
SHIPPED = "default-sandbox"
"""The template a create that names none gets (configs/example_config.toml): git, sudo, curl."""

NETWORK_FAILURE = re.compile(r"Temporary failure resolving|Could not resolve|Failed to fetch|Unable to fetch|"
                             r"Network is unreachable|Connection timed out")
"""How apt and debootstrap say that Debian's mirror cannot be reached."""


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


CODE_INTERPRETER = "code-interpreter"
"""The shipped code-interpreter template (configs/example_config.toml, aliases code-interpreter-v1
and default-code-interpreter): a Jupyter kernel with numpy, pandas and matplotlib in its snapshot."""


def shipped_config(e2e_config: Config, name: str = SHIPPED) -> Config:
    """The e2e config (data_root, network) plus the shipped template ``name``, unchanged (its
    Dockerfile resolved against configs/)."""
    example = load_config(REPO / "configs" / "example_config.toml")
    return e2e_config.model_copy(update={"template": {**e2e_config.template, name: example.get_template(name)}})


async def build_shipped(e2e_config: Config, name: str) -> TemplateBuild:
    """The shipped template ``name`` built into the session's data_root (whose templates the
    backends serve), reused while its inputs are unchanged. Skipped, with the reason, only where
    Debian's mirror cannot be reached for its packages."""
    from trenvx.template.builder import TemplateBuilder

    try:
        result = await TemplateBuilder(shipped_config(e2e_config, name)).build(name)
    except BuildError as e:
        if e.stage == "rootfs" and NETWORK_FAILURE.search(str(e)):
            pytest.skip(f"{name} installs packages from Debian's mirror, which is not reachable here: {e}")
        raise
    print(f"\n{name}: {'reused' if result.skipped else 'built'} {result.build.build_id} "
          f"{result.build.manifest.stage_seconds}")
    return result.build


@pytest_asyncio.fixture(scope="session")
async def shipped_template(e2e_config: Config, test_template: str) -> str:
    """default-sandbox, once per run (shared with the demo's: the inputs are the same)."""
    build = await build_shipped(e2e_config, SHIPPED)
    assert (build.default_user, build.default_workdir) == ("user", "/home/user")
    return SHIPPED


@pytest_asyncio.fixture(scope="session")
async def code_interpreter_template(e2e_config: Config, test_template: str) -> str:
    """code-interpreter, once per run; its build records its aliases, so any server of the data
    root answers to them."""
    await build_shipped(e2e_config, CODE_INTERPRETER)
    return CODE_INTERPRETER


CLAUDE_CODE = "claude-code"
"""The shipped claude-code template: code-server on port 8080 serving in its snapshot, Claude Code."""


@pytest_asyncio.fixture(scope="session")
async def claude_code_template(e2e_config: Config, test_template: str) -> str:
    """claude-code, once per run (a large build: reused while its inputs are unchanged)."""
    await build_shipped(e2e_config, CLAUDE_CODE)
    return CLAUDE_CODE


@pytest.fixture
def e2b_env(sdk_backend: str) -> Iterator[str]:
    """E2B's ``e2b`` package pointed at the session backend for one test (see :func:`e2b_pointed_at`);
    a module may override it, e.g. with a module scope or the keyed backend."""
    with e2b_pointed_at(sdk_backend) as url:
        yield url
