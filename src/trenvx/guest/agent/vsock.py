"""The agent's second listener: AF_VSOCK, for VMMs that reach the guest over (hybrid) vsock.

Firecracker and Cloud Hypervisor have no port forwarding: the host reaches the guest through its
virtio-vsock device. When the kernel offers AF_VSOCK (the ``vsock`` and
``vmw_vsock_virtio_transport`` modules, loaded by the initramfs), the agent serves the same HTTP
application on vsock port ``port`` as on TCP. Where vsock is absent (QEMU here, host tests) it
logs one line and serves TCP only.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from typing import Any

from .server import IDLE_WORKERS, Agent, AgentHTTPServer, _Handler

log = logging.getLogger("trenvx_agent.vsock")


class _VsockHandler(_Handler):
    disable_nagle_algorithm = False  # TCP_NODELAY does not exist on vsock sockets


class AgentVsockServer(AgentHTTPServer):
    """The agent's HTTP server on ``AF_VSOCK`` (any CID, one port)."""

    address_family = getattr(socket, "AF_VSOCK", -1)

    def __init__(self, port: int, agent: Agent) -> None:
        self.agent = agent
        cid_any = getattr(socket, "VMADDR_CID_ANY", 0xFFFFFFFF)
        socketserver.TCPServer.__init__(self, (cid_any, port), _VsockHandler)
        self.start_workers(IDLE_WORKERS)

    def server_bind(self) -> None:  # HTTPServer's would resolve the CID as a host name
        socketserver.TCPServer.server_bind(self)
        self.server_name = "vsock"
        self.server_port = self.server_address[1]


def start_vsock_listener(agent: Agent, port: int) -> AgentVsockServer | None:
    """Serve ``agent`` on vsock ``port`` in a daemon thread; None (logged) when vsock is unavailable."""
    if not hasattr(socket, "AF_VSOCK"):
        log.info("no vsock listener: this Python has no AF_VSOCK")
        return None
    try:
        server = AgentVsockServer(port, agent)
    except OSError as e:
        log.info("no vsock listener on port %d: %s (no vsock device or module; TCP only)", port, e.strerror or e)
        return None
    # No periodic wakeups while idle (see __main__.IDLE_POLL_S); the thread is a daemon, so the
    # agent's exit does not wait for it.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 3600.0},
                              name="vsock-listener", daemon=True)
    thread.start()
    log.info("listening on vsock port %d", port)
    return server


def stop_vsock_listener(server: Any) -> None:
    if server is not None:
        server.server_close()
