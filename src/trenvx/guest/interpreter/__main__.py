"""Entry point: ``PYTHONPATH=/opt/trenvx python3 -m trenvx_interpreter --port 49999`` (guest, as
root) or ``python -m trenvx.guest.interpreter --host 127.0.0.1 --port N`` (host tests)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType

from . import DEFAULT_PORT, __version__
from .contexts import Contexts
from .identity import DEFAULT_MACHINE_ID, IdentityWatch
from .kernel import LaunchSettings
from .server import Interpreter, InterpreterHTTPServer
from .users import resolve_user

IDLE_POLL_S = 3600.0
"""How often the idle accept loop wakes on its own (idle guests should not wake: under TCG each
wakeup is emulated work); a shutdown wakes it by connecting (:func:`_wake`)."""


def _wake(address: tuple[str, int] | tuple[str, int, int, int]) -> None:
    host, port = str(address[0]), int(address[1])
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1" if host != "::" else "::1"
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trenvx_interpreter",
                                     description="trenvx code interpreter (E2B code-interpreter compatible)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    parser.add_argument("--user", default=None,
                        help="account the kernels run as (default: 'user' if it exists, else the server's own)")
    parser.add_argument("--cwd", default="/home/user",
                        help="working directory of contexts that name none (default /home/user; "
                             "the user's home, else /, when it does not exist)")
    parser.add_argument("--runtime-dir", default="/run/trenvx-interpreter",
                        help="where the kernels' connection files go (default /run/trenvx-interpreter)")
    parser.add_argument("--machine-id-file", default=str(DEFAULT_MACHINE_ID),
                        help="file whose change means a new sandbox (restored from a snapshot): "
                             "kernels are reseeded (default /etc/machine-id)")
    parser.add_argument("--max-execution-s", type=float, default=86400.0,
                        help="a cell running longer is interrupted (default 86400; 0: no bound)")
    parser.add_argument("--no-preload", action="store_true",
                        help="do not import numpy, pandas and matplotlib in python kernels at their start")
    parser.add_argument("--startup-timeout-s", type=float, default=180.0,
                        help="how long a kernel may take to start, and its start-up imports "
                             "(default 180: numpy, pandas and matplotlib take long under TCG)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    return parser.parse_args(argv)


def _package_root() -> str:
    """The directory our top-level package lives in (/opt/trenvx in the guest)."""
    depth = (__package__ or "").count(".") + 1
    return str(Path(__file__).resolve().parents[depth])


def kernel_base_env() -> dict[str, str]:
    """The server's environment for its kernels, less the PYTHONPATH entry that made this
    package importable (user code has no business importing the server)."""
    env = dict(os.environ)
    root = _package_root()
    entries = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
               if p and os.path.realpath(p) != os.path.realpath(root)]
    if entries:
        env["PYTHONPATH"] = os.pathsep.join(entries)
    else:
        env.pop("PYTHONPATH", None)
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s trenvx-interpreter %(levelname)s %(name)s: %(message)s",
    )
    log = logging.getLogger("trenvx_interpreter")
    try:
        run_as = resolve_user(args.user)
    except ValueError as exc:
        print(f"trenvx_interpreter: {exc}", file=sys.stderr)
        return 2
    runtime_dir = Path(args.runtime_dir)
    runtime_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(runtime_dir, 0o711)  # kernels running as the user reach their own files by name only
    launch = LaunchSettings(run_as=run_as, runtime_dir=runtime_dir, base_env=kernel_base_env(),
                            preload=not args.no_preload, startup_timeout_s=args.startup_timeout_s,
                            identity_file=args.machine_id_file)
    contexts = Contexts(launch, args.cwd, IdentityWatch(Path(args.machine_id_file)))
    app = Interpreter(contexts, max_execution_s=args.max_execution_s)
    server = InterpreterHTTPServer((args.host, args.port), app)

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()
        threading.Thread(target=_wake, args=(server.server_address,), daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    log.info("trenvx interpreter %s listening on %s:%d; kernels run as %s (uid %d)", __version__, host, port,
             run_as.name, run_as.uid)
    app.start_default_in_background()
    try:
        server.serve_forever(poll_interval=IDLE_POLL_S)
    finally:
        server.server_close()
        app.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
