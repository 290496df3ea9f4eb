"""Running a real ``trenvx serve`` for end-to-end tests.

Each server gets its own data_root (so its lock, state database and sandbox directories are its
own) whose ``templates``, ``kernels`` and ``cache`` are symlinks to the end-to-end data_root, so
the test template built once per run is shared.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from trenvx.config import AGENT_PORT, Config
from trenvx.guest.client import AgentClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def linked_data_root(base: Path, shared: Config) -> Path:
    """A short path (UNIX socket paths in sandbox dirs must stay under 108 bytes), linked from ``base``."""
    import tempfile

    short = Path(tempfile.mkdtemp(prefix="trx", dir="/tmp"))
    (base / "data-is").write_text(str(short))
    root = short / "data"
    root.mkdir(parents=True, exist_ok=True)
    for name in ("templates", "kernels", "cache"):
        link = root / name
        if not link.exists():
            (shared.data_root / name).mkdir(parents=True, exist_ok=True)
            link.symlink_to(shared.data_root / name)
    return root


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def toml_list(v: list[Any]) -> str:
    return "[" + ", ".join(toml_value(x) for x in v) + "]"


@dataclass
class ServerProc:
    data_root: Path
    config_path: Path
    port: int
    api_key: str = ""
    keep: bool = False
    proc: subprocess.Popen | None = None
    log_path: Path = field(default=Path("/dev/null"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.api_key} if self.api_key else {}

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=kw.pop("timeout", 60), **kw)

    def start(self, keep: bool | None = None, wait: bool = True) -> "ServerProc":
        if keep is not None:
            self.keep = keep
        argv = [sys.executable, "-m", "trenvx.cli.admin", "serve", "--config", str(self.config_path)]
        if self.keep:
            argv.append("--keep")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"server not healthy after {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"the server did not stop within {timeout}s:\n{self.log()}")
        return self.proc.returncode

    def log(self, tail: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-tail:])
        except OSError:
            return ""

    def cleanup(self) -> None:
        """Remove the (short) data_root; its templates/kernels/cache are symlinks, left untouched."""
        import shutil

        if self.proc is not None and self.proc.poll() is None:
            return
        shutil.rmtree(self.data_root.parent, ignore_errors=True)

    def sandbox_dirs(self) -> list[str]:
        d = self.data_root / "sandboxes"
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def make_server(base: Path, shared: Config, *, template: str, api_key: str = "", pools: bool = True,
                network: dict[str, Any] | None = None, **orch: Any) -> ServerProc:
    """A server on its own data_root. ``pools``: the shared config's ``[pool]`` (else none, for tests
    that count the sandbox directories while the server runs: pooled VMs have directories too)."""
    base.mkdir(parents=True, exist_ok=True)
    root = linked_data_root(base, shared)
    port = free_port()
    lines = [f"data_root = {toml_value(str(root))}", "", "[orchestrator]", 'host = "127.0.0.1"', f"port = {port}"]
    if api_key:
        lines.append(f"api_key = {toml_value(api_key)}")
    for k, v in orch.items():
        lines.append(f"{k} = {toml_value(v)}")
    pool = shared.pool
    sizes = (pool.warm_min, pool.warm_max, pool.hot_min, pool.hot_max) if pools else (0, 0, 0, 0)
    lines += ["", "[pool]", *(f"{k} = {v}" for k, v in zip(("warm_min", "warm_max", "hot_min", "hot_max"), sizes)),
              f"hot_warmup_cmd = {toml_value(pool.hot_warmup_cmd)}"]
    net = {**shared.network.model_dump(mode="json"), **(network or {})}
    lines += ["", "[network]", *(f"{k} = {toml_list(v) if isinstance(v, list) else toml_value(v)}" for k, v in net.items())]
    lines += ["", "[template_manager]", f"template_id = {toml_value(template)}", ""]
    cfg = base / "server.toml"
    cfg.write_text("\n".join(lines))
    return ServerProc(data_root=root, config_path=cfg, port=port, api_key=api_key, log_path=base / "server.out")


@contextlib.contextmanager
def running_server(base: Path, shared: Config, *, template: str, **kw: Any) -> Iterator[ServerProc]:
    srv = make_server(base, shared, template=template, **kw).start()
    try:
        yield srv
    finally:
        rc = srv.stop()
        left = srv.sandbox_dirs()
        if not left:
            srv.cleanup()
        assert rc == 0, f"server exit status {rc}:\n{srv.log()}"
        assert left == [], f"sandbox directories left: {left}"


def vm_pid(srv: ServerProc, sandbox_id: str) -> int:
    with srv.client() as c:
        return int(c.get(f"/sandboxes/{sandbox_id}").json()["trenvx"]["pid"])


def wait_until(cond, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())


def pid_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def through_proxy(url: str, sandbox: dict, token: str | None = None) -> AgentClient:
    """The agent of ``sandbox`` (a create response) reached through the server at ``url``."""
    proxy = {"E2b-Sandbox-Id": sandbox["sandboxID"], "E2b-Sandbox-Port": str(AGENT_PORT)}
    return AgentClient(url, access_token=token or sandbox["envdAccessToken"], headers=proxy)


@contextlib.contextmanager
def e2b_pointed_at(url: str, api_key: str = "no-key-configured") -> Iterator[str]:
    """The documented way to point E2B's unmodified ``e2b`` package at a trenvx server: its API
    and sandbox URLs and a key (any value where the server has none); no debug mode, no domain."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("E2B_API_URL", url)
        mp.setenv("E2B_SANDBOX_URL", url)
        mp.setenv("E2B_API_KEY", api_key)
        mp.delenv("E2B_DEBUG", raising=False)
        mp.delenv("E2B_DOMAIN", raising=False)
        yield url

