"""Running the server in the foreground: one per data_root, logs, clean stop.

- ``data_root/run/server.lock`` is held (``flock``) for the server's whole life: a second server
  on the same data_root refuses to start and names the pid of the first. A lock held while the
  pid it names is gone is the orphan watchdog's, for a pass of a second or so: the server waits
  for it (up to :data:`LOCK_WAIT_S`).
- The orphan watchdog (:mod:`trenvx.sandbox.orphan_watchdog`) is started with the server: if the
  server dies (SIGKILL, a crash, the OOM killer) its sandboxes keep running for the next server to
  adopt, and if none comes they still end at their timeouts.
- Logs go to stderr and to ``data_root/run/server.log`` (or ``orchestrator.log_file``).
- SIGINT/SIGTERM: uvicorn stops accepting, open streams get a few seconds, then the manager
  kills every sandbox and removes its files -- unless ``keep``, which leaves them running for the
  next server to adopt.
- The API key is ``[orchestrator] api_key``, or ``TRENVX_API_KEY`` in the server's environment
  (which wins, as ``TRENVX_DATA_ROOT`` does; it is the variable sandbox-cli and the SDK read, so
  one ``export`` serves both sides on one machine). Without a key the server listens only on a
  loopback address: any other ``host`` is refused (:class:`UnsafeBind`) before anything starts,
  because whoever reaches the API can take over every sandbox.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..config import Config
from ..layout import DataRoot

log = logging.getLogger("trenvx.server")

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
GRACEFUL_SHUTDOWN_S = 3
LOCK_WAIT_S = 15.0
"""How long a starting server waits for a lock held by no live server (the orphan watchdog's pass)."""


class ServerError(Exception):
    """The server cannot start. The message says why and what to do."""


class UnsafeBind(ServerError):
    """A non-loopback address was asked for without an API key (``trenvx serve`` exits with 2)."""


def resolve_api_key(configured: str) -> tuple[str, str]:
    """(the key, where it came from): ``TRENVX_API_KEY`` if set, else ``[orchestrator] api_key``."""
    from .auth import API_KEY_ENV

    env = os.environ.get(API_KEY_ENV, "").strip()
    if env:
        return env, API_KEY_ENV
    return configured, "config" if configured else ""


def check_bind(host: str, port: int, api_key: str, config_path: str | None = None) -> None:
    """Refuse to listen on anything but loopback without an API key: :class:`UnsafeBind` says how to set one."""
    from .auth import API_KEY_ENV, is_loopback

    if api_key or is_loopback(host):
        return
    where = config_path or "your config file"
    raise UnsafeBind(
        f"refusing to listen on {host or '(all addresses)'}:{port} without an API key: anyone who can reach that "
        "address could list, create, control and take over every sandbox.\n"
        "Set a key, then start again -- either in the config file " + where + ":\n"
        "    [orchestrator]\n"
        '    api_key = "<a long random string>"\n'
        f"or in the server's environment:\n"
        f"    export {API_KEY_ENV}=\"$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')\"\n"
        f"Clients send it as X-API-Key: sandbox-cli reads {API_KEY_ENV} (or --api-key), the SDKs api_key= or "
        f"{API_KEY_ENV} / E2B_API_KEY.\n"
        "Or, for use from this machine only, listen on 127.0.0.1 (the default; --host 127.0.0.1)."
    )


@dataclass
class ServerLock:
    path: Path
    file: IO[str]

    def release(self) -> None:
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
        finally:
            self.file.close()


def _holder_alive(holder: str) -> bool:
    if not holder.isdigit():
        return False
    try:
        os.kill(int(holder), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(run_dir: Path, wait_s: float = LOCK_WAIT_S) -> ServerLock:
    """Hold ``run_dir/server.lock`` or raise :class:`ServerError` naming the server holding it.

    A lock held while the server it names is gone is held by the orphan watchdog for one short
    pass: waited for, up to ``wait_s``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "server.lock"
    f = open(path, "a+")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                f.close()
                raise
        f.seek(0)
        holder = f.read().strip() or "unknown"
        if not _holder_alive(holder) and time.monotonic() < deadline:
            time.sleep(0.05)
            continue
        f.close()
        if not _holder_alive(holder):
            raise ServerError(
                f"data_root {run_dir.parent} stayed locked for {wait_s:.0f} s by a process other than the server "
                f"it names (pid {holder}, gone): the orphan watchdog of a server that died should release it "
                f"within seconds; find the holder with: fuser {path}"
            )
        raise ServerError(
            f"another trenvx server (pid {holder}) is already running on data_root {run_dir.parent}; "
            f"stop it first, or give this one another data_root (TRENVX_DATA_ROOT)"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return ServerLock(path, f)


def setup_logging(log_file: Path, level: str = "info") -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(level.upper())
    fmt = logging.Formatter(LOG_FORMAT)
    for h in list(root.handlers):
        if getattr(h, "_trenvx", False):
            root.removeHandler(h)
    for h in (logging.StreamHandler(sys.stderr), logging.FileHandler(log_file)):
        h.setFormatter(fmt)
        h._trenvx = True  # type: ignore[attr-defined]
        root.addHandler(h)
    for name in ("httpx", "httpcore", "qemu.qmp", "websockets", "hpack"):
        logging.getLogger(name).setLevel(logging.WARNING)


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServerError(
                f"cannot listen on {host}:{port}: {e.strerror}; another program uses the port "
                "([orchestrator] port in the config, or --port)"
            ) from None


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGINT/SIGTERM that stopped it cleanly is not re-raised (exit 0)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def serve(config: Config, *, keep: bool = False, host: str | None = None, port: int | None = None,
          log_level: str = "info", access_log: bool = False) -> None:
    """Run the server in the foreground until SIGINT/SIGTERM. Raises :class:`ServerError`."""
    import uvicorn

    from .app import create_app

    _Server = _server_class()

    api_key, key_source = resolve_api_key(config.orchestrator.api_key)
    orch = config.orchestrator.model_copy(update={
        "keep_on_exit": keep or config.orchestrator.keep_on_exit,
        "api_key": api_key,
        **({"host": host} if host is not None else {}),
        **({"port": port} if port else {}),
    })
    check_bind(orch.host, orch.port, orch.api_key, str(config.source_path) if config.source_path else None)
    config = config.model_copy(update={"orchestrator": orch})
    data_root = DataRoot(config.data_root)
    try:
        data_root.ensure()
    except OSError as e:
        raise ServerError(f"cannot create data_root {config.data_root}: {e.strerror}") from None
    lock = acquire_lock(data_root.run)
    try:
        log_file = Path(orch.log_file) if orch.log_file else data_root.run / "server.log"
        setup_logging(log_file, log_level)
        check_port_free(orch.host, orch.port)
        app = create_app(config, keep=orch.keep_on_exit)
        manager = app.state.manager
        if orch.orphan_watchdog:
            from ..sandbox import orphan_watchdog

            pid = orphan_watchdog.start(data_root, slot_cidr=config.network.slot_cidr if manager.network else "",
                                        log_file=log_file)
            log.info("orphan watchdog started (pid %d): sandboxes outlive a crash of this server and still end at "
                     "their timeouts", pid)
        names = manager.templates.names()
        log.info("trenvx server on http://%s:%d  data_root=%s  templates=%s  api_key=%s  keep=%s  log=%s",
                 orch.host, orch.port, config.data_root, ",".join(names) or "(none built)",
                 f"required (from {key_source})" if orch.api_key else "off (local callers only)",
                 orch.keep_on_exit, log_file)
        for name in names:
            try:
                m = manager.templates.current(name).manifest
                if m.machine.accelerator == "tcg":
                    log.warning("template %s runs under TCG (software emulation, slower): %s", name,
                                m.accelerator_reason)
            except Exception:  # noqa: BLE001
                pass
        if config.default_template not in names:
            log.warning("the default template %r is not built: template-manager --config %s --template %s",
                        config.default_template, config.source_path or "<config>", config.default_template)
        server = _Server(uvicorn.Config(
            app, host=orch.host, port=orch.port, log_config=None, log_level=log_level, access_log=access_log,
            lifespan="on", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, ws="auto",
            ws_max_size=64 * 1024 * 1024, proxy_headers=False, server_header=False,
        ))
        server.run()
        if not server.started:
            raise ServerError("the server failed to start; see the log above")
        log.info("trenvx server stopped")
    finally:
        lock.release()
