"""Entry point: ``python3 -m trenvx_agent --port 49983`` (guest) or
``python -m trenvx.guest.agent --host 127.0.0.1 --port N`` (host tests)."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from types import FrameType

from . import DEFAULT_PORT, __version__
from .freeze import Freezer, SystemOps
from .identity import SYSTEM_STEPS, SystemIdentity
from .server import Agent, AgentHTTPServer
from .vsock import start_vsock_listener, stop_vsock_listener


IDLE_POLL_S = 3600.0
"""How often the idle accept loop wakes on its own. Under TCG every guest wakeup costs emulated
work, and idle sandboxes' wakeups added up to whole cores on a host holding a hundred of them; the
loop wakes for connections, and :func:`_wake` makes a shutdown prompt."""


def _wake(address: tuple[str, int] | tuple[str, int, int, int]) -> None:
    """Connect to our own listening socket so that ``serve_forever`` sees a shutdown request now."""
    host, port = str(address[0]), int(address[1])
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1" if host != "::" else "::1"
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trenvx_agent", description="trenvx guest agent (envd-compatible)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    parser.add_argument(
        "--skip", action="append", default=[], choices=[*SYSTEM_STEPS, "freeze", "all"],
        help="an /init step not to apply to the system, or 'freeze' (no /freeze of the filesystems); "
             "repeatable; 'all' for host tests. Freezing is also off unless the agent listens on all addresses",
    )
    parser.add_argument("--etc-dir", default="/etc", help="where hostname, hosts and machine-id live")
    parser.add_argument("--poll-watch", action="store_true", help="watch directories by polling instead of inotify")
    parser.add_argument(
        "--vsock", choices=("auto", "on", "off"), default="auto",
        help="also listen on vsock port --port; auto: when listening on all addresses (in a VM), "
             "not when bound to one address (host tests)",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s trenvx-agent %(levelname)s %(name)s: %(message)s",
    )
    skip = {*SYSTEM_STEPS, "freeze"} if "all" in args.skip else set(args.skip)
    # Only an agent in a VM freezes filesystems (they are its sandbox's disks): one on a host
    # (tests bind it to 127.0.0.1) must never freeze the host's.
    in_vm = args.host in ("0.0.0.0", "::", "")
    freezer = Freezer(SystemOps() if in_vm and "freeze" not in skip else None)
    agent = Agent(system=SystemIdentity(skip=skip, etc=args.etc_dir), force_polling_watch=args.poll_watch,
                  freezer=freezer)
    server = AgentHTTPServer((args.host, args.port), agent)
    log = logging.getLogger("trenvx_agent")
    want_vsock = args.vsock == "on" or (args.vsock == "auto" and args.host in ("0.0.0.0", "::", ""))
    vsock_server = start_vsock_listener(agent, args.port) if want_vsock else None

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()
        threading.Thread(target=_wake, args=(server.server_address,), daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    log.info("trenvx agent %s listening on %s:%d", __version__, host, port)
    try:
        server.serve_forever(poll_interval=IDLE_POLL_S)
    finally:
        stop_vsock_listener(vsock_server)
        agent.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
