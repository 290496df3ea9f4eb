"""Port relays: servers bound to the guest's loopback, reachable from the host (E2B's envd port forwarding).

A server started with ``--bind 127.0.0.1`` listens only on the guest's loopback, while the host's
connections arrive on the guest's own address (10.0.2.15 under QEMU's user networking, and behind
the network namespace's DNAT). E2B's envd makes such servers reachable by relaying the port from
the guest's address to loopback. Here the relay is made on demand, never by polling (an idle guest
must not wake up): when the host's proxy finds a sandbox port closed, it asks the agent
(``POST /ports/forward``, :meth:`PortForwarder.forward`) and tries once more.

- The relay listens on the guest address the host used to reach the agent: the local address of
  the request's own connection (:meth:`~.httpio.Exchange.local_address`). Over vsock, which has no
  IP address, on every non-loopback IPv4 address of the guest (from ``/proc/net/fib_trie``).
- It relays each connection to ``127.0.0.1:PORT`` (or ``[::1]:PORT``), both directions, half-closes
  passed on; one thread per direction, blocked in ``recv`` (no timers, no wakeups while idle).
- It is made once per (address, port): asking again answers at once. Nothing is relayed when the
  port already listens on the guest address or a wildcard address (the host reaches it directly).
- It closes when the loopback server goes away (the first connection it relays is refused; an
  explicit forward request also checks), after :data:`IDLE_CLOSE_S` without connections (so that
  the port is free again for a server that wants to bind every address; the proxy makes a new
  relay on its next connection), and when the agent stops.
- At most :data:`MAX_RELAYS` relays and :data:`MAX_CONNECTIONS` connections per relay.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("trenvx_agent.ports")

MAX_RELAYS = 64
"""Relays alive at once (each is one listening socket and one thread)."""
MAX_CONNECTIONS = 256
"""Connections one relay carries at once (two threads each); more are closed as they arrive."""
IDLE_CLOSE_S = 600.0
"""A relay with no connection for this long closes (one wakeup per idle period, only while a relay exists)."""
CONNECT_TIMEOUT_S = 5.0
"""Connecting to the loopback server; a refusal is immediate, this bounds a stalled accept queue."""
BUFFER = 1 << 16

LOOPBACK_TARGETS = ("127.0.0.1", "::1")
"""Where loopback-only servers listen, in the order they are tried."""
_TCP_LISTEN = "0A"


class NothingListens(Exception):
    """Nothing listens on the port on the guest's loopback: there is nothing to relay."""


class TooManyRelays(Exception):
    """:data:`MAX_RELAYS` relays exist already."""


class NoGuestAddress(Exception):
    """The guest has no address a relay could listen on."""


def _normalize(address: str) -> str:
    """``::ffff:10.0.2.15`` -> ``10.0.2.15``; other addresses unchanged."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return address


def _proc_address(hex_addr: str) -> str:
    """An address of /proc/net/tcp{,6}: 32-bit words in host byte order, printed in hex."""
    words = [int(hex_addr[i:i + 8], 16) for i in range(0, len(hex_addr), 8)]
    raw = b"".join(struct.pack("=I", w) for w in words)
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return _normalize(socket.inet_ntop(family, raw))


def listening_sockets(proc_net: str = "/proc/net") -> set[tuple[str, int]] | None:
    """(address, port) of every listening TCP socket of this network namespace; None if unreadable."""
    found: set[tuple[str, int]] = set()
    readable = False
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{proc_net}/{name}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            cols = line.split()
            if len(cols) < 4 or cols[3] != _TCP_LISTEN:
                continue
            addr, _, port = cols[1].partition(":")
            try:
                found.add((_proc_address(addr), int(port, 16)))
            except (ValueError, OSError):
                continue
    return found if readable else None


def guest_addresses(fib_trie: str = "/proc/net/fib_trie") -> list[str]:
    """The guest's own non-loopback IPv4 addresses (the ``/32 host LOCAL`` leaves of the FIB)."""
    try:
        with open(fib_trie) as f:
            text = f.read()
    except OSError:
        return []
    out: list[str] = []
    leaf: str | None = None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(("|--", "+--")):
            leaf = s[3:].split()[0].split("/")[0] if s[3:].split() else None
        elif s.startswith("/32 host LOCAL") and leaf and not leaf.startswith("127.") and leaf not in out:
            out.append(leaf)
    return out


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _probe(address: str, port: int) -> bool:
    """Whether a TCP connect to ``address:port`` succeeds (only when /proc/net is unreadable)."""
    try:
        with socket.create_connection((address, port), timeout=1.0):
            return True
    except OSError:
        return False


class PortRelay:
    """One relay: listens on ``address:port`` and relays each connection to ``target:port``.

    ``on_close(relay)`` is called once when it closes, from whichever thread closes it.
    """

    def __init__(self, address: str, port: int, target: str, *, on_close: Callable[[PortRelay], None] | None = None,
                 idle_close_s: float = IDLE_CLOSE_S, max_connections: int = MAX_CONNECTIONS) -> None:
        self.address = address
        self.port = port
        self.target = target
        self.idle_close_s = idle_close_s
        self.max_connections = max_connections
        self.closed = threading.Event()
        self.close_reason = ""
        self._on_close = on_close
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        """Both sockets of every connection being relayed."""
        self._lock = threading.Lock()
        self._last_active = time.monotonic()

    def __repr__(self) -> str:
        return f"PortRelay({self.address}:{self.port} -> {self.target}:{self.port})"

    @property
    def connections(self) -> int:
        """Connections relayed right now."""
        with self._lock:
            return len(self._conns) // 2

    def describe(self) -> dict[str, object]:
        return {"address": self.address, "port": self.port, "target": self.target, "connections": self.connections}

    def start(self) -> None:
        """Listen and start accepting (in a daemon thread). Raises OSError when the address is taken."""
        sock = socket.socket(_family(self.address), socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.address, self.port))
            sock.listen(128)
            sock.settimeout(self.idle_close_s)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        threading.Thread(target=self._accept_loop, name=f"relay-{self.address}:{self.port}", daemon=True).start()
        log.info("relaying %s:%d to %s:%d", self.address, self.port, self.target, self.port)

    def close(self, reason: str, *, connections: bool = True) -> None:
        """Stop listening (and, by default, end the connections being relayed). Idempotent."""
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
            self.close_reason = reason
            conns = list(self._conns) if connections else []
        listener = self._listener
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the relay's thread
            listener.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        log.info("relay %s:%d -> %s:%d closed: %s", self.address, self.port, self.target, self.port, reason)
        if self._on_close is not None:
            self._on_close(self)

    # -- threads ---------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self.closed.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                with self._lock:
                    idle = not self._conns and time.monotonic() - self._last_active >= self.idle_close_s
                if idle:
                    self.close(f"no connection for {self.idle_close_s:.0f} s")
                continue
            except OSError:
                if not self.closed.is_set():
                    self.close("the listening socket failed")
                return
            client.settimeout(None)
            with self._lock:
                full = len(self._conns) // 2 >= self.max_connections
            if full:
                log.warning("relay %s:%d: %d connections already, closing a new one", self.address, self.port,
                            self.max_connections)
                client.close()
                continue
            threading.Thread(target=self._connection, args=(client,), daemon=True,
                             name=f"relay-{self.port}-conn").start()

    def _connection(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection((self.target, self.port), timeout=CONNECT_TIMEOUT_S)
        except ConnectionRefusedError:
            client.close()
            self.close(f"nothing listens on {self.target}:{self.port} any more")
            return
        except OSError as e:
            log.info("relay %s:%d: cannot reach %s:%d: %s", self.address, self.port, self.target, self.port, e)
            client.close()
            return
        upstream.settimeout(None)
        for s in (client, upstream):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if self.closed.is_set():
                client.close()
                upstream.close()
                return
            self._conns.update((client, upstream))
        try:
            back = threading.Thread(target=_pipe, args=(upstream, client), daemon=True, name=f"relay-{self.port}-back")
            back.start()
            _pipe(client, upstream)
            back.join()
        finally:
            with self._lock:
                self._conns.discard(client)
                self._conns.discard(upstream)
                self._last_active = time.monotonic()
            client.close()
            upstream.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` to ``dst`` until EOF (then half-close ``dst``); on an error, end both directions."""
    try:
        while True:
            data = src.recv(BUFFER)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        return
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


@dataclass(frozen=True)
class ForwardResult:
    """What :meth:`PortForwarder.forward` did."""

    port: int
    forwarded: bool
    """A relay carries the port from ``addresses`` to ``target`` now."""
    addresses: list[str]
    target: str | None
    created: bool
    """The relay was made by this call (False: it existed, or none was needed)."""
    message: str

    def as_json(self) -> dict[str, object]:
        return {"port": self.port, "forwarded": self.forwarded, "addresses": self.addresses,
                "target": self.target, "created": self.created, "message": self.message}


class PortForwarder:
    """The agent's relays, keyed by (listen address, port)."""

    def __init__(self, *, max_relays: int = MAX_RELAYS, idle_close_s: float = IDLE_CLOSE_S,
                 max_connections: int = MAX_CONNECTIONS, proc_net: str = "/proc/net") -> None:
        self.max_relays = max_relays
        self.idle_close_s = idle_close_s
        self.max_connections = max_connections
        self.proc_net = proc_net
        self._relays: dict[tuple[str, int], PortRelay] = {}
        self._lock = threading.RLock()  # reentrant: forward() closes relays, whose on_close drops them

    def relays(self) -> list[PortRelay]:
        """The relays alive now."""
        with self._lock:
            return list(self._relays.values())

    def forward(self, port: int, local_address: str | None) -> ForwardResult:
        """Make ``port`` of the guest's loopback reachable on ``local_address`` (the address the host used).

        ``local_address`` None (the request came over vsock): on every non-loopback IPv4 address of
        the guest. Raises :class:`NothingListens`, :class:`TooManyRelays`, :class:`NoGuestAddress`.
        """
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is not a TCP port (1-65535)")
        addresses = [_normalize(local_address)] if local_address else guest_addresses(f"{self.proc_net}/fib_trie")
        if not addresses:
            raise NoGuestAddress("the sandbox has no non-loopback IPv4 address to relay the port on")
        listeners = listening_sockets(self.proc_net)
        target = self._loopback_target(port, listeners)
        created = False
        relayed: list[str] = []
        direct: list[str] = []
        with self._lock:
            for address in addresses:
                relay = self._relays.get((address, port))
                if relay is not None and not relay.closed.is_set():
                    if target is None:
                        relay.close(f"nothing listens on {relay.target}:{port} any more")
                        continue
                    relayed.append(address)
                    continue
                if self._listens_on(listeners, address, port):
                    direct.append(address)
                    continue
                if target is None:
                    continue
                if len(self._relays) >= self.max_relays:
                    raise TooManyRelays(f"{self.max_relays} ports are relayed already; no more relays in this sandbox")
                relay = PortRelay(address, port, target, on_close=self._forget, idle_close_s=self.idle_close_s,
                                  max_connections=self.max_connections)
                try:
                    relay.start()
                except OSError as e:
                    if e.errno == errno.EADDRINUSE:  # a server bound the address meanwhile
                        direct.append(address)
                        continue
                    raise
                self._relays[(address, port)] = relay
                relayed.append(address)
                created = True
        if relayed:
            where = ", ".join(f"{a}:{port}" for a in relayed)
            return ForwardResult(port, True, relayed, target, created,
                                 f"{where} relayed to {target}:{port}" if target else f"{where} relayed")
        if direct:
            where = ", ".join(f"{a}:{port}" for a in direct)
            return ForwardResult(port, False, direct, None, False,
                                 f"port {port} already listens on {where}: nothing to relay")
        raise NothingListens(f"nothing listens on port {port} in the sandbox (neither on 127.0.0.1 nor on ::1, "
                             f"nor on {', '.join(addresses)})")

    def shutdown(self) -> None:
        """Close every relay and its connections (the agent is stopping)."""
        for relay in self.relays():
            relay.close("the agent is stopping")

    # -- helpers ---------------------------------------------------------------------------------

    def _forget(self, relay: PortRelay) -> None:
        """A relay closed: drop it (called by the relay, from its own thread or from :meth:`forward`)."""
        with self._lock:
            if self._relays.get((relay.address, relay.port)) is relay:
                del self._relays[(relay.address, relay.port)]

    @staticmethod
    def _listens_on(listeners: set[tuple[str, int]] | None, address: str, port: int) -> bool:
        if listeners is None:
            return False  # unknown: try the relay; a bind conflict then says it listens
        if (address, port) in listeners:
            return True
        # A socket on "::" takes IPv4 too unless it is v6only, which /proc does not say: assume it does.
        return ("::", port) in listeners or (_family(address) == socket.AF_INET and ("0.0.0.0", port) in listeners)

    @staticmethod
    def _loopback_target(port: int, listeners: set[tuple[str, int]] | None) -> str | None:
        for target in LOOPBACK_TARGETS:
            if (listeners is not None and (target, port) in listeners) or (listeners is None and _probe(target, port)):
                return target
        return None


__all__ = [
    "ForwardResult", "NoGuestAddress", "NothingListens", "PortForwarder", "PortRelay", "TooManyRelays",
    "guest_addresses", "listening_sockets",
]
