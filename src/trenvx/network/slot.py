"""Network slots: a network namespace per sandbox, joined to the host by a veth pair.

One slot, as the guest and the host see it::

    guest eth0 10.0.2.15/24 (in every snapshot, the same in every sandbox)
      |  virtio-net, QEMU's tap backend; QEMU itself runs in the namespace
    tap0 10.0.2.2/24 (+10.0.2.3/32 for DNS), MAC 52:55:0a:00:02:02       \\
      |  nftables in the namespace: DNAT slot address -> guest,          | namespace trenvx-N
      |  SNAT guest -> slot address, egress rules, the DNS and egress    |
      |  proxy sockets (opened by the server inside the namespace)       |
    eth0 = slot address (10.200.x.(4N+2)/30)                             /
      |  veth pair
    host tvsN = host address (10.200.x.(4N+1)/30); host nftables: the host and other slots
      are out of reach, blocked_cidrs dropped, egress masqueraded

The gateway keeps the address and MAC of QEMU's user networking (10.0.2.2, 52:55:0a:00:02:02),
so a guest restored from a snapshot finds its ARP entry and its routes valid as they were.

Slot numbers are claimed host-wide under ``/run/trenvx/net/slots/`` (one file per slot, created
with O_EXCL, naming the data_root that owns it), so several servers on one host (the test suite
runs some) never collide on names or addresses, and a server that restarts finds the slots it
left behind: the ones of sandboxes it adopts are taken back, the others removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import ipaddress
import json
import logging
import os
import random
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ..config import NetworkConfig
from . import netns, nft
from .dns import DnsForwarder
from .egress_proxy import EgressProxy
from .policy import DEFAULT_POLICY, NO_EGRESS, EgressPolicy

log = logging.getLogger(__name__)

GUEST_IP = "10.0.2.15"
GATEWAY_IP = "10.0.2.2"
GATEWAY_MAC = "52:55:0a:00:02:02"
DNS_IP = "10.0.2.3"
TAP = "tap0"
NS_UPLINK = "eth0"
HOST_IF_PREFIX = "tvs"
NETNS_PREFIX = "trenvx-"
PROXY_PORT = 15001
NEW_FLOWS_PER_S = 1000
"""New connections (any protocol) a sandbox may open per second; beyond: refused."""
MAX_FLOWS = 8192
"""Connections a sandbox may have tracked at once (its share of the host's conntrack table)."""
DNS_PER_S = 200
"""DNS queries a sandbox may send per second; beyond: dropped."""
DEFAULT_DNS_UPSTREAMS = (("8.8.8.8", 53), ("1.1.1.1", 53))
"""Public resolvers asked for sandboxes unless ``[network] dns_upstreams`` says otherwise. Asked
from the sandbox's namespace, so never the host's own resolver (which knows the host's LAN names)."""
CLAIMS_DIR = Path("/run/trenvx/net/slots")
FORWARD_BEFORE = CLAIMS_DIR.parent / "ip_forward.before"
"""The host's ``net.ipv4.ip_forward`` before the first slot (kept until the host reboots)."""


class SlotError(RuntimeError):
    """A slot could not be made, configured or removed; the message says which step and why."""


def owner_id(data_root: Path) -> str:
    """A short stable id of a server's data_root: the owner of its slots and host rules."""
    return hashlib.sha256(str(Path(data_root).resolve()).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class SlotAddress:
    """Names and addresses of slot ``index`` (pure arithmetic on the slot CIDR)."""

    index: int
    host_ip: str
    slot_ip: str

    @property
    def netns(self) -> str:
        return f"{NETNS_PREFIX}{self.index}"

    @property
    def host_if(self) -> str:
        return f"{HOST_IF_PREFIX}{self.index}"

    @classmethod
    def of(cls, index: int, cidr: str) -> "SlotAddress":
        net = ipaddress.IPv4Network(cidr)
        if not 0 <= index < capacity(cidr):
            raise SlotError(f"slot {index} is outside {cidr} ({capacity(cidr)} slots)")
        base = int(net.network_address) + 4 * index
        return cls(index, str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2)))


def capacity(cidr: str) -> int:
    return ipaddress.IPv4Network(cidr).num_addresses // 4


# -- rules ------------------------------------------------------------------------------------


def _elements(nets: tuple[ipaddress.IPv4Network, ...] | list[str]) -> str:
    return ", ".join(str(n) for n in nets)


def namespace_ruleset(addr: SlotAddress, blocked: list[str]) -> str:
    """The nftables table of a slot's namespace (without a sandbox's rules: see :func:`policy_script`).

    Order matters and is deliberate:

    - a packet from the guest with another source address is dropped before any NAT (no spoofing);
    - the host (and only the host: ``saddr`` is the host end of the veth) reaches the guest
      through DNAT; a late reply meant for an earlier tenant of this slot number is not the host's
      and finds nothing in a fresh namespace;
    - every packet from the guest to the outside is judged by the rules, established or not, so
      that replacing the rules (``PUT /network``) cuts the connections they no longer allow; the
      guest's side of connections the host opened (DNATed: its agent, its servers) passes;
    - only TCP to ports 80 and 443 of a denied address goes to the egress proxy (domains are
      matched on HTTP Host and TLS SNI, E2B's rule): any other port of a denied address is refused,
      or a name claimed in a first request would open a tunnel to anywhere;
    - new connections, DNS queries and tracked flows are limited per slot, so that one tenant
      cannot exhaust the host's conntrack table or the server's resolver.
    """
    blocked_set = f"elements = {{ {_elements(blocked)} }}" if blocked else ""
    web = "{ 80, 443 }"
    return f"""
table ip trenvx {{
    set blocked {{ type ipv4_addr; flags interval; auto-merge; {blocked_set} }}
    set allow {{ type ipv4_addr; flags interval; auto-merge; }}
    set deny {{ type ipv4_addr; flags interval; auto-merge; }}
    chain domains {{ }}
    chain refuse {{
        meta l4proto tcp reject with tcp reset
        reject with icmp type admin-prohibited
    }}
    chain spoof {{
        type filter hook prerouting priority raw; policy accept;
        iifname "{TAP}" ip saddr != {GUEST_IP} drop
    }}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{NS_UPLINK}" ip saddr {addr.host_ip} ip daddr {addr.slot_ip} dnat to {GUEST_IP}
        iifname "{TAP}" ip daddr {{ {GATEWAY_IP}, {DNS_IP} }} return
        iifname "{TAP}" ip daddr @blocked return
        iifname "{TAP}" meta l4proto tcp tcp dport {web} ip daddr != @allow ip daddr @deny jump domains
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{NS_UPLINK}" ip saddr {GUEST_IP} snat to {addr.slot_ip}
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        iifname "{TAP}" ip saddr != {GUEST_IP} drop
        iifname "{TAP}" oifname "{NS_UPLINK}" ct status dnat accept
        iifname "{TAP}" oifname "{NS_UPLINK}" ip daddr @blocked jump refuse
        iifname "{TAP}" oifname "{NS_UPLINK}" ct state new limit rate over {NEW_FLOWS_PER_S}/second burst {NEW_FLOWS_PER_S} packets jump refuse
        iifname "{TAP}" oifname "{NS_UPLINK}" ct state new ct count over {MAX_FLOWS} jump refuse
        iifname "{TAP}" oifname "{NS_UPLINK}" ip daddr @allow accept
        iifname "{TAP}" oifname "{NS_UPLINK}" ip daddr @deny jump refuse
        iifname "{TAP}" oifname "{NS_UPLINK}" accept
        iifname "{NS_UPLINK}" oifname "{TAP}" ct state established,related accept
        iifname "{NS_UPLINK}" oifname "{TAP}" ct status dnat accept
    }}
    chain input {{
        type filter hook input priority filter; policy drop;
        iifname "{TAP}" ip saddr != {GUEST_IP} drop
        ct state established,related accept
        iifname "lo" accept
        iifname "{TAP}" ip daddr {DNS_IP} udp dport 53 limit rate {DNS_PER_S}/second burst {DNS_PER_S} packets accept
        iifname "{TAP}" tcp dport {PROXY_PORT} ct status dnat accept
        iifname "{TAP}" jump refuse
    }}
    chain output {{
        type filter hook output priority filter; policy accept;
        oifname "{NS_UPLINK}" ip daddr @blocked jump refuse
    }}
}}
"""


def reload_script(addr: SlotAddress, blocked: list[str], policy: EgressPolicy) -> str:
    """The whole table of a slot replaced in one transaction, with ``policy`` loaded: for a slot
    taken back after a restart (its table may be an older trenvx's, or ``blocked`` may have changed)."""
    return "add table ip trenvx\ndelete table ip trenvx\n" + namespace_ruleset(addr, blocked) + policy_script(policy)


def policy_script(policy: EgressPolicy) -> str:
    """One transaction that replaces a slot's egress rules with ``policy``."""
    lines = ["flush set ip trenvx allow", "flush set ip trenvx deny", "flush chain ip trenvx domains"]
    if policy.opened_cidrs:
        lines.append(f"add element ip trenvx allow {{ {_elements(policy.opened_cidrs)} }}")
    if policy.deny_cidrs:
        lines.append(f"add element ip trenvx deny {{ {_elements(policy.deny_cidrs)} }}")
    if policy.allow_domains:
        # Denied TCP goes to the egress proxy, which lets through what names an allowed domain.
        lines.append(f"add rule ip trenvx domains meta l4proto tcp redirect to :{PROXY_PORT}")
    return "\n".join(lines) + "\n"


def host_ruleset(table: str, cfg: NetworkConfig, *, host_was_router: bool = True) -> str:
    """The host's table for one owner's slots: the host and other slots out of reach, egress NAT;
    unless the host forwarded before trenvx, no forwarding that involves no slot."""
    nonat = f"ip daddr != {{ {_elements(cfg.route_without_nat)} }} " if cfg.route_without_nat else ""
    not_router = "" if host_was_router else (
        f'iifname != "{HOST_IF_PREFIX}*" oifname != "{HOST_IF_PREFIX}*" drop')
    return f"""
table inet {table} {{
    chain input {{
        type filter hook input priority filter - 5; policy accept;
        iifname "{HOST_IF_PREFIX}*" ct state established,related accept
        iifname "{HOST_IF_PREFIX}*" drop
    }}
    chain forward {{
        type filter hook forward priority filter - 5; policy accept;
        oifname "{HOST_IF_PREFIX}*" ct state established,related accept
        oifname "{HOST_IF_PREFIX}*" drop
        iifname "{HOST_IF_PREFIX}*" ip daddr {{ {_elements(cfg.blocked_cidrs) or '0.0.0.0/32'} }} drop
        iifname "{HOST_IF_PREFIX}*" meta nfproto ipv6 drop
        {not_router}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat - 5; policy accept;
        ip saddr {cfg.slot_cidr} oifname != "{HOST_IF_PREFIX}*" {nonat}masquerade
    }}
}}
"""


# -- one slot ---------------------------------------------------------------------------------


@dataclass(eq=False)
class NetworkSlot:
    """A configured namespace a VMM can run in; owned by one sandbox (or pooled VM) at a time."""

    address: SlotAddress
    egress: EgressPolicy | None = DEFAULT_POLICY
    """The rules loaded in the namespace; None: unknown (a slot taken back after a restart)."""
    _services: list[DnsForwarder | EgressProxy] = field(default_factory=list, repr=False)
    _rules_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @property
    def netns(self) -> str:
        return self.address.netns

    @property
    def index(self) -> int:
        return self.address.index

    @property
    def guest_address(self) -> str:
        """Where the host reaches the guest's ports (DNAT to the guest in the namespace)."""
        return self.address.slot_ip

    def vm_fields(self) -> dict[str, str]:
        """What a VMM needs to run in this slot (``VmSpec`` fields): the tap, the namespace, the
        address the host reaches the guest at."""
        return {"net_tap": TAP, "netns": self.netns, "guest_address": self.guest_address}

    def current_egress(self) -> EgressPolicy:
        """The rules the DNS forwarder and the egress proxy decide by (none known: nothing allowed)."""
        return self.egress if self.egress is not None else NO_EGRESS

    async def apply(self, policy: EgressPolicy) -> None:
        """Replace the slot's egress rules (one nftables transaction in its namespace). Concurrent
        calls apply in turn, so the rules recorded are always the rules loaded."""
        async with self._rules_lock:
            if self.egress is not None and policy == self.egress:
                return
            await netns.call_in(self.netns, nft.run, policy_script(policy))
            self.egress = policy
            for service in self._services:
                if isinstance(service, EgressProxy):
                    service.recheck()  # connections through the proxy are judged again too

    async def reload(self, policy: EgressPolicy, blocked: list[str]) -> None:
        """Replace the slot's whole table (this trenvx's rules, ``blocked``) and load ``policy``,
        in one transaction: for a slot taken back after a restart."""
        async with self._rules_lock:
            await netns.call_in(self.netns, nft.run, reload_script(self.address, blocked, policy))
            self.egress = policy

    async def open_services(self, upstreams: list[tuple[str, int]], forbidden: list[str]) -> None:
        """The DNS forwarder and the egress proxy of this slot: sockets inside its namespace,
        served by this process. Their own outgoing sockets are made inside the namespace too, so
        the operator's blocked ranges apply to them as to the guest."""
        dns_sock = await netns.asocket_in(self.netns, socket.AF_INET, socket.SOCK_DGRAM)
        proxy_sock: socket.socket | None = None
        try:
            dns_sock.bind((DNS_IP, 53))
            dns_sock.setblocking(False)
            proxy_sock = await netns.asocket_in(self.netns, socket.AF_INET, socket.SOCK_STREAM)
            proxy_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            proxy_sock.bind((GATEWAY_IP, PROXY_PORT))
            proxy_sock.listen(128)
            proxy_sock.setblocking(False)
        except BaseException:
            dns_sock.close()
            if proxy_sock is not None:
                proxy_sock.close()
            raise
        dns = DnsForwarder(dns_sock, self.current_egress, upstreams, name=self.netns,
                           upstream_socket=self._udp_out)
        # The proxy dials from inside the namespace: never the operator's blocked ranges, the slots
        # (this host's), or the namespace's own addresses (the rules drop those before the
        # redirect too; this is the second fence).
        proxy = EgressProxy(proxy_sock, self.current_egress, self._connect_out, name=self.netns,
                            forbidden=[*forbidden, self.address.host_ip, self.address.slot_ip])
        await dns.start()
        try:
            await proxy.start()
        except BaseException:
            await dns.aclose()
            proxy_sock.close()
            raise
        self._services = [dns, proxy]

    async def _udp_out(self) -> socket.socket:
        return await netns.asocket_in(self.netns, socket.AF_INET, socket.SOCK_DGRAM, per_tenant=True)

    async def _connect_out(self, host: str, port: int) -> socket.socket:
        """A TCP connection from inside the namespace (for the egress proxy's upstream side)."""
        sock = await netns.asocket_in(self.netns, socket.AF_INET, socket.SOCK_STREAM, per_tenant=True)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), 10.0)
        except BaseException:
            sock.close()
            raise
        return sock

    async def close_services(self) -> None:
        services, self._services = self._services, []
        for s in services:
            with contextlib.suppress(Exception):
                await s.aclose()


# -- the host's slots ---------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    return pid > 0 and psutil.pid_exists(pid)


def _resolvers(cfg: NetworkConfig) -> list[tuple[str, int]]:
    if not cfg.dns_upstreams:
        return list(DEFAULT_DNS_UPSTREAMS)
    out = []
    for entry in cfg.dns_upstreams:
        host, _, port = entry.partition(":")
        out.append((host, int(port or 53)))
    return out


class HostNetwork:
    """The slots of one server (one data_root) and the host rules that fence them.

    :meth:`start` sets the host up (forwarding, the owner's nftables table) and removes slots a
    previous run of this owner left, except the ones named in ``keep`` (taken back with
    :meth:`adopt`); :meth:`acquire` hands out a slot (from the pool of ready ones, else made on
    the spot); :meth:`release` destroys it (a slot is never reused: a fresh namespace carries no
    connection state of its previous sandbox) and the pool refills in the background.
    """

    def __init__(self, cfg: NetworkConfig, data_root: Path, *, owner: str = "", outlive_process: bool = False) -> None:
        self.cfg = cfg
        self.owner = owner or owner_id(data_root)
        """Whose slots these are: a server's data_root, or ``build_<pid>`` for a template build."""
        self.outlive_process = outlive_process
        """The VMs in these slots outlive this process (``--keep``): its slots are left for the
        next server of the same data_root, never swept by another owner."""
        self.table = f"trenvx_{self.owner}_{os.getpid()}"
        self._forbidden = [*cfg.blocked_cidrs, cfg.slot_cidr]
        self._ready: deque[NetworkSlot] = deque()
        self._slots: dict[int, NetworkSlot] = {}
        self._making: set[int] = set()
        self._upstreams = _resolvers(cfg)
        self._refill: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False

    # -- start and stop

    async def start(self, keep: set[int] | frozenset[int] = frozenset(), *, sweep: bool = True) -> None:
        await netns.call_host(self._setup_host)
        if not sweep:
            return
        removed = await self.sweep(keep)
        if removed:
            log.info("removed %d network slots a previous server left: %s", len(removed), removed)
        if self.cfg.slot_pool > 0:
            self._refill = asyncio.get_running_loop().create_task(self._refill_loop(), name="slot-pool")

    def _setup_host(self) -> None:
        # Slots need the host to forward. A host that did not forward before keeps not forwarding
        # anything else: the host table then drops forwarding that involves no slot.
        CLAIMS_DIR.mkdir(parents=True, exist_ok=True)
        before = FORWARD_BEFORE.read_text().strip() if FORWARD_BEFORE.exists() else ""
        if not before:
            before = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
            FORWARD_BEFORE.write_text(before + "\n")
        netns.write_sysctl("net.ipv4.ip_forward", "1")
        nft.run(f"add table inet {self.table}\ndelete table inet {self.table}\n"
                + host_ruleset(self.table, self.cfg, host_was_router=before == "1"))

    async def close(self, keep: set[int] | frozenset[int] = frozenset()) -> None:
        """Destroy every slot but ``keep`` (slots of sandboxes left running); drop the host table
        when nothing is kept."""
        self._closed = True
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refill
        self._ready.clear()
        for slot in list(self._slots.values()):
            if slot.index in keep:
                await slot.close_services()
                self._slots.pop(slot.index, None)
            else:
                await self.release(slot)
        await self.sweep(keep)
        if not keep and not self._claims():
            with contextlib.suppress(Exception):
                await netns.call_host(nft.run, f"delete table inet {self.table}\n")

    # -- claims

    def _claim_path(self, index: int) -> Path:
        return CLAIMS_DIR / str(index)

    def _claim(self, index: int) -> bool:
        CLAIMS_DIR.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self._claim_path(index), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"owner": self.owner, "pid": os.getpid(), "keep": self.outlive_process, "at": time.time()}, f)
        return True

    @staticmethod
    def _all_claims() -> dict[int, dict[str, object]]:
        out: dict[int, dict[str, object]] = {}
        try:
            entries = list(CLAIMS_DIR.iterdir())
        except FileNotFoundError:
            return out
        for p in entries:
            try:
                if p.name.isdigit():
                    out[int(p.name)] = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
        return out

    def _claims(self) -> list[int]:
        """Slot numbers claimed by this owner (any process of it, alive or not), and those whose
        process is gone without leaving them to a successor (a crashed build, test or server
        whose VMs died with it), whoever owned them."""
        out = []
        for index, info in self._all_claims().items():
            pid = int(info.get("pid", 0) or 0)  # type: ignore[call-overload]
            gone = pid != os.getpid() and not _pid_alive(pid)
            # Another live process of this owner (a benchmark's manager on a server's data_root)
            # is never swept: its slots are its own.
            mine = info.get("owner") == self.owner and (pid == os.getpid() or gone)
            if mine or (gone and not info.get("keep")):
                out.append(index)
        return sorted(out)

    def _sweep_tables(self) -> None:
        """Drop host tables of processes that are gone and left no slot to a successor; and this
        owner's tables of earlier runs."""
        kept_owners = {str(i.get("owner")) for i in self._all_claims().values() if i.get("keep")}
        for line in nft.run("list tables inet").splitlines():
            words = line.split()
            name = words[-1] if words else ""
            parts = name.split("_")
            if not name.startswith("trenvx_") or name == self.table or not parts[-1].isdigit():
                continue
            owner, pid = "_".join(parts[1:-1]), int(parts[-1])
            if _pid_alive(pid):
                continue  # a live server's fence, whoever it is
            if owner == self.owner or owner not in kept_owners:
                with contextlib.suppress(nft.NftError):
                    nft.run(f"delete table inet {name}\n")

    def _free_index(self) -> int:
        n = capacity(self.cfg.slot_cidr)
        start = random.randrange(n)
        for i in range(n):
            index = (start + i) % n
            if self._claim(index):
                return index
        raise SlotError(f"all {n} network slots of {self.cfg.slot_cidr} are taken; use a larger [network] slot_cidr")

    # -- make and destroy

    async def _make(self) -> NetworkSlot:
        index = self._free_index()
        addr = SlotAddress.of(index, self.cfg.slot_cidr)
        slot = NetworkSlot(addr)
        self._making.add(index)  # a sweep running meanwhile must leave it alone
        try:
            await self._teardown(addr)  # leftovers of a crashed run under the same number
            await netns.create(addr.netns)
            await netns.call_host(self._make_host_side, addr)
            await netns.call_in(addr.netns, self._make_inside, addr, self.cfg.blocked_cidrs)
            await slot.open_services(self._upstreams, self._forbidden)
        except BaseException as e:
            await slot.close_services()
            await self._teardown(addr)
            self._claim_path(index).unlink(missing_ok=True)
            if isinstance(e, (OSError, nft.NftError, netns.NetnsError)):
                raise SlotError(f"cannot make network slot {index}: {e}") from e
            raise
        finally:
            self._making.discard(index)
        self._slots[index] = slot
        return slot

    @staticmethod
    def _make_host_side(addr: SlotAddress) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.link("add", ifname=addr.host_if, kind="veth", peer={"ifname": NS_UPLINK, "net_ns_fd": addr.netns})
            idx = ipr.link_lookup(ifname=addr.host_if)[0]
            ipr.addr("add", index=idx, address=addr.host_ip, prefixlen=30)
            ipr.link("set", index=idx, state="up")

    @staticmethod
    def _make_inside(addr: SlotAddress, blocked: list[str]) -> None:
        from pyroute2 import IPRoute

        for key in ("net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"):
            with contextlib.suppress(OSError):
                netns.write_sysctl(key, "1")
        netns.write_sysctl("net.ipv4.ip_forward", "1")
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            up = ipr.link_lookup(ifname=NS_UPLINK)[0]
            ipr.addr("add", index=up, address=addr.slot_ip, prefixlen=30)
            ipr.link("set", index=up, state="up")
            ipr.link("add", ifname=TAP, kind="tuntap", mode="tap")
            tap = ipr.link_lookup(ifname=TAP)[0]
            ipr.link("set", index=tap, address=GATEWAY_MAC)
            ipr.addr("add", index=tap, address=GATEWAY_IP, prefixlen=24)
            ipr.addr("add", index=tap, address=DNS_IP, prefixlen=32)
            ipr.link("set", index=tap, state="up")
            ipr.route("add", dst="default", gateway=addr.host_ip)
        nft.run(namespace_ruleset(addr, blocked))

    async def _teardown(self, addr: SlotAddress) -> None:
        netns.delete(addr.netns)
        await netns.call_host(self._delete_host_if, addr.host_if)

    @staticmethod
    def _delete_host_if(name: str) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if found:
                try:
                    ipr.link("del", index=found[0])
                except NetlinkError as e:
                    if e.code != errno.ENODEV:
                        raise

    async def release(self, slot: NetworkSlot) -> None:
        """Destroy a slot (its sandbox ended): services, namespace, veth, claim."""
        self._slots.pop(slot.index, None)
        with contextlib.suppress(ValueError):
            self._ready.remove(slot)
        await slot.close_services()
        try:
            await self._teardown(slot.address)
        finally:
            self._claim_path(slot.index).unlink(missing_ok=True)
        self._wake.set()

    async def sweep(self, keep: set[int] | frozenset[int] = frozenset()) -> list[int]:
        """Remove this owner's slots that no live object holds and ``keep`` does not name."""
        removed = []
        for index in self._claims():
            if index in keep or index in self._slots or index in self._making:
                continue
            addr = SlotAddress.of(index, self.cfg.slot_cidr)
            with contextlib.suppress(Exception):
                await self._teardown(addr)
            self._claim_path(index).unlink(missing_ok=True)
            removed.append(index)
        # Namespaces named like slots that nobody claims (a claim always comes first): leftovers.
        claimed = self._all_claims()
        for name in netns.names(NETNS_PREFIX):
            suffix = name[len(NETNS_PREFIX):]
            if suffix.isdigit() and int(suffix) not in claimed and int(suffix) < capacity(self.cfg.slot_cidr):
                with contextlib.suppress(Exception):
                    await self._teardown(SlotAddress.of(int(suffix), self.cfg.slot_cidr))
                removed.append(int(suffix))
        with contextlib.suppress(Exception):
            await netns.call_host(self._sweep_tables)
        return removed

    # -- hand out

    async def acquire(self) -> NetworkSlot:
        """A slot with default rules: a ready one, else one made now (tens of ms)."""
        self._wake.set()
        while self._ready:
            slot = self._ready.popleft()
            if netns.exists(slot.netns):
                return slot
            await self.release(slot)
        return await self._make()

    async def adopt(self, index: int, egress: EgressPolicy) -> NetworkSlot:
        """Take back slot ``index`` of a sandbox a previous server left running, its whole table
        reloaded with the sandbox's ``egress`` rules in one transaction."""
        addr = SlotAddress.of(index, self.cfg.slot_cidr)
        if not netns.exists(addr.netns):
            raise SlotError(f"network slot {index} ({addr.netns}) does not exist anymore")
        slot = NetworkSlot(addr, egress=None)
        await slot.reload(egress, self.cfg.blocked_cidrs)
        await slot.open_services(self._upstreams, self._forbidden)
        self._slots[index] = slot
        return slot

    async def _refill_loop(self) -> None:
        while not self._closed:
            while len(self._ready) < self.cfg.slot_pool and not self._closed:
                try:
                    self._ready.append(await self._make())
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - a pool keeps trying, slowly
                    log.exception("making a network slot for the pool failed; retrying in 5 s")
                    await asyncio.sleep(5)
            self._wake.clear()
            await self._wake.wait()


