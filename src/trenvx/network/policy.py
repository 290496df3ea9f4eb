"""A sandbox's egress rules, in E2B's shapes, and the decisions made from them.

E2B's create body carries ``allow_internet_access`` and ``network: {allowOut, denyOut, dnsServers,
allowPublicTraffic, ...}``; ``PUT /sandboxes/{id}/network`` replaces the egress part. The rules:

- A destination IP in ``allowOut`` (an IP or a CIDR) is allowed, whatever ``denyOut`` says
  (allow wins over deny); else one in ``denyOut`` is denied; else it is allowed.
- ``allow_internet_access = false`` is ``denyOut = ["0.0.0.0/0"]``.
- Domains in ``allowOut`` (``example.com``, ``*.example.com``; ``denyOut`` takes no domains)
  allow a TCP connection to an otherwise denied IP when the connection names an allowed domain:
  the HTTP ``Host`` of its first request or the TLS SNI of its ClientHello. A DNS answer is not
  proof of anything, so it never opens an IP. A wildcard matches subdomains at any depth, not the
  apex (E2B's rule): ``*.example.com`` matches ``a.example.com`` and ``a.b.example.com``.
- DNS (the sandbox's resolver, answered by the host): every name while the IP rules let the
  sandbox reach the public resolvers anyway; only allowed domains when they do not (so that a
  denied sandbox cannot tunnel data out through DNS queries); nothing when egress is off.
- When ``allowOut`` has a domain, the ``dnsServers`` IPs (default ``8.8.8.8``, as E2B) are
  allowed too.

The operator's ``[network] blocked_cidrs`` (link-local, private ranges, ... see
:mod:`trenvx.config`) are never reachable, whatever a sandbox's rules say: they are enforced
below these rules.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

ALL_TRAFFIC = "0.0.0.0/0"
DEFAULT_DNS_SERVERS = ("8.8.8.8",)
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")

IPv4Net = ipaddress.IPv4Network


class PolicyError(ValueError):
    """An egress rule is malformed; the message names the entry and the field."""


def _net(entry: str, field_name: str) -> IPv4Net | None:
    """``entry`` as an IPv4 network, None if it is not an IP or CIDR."""
    try:
        return ipaddress.IPv4Network(entry, strict=False)
    except ValueError:
        pass
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return None
    raise PolicyError(f"{field_name}: {entry!r} is an IPv6 address; sandboxes have IPv4 egress only")


def normalize_domain(entry: str, field_name: str = "allowOut") -> str:
    """``entry`` as a lowercase domain or ``*.domain`` pattern; :class:`PolicyError` if it is not one."""
    d = entry.strip().lower().rstrip(".")
    body = d[2:] if d.startswith("*.") else d
    labels = body.split(".")
    if not body or len(body) > 253 or not all(_LABEL.match(lb) for lb in labels):
        raise PolicyError(
            f"{field_name}: {entry!r} is neither an IPv4 address, a CIDR block (e.g. 10.1.0.0/16) nor a "
            "domain name (e.g. example.com or *.example.com)"
        )
    if d.startswith("*.") and len(labels) < 1:
        raise PolicyError(f"{field_name}: {entry!r}: a bare '*' is not a domain")
    return d


def domain_matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Does host name ``name`` match one of ``patterns`` (exact names, or ``*.suffix`` for subdomains)?"""
    n = name.strip().lower().rstrip(".")
    if not n:
        return False
    for p in patterns:
        if p.startswith("*."):
            if n.endswith(p[1:]) and len(n) > len(p) - 1:
                return True
        elif n == p:
            return True
    return False


@dataclass(frozen=True)
class EgressPolicy:
    """What a sandbox may reach outside. The default (no fields) allows everything not blocked by the operator."""

    allow_cidrs: tuple[IPv4Net, ...] = ()
    deny_cidrs: tuple[IPv4Net, ...] = ()
    allow_domains: tuple[str, ...] = ()
    dns_servers: tuple[str, ...] = DEFAULT_DNS_SERVERS
    allow_out: tuple[str, ...] = field(default=(), compare=False)
    """The ``allowOut`` entries as given (normalised), for ``GET /sandboxes/{id}``."""
    deny_out: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_e2b(
        cls,
        *,
        allow_internet_access: bool | None = None,
        allow_out: list[str] | None = None,
        deny_out: list[str] | None = None,
        dns_servers: list[str] | None = None,
    ) -> "EgressPolicy":
        """Parse E2B's fields (``allowOut``, ``denyOut``, ``dnsServers``, ``allow_internet_access``)."""
        allow_nets: list[IPv4Net] = []
        domains: list[str] = []
        allow_given: list[str] = []
        for entry in allow_out or []:
            if not isinstance(entry, str) or not entry.strip():
                raise PolicyError(f"allowOut: {entry!r} is not an IP, CIDR or domain")
            net = _net(entry.strip(), "allowOut")
            if net is not None:
                allow_nets.append(net)
                allow_given.append(str(net) if net.prefixlen < 32 else str(net.network_address))
            else:
                d = normalize_domain(entry, "allowOut")
                domains.append(d)
                allow_given.append(d)
        deny_nets: list[IPv4Net] = []
        deny_given: list[str] = []
        for entry in deny_out or []:
            if not isinstance(entry, str) or not entry.strip():
                raise PolicyError(f"denyOut: {entry!r} is not an IP or CIDR")
            net = _net(entry.strip(), "denyOut")
            if net is None:
                raise PolicyError(
                    f"denyOut: {entry!r} is not an IPv4 address or CIDR block (denyOut takes no domain names; "
                    "to allow only some domains, deny 0.0.0.0/0 and list the domains in allowOut)"
                )
            deny_nets.append(net)
            deny_given.append(str(net) if net.prefixlen < 32 else str(net.network_address))
        if allow_internet_access is False and ALL_TRAFFIC not in deny_given:
            deny_nets.append(ipaddress.IPv4Network(ALL_TRAFFIC))
            deny_given.append(ALL_TRAFFIC)
        servers: list[str] = []
        for s in DEFAULT_DNS_SERVERS if dns_servers is None else dns_servers:
            try:
                servers.append(str(ipaddress.IPv4Address(s)))
            except (ipaddress.AddressValueError, ValueError):
                raise PolicyError(f"dnsServers: {s!r} is not an IPv4 address") from None
        return cls(
            allow_cidrs=tuple(dict.fromkeys(allow_nets)), deny_cidrs=tuple(dict.fromkeys(deny_nets)),
            allow_domains=tuple(dict.fromkeys(domains)), dns_servers=tuple(servers),
            allow_out=tuple(dict.fromkeys(allow_given)), deny_out=tuple(dict.fromkeys(deny_given)),
        )

    # -- decisions -------------------------------------------------------------------------

    @property
    def is_default(self) -> bool:
        """No rules at all: everything the operator does not block is reachable."""
        return not (self.allow_cidrs or self.deny_cidrs or self.allow_domains)

    @property
    def internet_off(self) -> bool:
        """Everything is denied and nothing is allowed: no egress at all, no DNS."""
        return (
            any(n.prefixlen == 0 for n in self.deny_cidrs) and not self.allow_cidrs and not self.allow_domains
        )

    @property
    def opened_cidrs(self) -> tuple[IPv4Net, ...]:
        """The allowed networks, with the DNS servers when a domain is allowed (as E2B)."""
        extra = tuple(ipaddress.IPv4Network(s) for s in self.dns_servers) if self.allow_domains else ()
        return tuple(dict.fromkeys(self.allow_cidrs + extra))

    def ip_allowed(self, ip: str) -> bool:
        """May a packet go to ``ip``, by its address alone (allow wins over deny; default allow)?"""
        a = ipaddress.IPv4Address(ip)
        if any(a in n for n in self.opened_cidrs):
            return True
        return not any(a in n for n in self.deny_cidrs)

    def domain_allowed(self, name: str) -> bool:
        """Does ``name`` (a Host header or TLS SNI) match an allowed domain?"""
        return domain_matches(name, self.allow_domains)

    def dns_allowed(self, qname: str) -> bool:
        """Is a DNS query for ``qname`` answered?

        As open as the IP rules already make DNS: when they let the sandbox reach the public
        resolvers (``dnsServers``, 8.8.8.8 by default) without the opening a domain rule adds,
        every name resolves (refusing here would stop nothing); when they do not (``0.0.0.0/0``
        denied, say), only allowed domains resolve, so that DNS is no tunnel out; with egress off,
        nothing does."""
        if self.internet_off:
            return False
        if all(self._ip_allowed_by_rules(s) for s in self.dns_servers or DEFAULT_DNS_SERVERS):
            return True
        return self.domain_allowed(qname)

    def _ip_allowed_by_rules(self, ip: str) -> bool:
        a = ipaddress.IPv4Address(ip)
        return any(a in n for n in self.allow_cidrs) or not any(a in n for n in self.deny_cidrs)

    def to_e2b(self) -> dict[str, object]:
        """The ``network`` egress fields of ``GET /sandboxes/{id}``, in E2B's names."""
        out: dict[str, object] = {"allowOut": list(self.allow_out), "denyOut": list(self.deny_out)}
        if self.allow_domains:
            out["dnsServers"] = list(self.dns_servers)
        return out


DEFAULT_POLICY = EgressPolicy()
NO_EGRESS = EgressPolicy.from_e2b(allow_internet_access=False)
