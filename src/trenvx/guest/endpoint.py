"""Where the host reaches a guest's agent: a TCP address, or a port behind a hybrid vsock socket.

Plain values (no I/O) shared by the VMM drivers, which say where their guest's agent is, and by
the host-side client (:mod:`trenvx.guest.channel`, :mod:`trenvx.guest.vsock`), which connects.

- :class:`TcpEndpoint`: QEMU's user networking forwards a host TCP port on 127.0.0.1 into the
  guest; a tap address is a TCP endpoint too.
- :class:`HybridVsockEndpoint`: Firecracker and Cloud Hypervisor expose the guest's vsock as a
  unix socket on the host; a connection to it says ``CONNECT <port>\\n``, the VMM answers
  ``OK <n>\\n`` and from then on the bytes are the guest port's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

VSOCK_BASE_URL = "http://vsock"
"""Base URL of requests sent over a hybrid vsock socket (the host name is not used to connect)."""


@dataclass(frozen=True)
class TcpEndpoint:
    """The agent at ``host:port`` over TCP."""

    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def describe(self) -> str:
        return f"tcp {self.host}:{self.port}"


@dataclass(frozen=True)
class HybridVsockEndpoint:
    """The agent at vsock ``port`` of the guest whose VMM listens on the unix socket ``uds_path``."""

    uds_path: Path
    port: int

    @property
    def base_url(self) -> str:
        return VSOCK_BASE_URL

    def describe(self) -> str:
        return f"vsock port {self.port} via {self.uds_path}"


AgentEndpoint = TcpEndpoint | HybridVsockEndpoint

__all__ = ["AgentEndpoint", "HybridVsockEndpoint", "TcpEndpoint", "VSOCK_BASE_URL"]
