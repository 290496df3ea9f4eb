"""Network slots and egress policies without VMs: rule texts, real namespaces (as root), cleanup."""

from __future__ import annotations

import ipaddress
import json
import os
import socket

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trenvx.config import NetworkConfig
from trenvx.network import netns, nft
from trenvx.network.mode import netns_unavailable
from trenvx.network.policy import NO_EGRESS, EgressPolicy, PolicyError, domain_matches
from trenvx.network.slot import (
    CLAIMS_DIR, DNS_IP, GATEWAY_IP, HOST_IF_PREFIX, HostNetwork, SlotAddress, capacity, host_ruleset,
    namespace_ruleset, policy_script,
)

root_only = pytest.mark.skipif(bool(netns_unavailable()), reason=f"needs network namespaces: {netns_unavailable()}")


# -- policies -----------------------------------------------------------------------------------


def test_e2b_rules_allow_wins_over_deny() -> None:
    p = EgressPolicy.from_e2b(allow_out=["1.2.3.4"], deny_out=["0.0.0.0/0"])
    assert p.ip_allowed("1.2.3.4") and not p.ip_allowed("1.2.3.5")
    assert EgressPolicy().ip_allowed("8.8.4.4")
    assert not EgressPolicy.from_e2b(deny_out=["9.9.9.0/24"]).ip_allowed("9.9.9.9")


def test_no_internet_access_is_deny_all_and_no_dns() -> None:
    p = EgressPolicy.from_e2b(allow_internet_access=False)
    assert p.internet_off and p.deny_out == ("0.0.0.0/0",)
    assert not p.dns_allowed("example.com")
    assert p == NO_EGRESS


def test_domains_gate_dns_only_when_something_is_denied() -> None:
    p = EgressPolicy.from_e2b(allow_out=["example.com", "*.wild.test"], deny_out=["0.0.0.0/0"])
    assert p.dns_allowed("example.com") and p.dns_allowed("a.b.wild.test")
    assert not p.dns_allowed("wild.test") and not p.dns_allowed("evil.com")
    assert EgressPolicy.from_e2b(allow_out=["example.com"]).dns_allowed("anything.org")
    # When a domain is allowed, E2B also opens the DNS servers (8.8.8.8 unless told otherwise).
    assert ipaddress.IPv4Network("8.8.8.8/32") in p.opened_cidrs
    assert EgressPolicy.from_e2b(allow_out=["a.com"], deny_out=["0.0.0.0/0"], dns_servers=[]).opened_cidrs == ()


@pytest.mark.parametrize("field,value,needle", [
    ("deny_out", ["example.com"], "denyOut takes no domain"),
    ("allow_out", ["not a domain!"], "neither an IPv4"),
    ("allow_out", ["::1"], "IPv6"),
    ("dns_servers", ["dns.google"], "dnsServers"),
    ("allow_out", [""], "allowOut"),
])
def test_bad_rules_name_the_field_and_entry(field: str, value: list[str], needle: str) -> None:
    with pytest.raises(PolicyError, match=needle):
        EgressPolicy.from_e2b(**{field: value})


@given(st.text(max_size=40), st.lists(st.sampled_from(["example.com", "*.example.com", "a.b"]), max_size=3))
def test_domain_match_never_raises_and_wildcards_skip_the_apex(name: str, patterns: list[str]) -> None:
    got = domain_matches(name, tuple(patterns))
    if got:
        n = name.strip().lower().rstrip(".")
        assert any(n == p or (p.startswith("*.") and n.endswith(p[1:])) for p in patterns)
    assert not domain_matches("example.com", ("*.example.com",))


# -- names and rule texts -------------------------------------------------------------------------


def test_slot_addresses_are_disjoint_30s_and_names_fit_linux() -> None:
    cidr = "10.200.0.0/16"
    assert capacity(cidr) == 16384
    seen = set()
    for i in (0, 1, 2, 16383):
        a = SlotAddress.of(i, cidr)
        assert len(a.host_if) <= 15 and len(a.netns) <= 64
        net = ipaddress.IPv4Network(f"{a.host_ip}/30", strict=False)
        assert ipaddress.IPv4Address(a.slot_ip) in net and net not in seen
        seen.add(net)
    with pytest.raises(Exception, match="outside"):
        SlotAddress.of(16384, cidr)


def test_policy_script_redirects_only_with_domains() -> None:
    assert "redirect" not in policy_script(EgressPolicy.from_e2b(deny_out=["0.0.0.0/0"]))
    s = policy_script(EgressPolicy.from_e2b(allow_out=["x.com", "1.1.1.1"], deny_out=["0.0.0.0/0"]))
    assert "redirect to :" in s and "1.1.1.1/32" in s and "0.0.0.0/0" in s


# -- real namespaces (root) ---------------------------------------------------------------------


policies = st.builds(
    lambda allow, deny, domains, off: EgressPolicy.from_e2b(
        allow_out=allow + domains, deny_out=deny, allow_internet_access=not off),
    st.lists(st.sampled_from(["1.1.1.1", "9.9.0.0/16", "203.0.113.10"]), max_size=3),
    st.lists(st.sampled_from(["0.0.0.0/0", "8.8.8.0/24", "203.0.113.0/24"]), max_size=3),
    st.lists(st.sampled_from(["example.com", "*.wild.test"]), max_size=2),
    st.booleans(),
)


@root_only
@settings(max_examples=25, deadline=None)
@given(policies)
def test_every_policy_loads_into_a_namespace(policy: EgressPolicy) -> None:
    name = f"trenvx-test-{os.getpid()}"
    netns.delete(name)
    netns.run_in_new(name)
    try:
        addr = SlotAddress.of(5, "10.250.0.0/16")
        netns.run_in(name, nft.run, namespace_ruleset(addr, NetworkConfig().blocked_cidrs))
        netns.run_in(name, nft.run, policy_script(policy))
        listed = netns.run_in(name, nft.run, "list set ip trenvx deny")
        assert ("elements" in listed) == bool(policy.deny_cidrs)  # auto-merge may fold entries together
    finally:
        netns.delete(name)


@root_only
def test_host_ruleset_loads_and_is_removed() -> None:
    table = f"trenvx_test{os.getpid()}"
    nft.run(host_ruleset(table, NetworkConfig(route_without_nat=["203.0.113.0/24"])))
    try:
        assert "masquerade" in nft.run(f"list table inet {table}")
    finally:
        nft.run(f"delete table inet {table}")


@root_only
async def test_a_slot_is_made_configured_and_removed_without_leftovers(tmp_path) -> None:
    net = HostNetwork(NetworkConfig(slot_pool=0, dns_upstreams=["127.0.0.1:1"]), tmp_path)
    await net.start()
    try:
        slot = await net.acquire()
        assert netns.exists(slot.netns) and (CLAIMS_DIR / str(slot.index)).exists()
        assert slot.address.host_if in psutil.net_if_addrs()
        claim = json.loads((CLAIMS_DIR / str(slot.index)).read_text())
        assert claim["owner"] == net.owner and claim["pid"] == os.getpid()
        # Inside: the gateway and DNS addresses on the tap, DNS and proxy sockets bound there.
        def inside() -> list[str]:
            return [a.address for n, addrs in psutil.net_if_addrs().items() for a in addrs if a.family == socket.AF_INET]
        assert {GATEWAY_IP, DNS_IP, slot.address.slot_ip} <= set(netns.run_in(slot.netns, inside))
        await slot.apply(EgressPolicy.from_e2b(deny_out=["0.0.0.0/0"], allow_out=["example.com"]))
        assert "redirect" in netns.run_in(slot.netns, nft.run, "list chain ip trenvx domains")
        index, host_if = slot.index, slot.address.host_if
        await net.release(slot)
        assert not netns.exists(f"trenvx-{index}") and not (CLAIMS_DIR / str(index)).exists()
        assert host_if not in psutil.net_if_addrs()
    finally:
        await net.close()
    assert f"trenvx_{net.owner}" not in nft.run("list tables")


@root_only
async def test_a_restarted_owner_keeps_what_it_adopts_and_sweeps_the_rest(tmp_path) -> None:
    cfg = NetworkConfig(slot_pool=0, dns_upstreams=["127.0.0.1:1"])
    first = HostNetwork(cfg, tmp_path)
    await first.start()
    kept, dropped = await first.acquire(), await first.acquire()
    await kept.close_services()
    await dropped.close_services()  # a crash: nothing released
    second = HostNetwork(cfg, tmp_path)
    await second.start(keep={kept.index})
    try:
        assert not netns.exists(dropped.netns) and not (CLAIMS_DIR / str(dropped.index)).exists()
        rules = EgressPolicy.from_e2b(deny_out=["0.0.0.0/0"])
        again = await second.adopt(kept.index, rules)
        # Taken back with its whole table reloaded and its own rules loaded in the same transaction.
        assert again.netns == kept.netns and again.egress == rules
        assert "0.0.0.0/0" in netns.run_in(again.netns, nft.run, "list set ip trenvx deny")
    finally:
        await second.close()
    assert not netns.exists(kept.netns)
    assert not any(n.startswith(HOST_IF_PREFIX) and n[3:] in (str(kept.index), str(dropped.index))
                   for n in psutil.net_if_addrs())


@root_only
async def test_slots_of_a_build_that_died_are_swept(tmp_path) -> None:
    CLAIMS_DIR.mkdir(parents=True, exist_ok=True)
    dead = 9  # claimed by a template build whose process is gone
    pid = 2**22 + 12345
    path = CLAIMS_DIR / "16380"
    assert not path.exists()
    path.write_text(json.dumps({"owner": f"build_{pid}", "pid": pid}))
    net = HostNetwork(NetworkConfig(slot_pool=0, dns_upstreams=["127.0.0.1:1"]), tmp_path)
    await net.start()
    await net.close()
    assert not path.exists(), dead
