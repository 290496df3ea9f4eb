"""Harness for the guest agent tests: runs the agent on the host as a subprocess.

Other ``test_agent_*`` modules import the fixtures from here. The agent is started with
``--skip all`` so that ``/init`` never touches the host's clock, hostname, machine id or
RNG (``test_agent_identity`` covers those in namespaces).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from trenvx.guest.client import AgentClient

#: The agent subprocess imports ``trenvx.guest.agent`` from here (no install needed).
SRC = Path(__file__).resolve().parents[2] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class AgentProcess:
    """A running agent subprocess."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_agent(tmp_dir: Path, *extra: str, prefix: list[str] | None = None,
                env: dict[str, str] | None = None) -> AgentProcess:
    """Start ``python -m trenvx.guest.agent`` on a free port and wait for /health."""
    port = free_port()
    log_path = tmp_dir / f"agent-{port}.log"
    full_env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    full_env.update(env or {})
    argv = [*(prefix or []), sys.executable, "-m", "trenvx.guest.agent", "--host", "127.0.0.1",
            "--port", str(port), *extra]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    agent = AgentProcess(proc, port, log_path)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited early ({proc.returncode}):\n{agent.log()}")
        try:
            if httpx.get(agent.url + "/health", timeout=1).status_code == 204:
                return agent
        except httpx.TransportError:
            time.sleep(0.02)
    agent.stop()
    raise RuntimeError(f"agent did not become healthy:\n{agent.log()}")


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """One agent per test module (no access token set)."""
    a = start_agent(tmp_path_factory.mktemp("agent"), "--skip", "all")
    yield a
    a.stop()
    assert a.proc.returncode is not None


@pytest.fixture
def fresh_agent(tmp_path: Path) -> Iterator[AgentProcess]:
    """An agent of its own, for tests that change its state (tokens, defaults)."""
    a = start_agent(tmp_path, "--skip", "all")
    yield a
    a.stop()


@pytest.fixture
async def client(agent: AgentProcess) -> AsyncIterator[AgentClient]:
    c = AgentClient(agent.url, timeout=30)
    yield c
    await c.aclose()


def test_agent_starts_and_is_healthy(agent: AgentProcess) -> None:
    response = httpx.get(agent.url + "/health")
    assert response.status_code == 204
    assert response.content == b""


async def test_wait_healthy_and_timeout(agent: AgentProcess) -> None:
    async with AgentClient(agent.url) as c:
        await c.wait_healthy(5)
        assert await c.health()
    # Nothing listens on a fresh port: wait_healthy must give up in about the deadline.
    async with AgentClient(f"http://127.0.0.1:{free_port()}") as c:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await c.wait_healthy(0.3)
        assert time.monotonic() - started < 2.5
        assert not await c.health()


async def test_wait_healthy_catches_a_late_agent(tmp_path: Path) -> None:
    """The agent starts after wait_healthy began polling: the first answer ends the wait."""
    import asyncio

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    async with AgentClient(f"http://127.0.0.1:{port}") as c:
        waiter = asyncio.create_task(c.wait_healthy(30))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        proc = subprocess.Popen([sys.executable, "-m", "trenvx.guest.agent", "--host", "127.0.0.1",
                                 "--port", str(port), "--skip", "all"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await asyncio.wait_for(waiter, 20)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:  # a loaded host: what is tested here is the wait, not the stop
                proc.kill()
                proc.wait(10)


def test_agent_runs_standalone_as_trenvx_agent(tmp_path: Path) -> None:
    """Copied as the package ``trenvx_agent`` (as in the guest), with no site-packages at all
    (``python -S -I``): proves the agent is standard-library-only with relative imports."""
    import shutil

    opt = tmp_path / "opt"
    shutil.copytree(SRC / "trenvx" / "guest" / "agent", opt / "trenvx_agent",
                    ignore=shutil.ignore_patterns("__pycache__"))
    port = free_port()
    env = {"PYTHONPATH": str(opt), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    proc = subprocess.Popen([sys.executable, "-S", "-m", "trenvx_agent", "--host", "127.0.0.1",
                             "--port", str(port), "--skip", "all"], env=env, cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 204:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        response = httpx.post(f"http://127.0.0.1:{port}/process.Process/List", json={})
        assert response.status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)
