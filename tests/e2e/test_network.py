"""Issue 12 end to end: every sandbox a network tenant of its own (real VMs, real namespaces).

The "internet" is tests/netns_outside.py: a namespace on this machine with web servers on
203.0.113.10/.11 (HTTP, HTTPS) and a DNS server on 203.0.113.53, routed from the host. Nothing
leaves the machine. Sandboxes run in a real ``trenvx serve`` (the escape of the issue goes through
its API) whose resolver is that DNS server.

What is shown:

- the escape of the issue fails at every step: from a sandbox, the host's API on every host
  address, any other host port, the other sandbox's slot address, the gateway: nothing answers;
- egress to the outside works by default, each sandbox with its own outside (slot) address;
- ``allow_internet_access=False`` cuts egress and DNS (no query reaches the DNS server);
- ``denyOut``/``allowOut`` for IPs and CIDRs (allow wins), domains by HTTP Host and TLS SNI,
  DNS only for allowed names, and ``PUT /sandboxes/{id}/network`` replacing rules at runtime;
- a server bound to 127.0.0.1 in the guest is reached through the proxy; ``allowPublicTraffic:
  false`` needs the traffic token;
- nothing is left after kill, after a restart with ``--keep``, after the server stops.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.e2e.server_helpers import ServerProc, make_server, running_server, through_proxy, wait_until
from tests.netns_outside import OutsideNetwork, outside_network
from trenvx.config import AGENT_PORT, Config
from trenvx.network import netns
from trenvx.network.mode import netns_unavailable
from trenvx.network.slot import CLAIMS_DIR, HOST_IF_PREFIX, NETNS_PREFIX, owner_id

pytestmark = pytest.mark.skipif(bool(netns_unavailable()), reason=f"no network namespaces: {netns_unavailable()}")

PROBE = r"""
import json, socket, ssl, sys, urllib.request
out = []
for t in json.loads(sys.argv[1]):
    kind = t["kind"]
    try:
        if kind == "tcp":
            s = socket.create_connection((t["ip"], t["port"]), timeout=t.get("timeout", 3)); s.close()
            out.append("open")
        elif kind == "http":
            req = urllib.request.Request(t["url"], headers=t.get("headers", {}))
            out.append(json.loads(urllib.request.urlopen(req, timeout=5).read()))
        elif kind == "tls":
            ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
            with socket.create_connection((t["ip"], 443), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname=t["sni"]) as s:
                    s.sendall(("GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % t["sni"]).encode())
                    data = b""
                    while chunk := s.recv(65536):
                        data += chunk
            out.append(json.loads(data.split(b"\r\n\r\n", 1)[1]))
        elif kind == "dns":
            out.append(socket.gethostbyname(t["name"]))
    except Exception as e:
        out.append("error: %s: %s" % (type(e).__name__, e))
print(json.dumps(out))
"""


async def probe(srv: ServerProc, sandbox: dict, targets: list[dict]) -> list:
    """Run the probe in the sandbox; one result per target: "open", a JSON answer, an IP, or "error: ..."."""
    async with through_proxy(srv.url, sandbox) as agent:
        r = await agent.run(["python3", "-c", PROBE, json.dumps(targets)], timeout=120)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def failed(result: object) -> bool:
    return isinstance(result, str) and result.startswith("error")


@pytest.fixture(scope="module")
def outside() -> Iterator[OutsideNetwork]:
    with outside_network() as out:
        yield out


@pytest.fixture(scope="module")
def srv(e2e_config: Config, test_template: str, outside: OutsideNetwork,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    with running_server(tmp_path_factory.mktemp("net"), e2e_config, template=test_template,
                        network={"dns_upstreams": [outside.dns_ip]}) as s:
        yield s


def create(srv: ServerProc, **body: object) -> dict:
    with srv.client() as c:
        r = c.post("/sandboxes", json={"templateID": "e2e-test", "timeout": 300, **body})
    assert r.status_code == 201, r.text
    return r.json()


def kill(srv: ServerProc, sandbox: dict) -> None:
    with srv.client() as c:
        assert c.delete(f"/sandboxes/{sandbox['sandboxID']}").status_code == 204


def info(srv: ServerProc, sandbox: dict) -> dict:
    with srv.client() as c:
        r = c.get(f"/sandboxes/{sandbox['sandboxID']}")
    assert r.status_code == 200, r.text
    return r.json()


def slot_of(srv: ServerProc, sandbox: dict) -> int:
    return int((srv.data_root / "sandboxes" / sandbox["sandboxID"] / "net-slot").read_text())


def host_addresses() -> list[str]:
    """Every IPv4 address of this host (all interfaces, incl. loopback and the slots' host ends)."""
    return sorted({a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == 2})


def our_leftovers() -> dict[str, list[str]]:
    """Slot namespaces, host-side veths and slot claims present now."""
    links = [n for n in psutil.net_if_addrs() if n.startswith(HOST_IF_PREFIX) and n[len(HOST_IF_PREFIX):].isdigit()]
    claims = sorted(p.name for p in CLAIMS_DIR.iterdir()) if CLAIMS_DIR.is_dir() else []
    return {"netns": netns.names(NETNS_PREFIX), "links": sorted(links), "claims": claims}


async def test_the_escape_of_the_issue_fails_at_every_step(srv: ServerProc) -> None:
    a, b = create(srv), create(srv)
    try:
        b_slot = slot_of(srv, b)
        from trenvx.network.slot import SlotAddress

        b_addr = SlotAddress.of(b_slot, "10.200.0.0/16")
        targets = [{"kind": "tcp", "ip": ip, "port": srv.port, "timeout": 2} for ip in host_addresses()]
        targets += [
            {"kind": "tcp", "ip": "10.0.2.2", "port": srv.port, "timeout": 2},  # the gateway (was the host under slirp)
            {"kind": "tcp", "ip": b_addr.slot_ip, "port": 49983, "timeout": 2},  # the other sandbox's agent
            {"kind": "tcp", "ip": b_addr.host_ip, "port": srv.port, "timeout": 2},
            {"kind": "http", "url": f"http://10.0.2.2:{srv.port}/sandboxes"},
        ]
        # Any other port the host listens on (sshd, databases, ...): none answers either.
        listening = sorted({c.laddr.port for c in psutil.net_connections("tcp4") if c.status == "LISTEN"})[:20]
        targets += [{"kind": "tcp", "ip": host_addresses()[-1], "port": p, "timeout": 2} for p in listening]
        results = await probe(srv, a, targets)
        reached = [(t, r) for t, r in zip(targets, results) if not failed(r)]
        assert reached == [], f"a sandbox reached: {reached}"
        # The API itself still serves the host (the escape is closed, not the API).
        with srv.client() as c:
            assert c.get("/sandboxes").status_code == 200
    finally:
        kill(srv, a)
        kill(srv, b)


async def test_egress_by_default_with_each_sandbox_its_own_address(srv: ServerProc, outside: OutsideNetwork) -> None:
    a, b = create(srv), create(srv)
    try:
        ra = await probe(srv, a, [{"kind": "http", "url": f"http://{outside.web_ip}/"}, {"kind": "dns", "name": "allowed.test"}])
        rb = await probe(srv, b, [{"kind": "http", "url": f"http://{outside.web_ip}/"}])
        assert not failed(ra[0]) and not failed(rb[0]), (ra, rb)
        assert ra[1] == outside.web_ip
        # Restored from one snapshot (same guest address), seen outside with distinct addresses: their slots'.
        assert ra[0]["peer"] != rb[0]["peer"]
        assert ra[0]["peer"].startswith("10.200.") and rb[0]["peer"].startswith("10.200.")
    finally:
        kill(srv, a)
        kill(srv, b)


async def test_no_internet_access_cuts_egress_and_dns(srv: ServerProc, outside: OutsideNetwork) -> None:
    sb = create(srv, allow_internet_access=False)
    try:
        outside.clear_dns_log()
        r = await probe(srv, sb, [
            {"kind": "http", "url": f"http://{outside.web_ip}/"},
            {"kind": "tcp", "ip": outside.dns_ip, "port": 80, "timeout": 2},
            {"kind": "dns", "name": "exfiltrated-secret.allowed.test"},
        ])
        assert all(failed(x) for x in r), r
        assert not any("exfiltrated" in q for q in outside.dns_log()), "DNS was a tunnel out"
        assert info(srv, sb)["network"]["denyOut"] == ["0.0.0.0/0"]
    finally:
        kill(srv, sb)


async def test_ip_rules_allow_wins_and_put_network_replaces_them(srv: ServerProc, outside: OutsideNetwork) -> None:
    sb = create(srv, network={"denyOut": [f"{outside.web_ip}/32"]})
    try:
        web, other = {"kind": "http", "url": f"http://{outside.web_ip}/"}, {"kind": "http", "url": f"http://{outside.other_ip}/"}
        r = await probe(srv, sb, [web, other])
        assert failed(r[0]) and not failed(r[1]), r
        with srv.client() as c:  # deny everything, allow one address: allow wins
            resp = c.put(f"/sandboxes/{sb['sandboxID']}/network",
                         json={"allowOut": [outside.web_ip], "denyOut": ["0.0.0.0/0"]})
            assert resp.status_code == 204, resp.text
        r = await probe(srv, sb, [web, other])
        assert not failed(r[0]) and failed(r[1]), r
        net = info(srv, sb)["network"]
        assert net["allowOut"] == [outside.web_ip] and net["denyOut"] == ["0.0.0.0/0"]
        with srv.client() as c:  # an empty update clears the rules
            assert c.put(f"/sandboxes/{sb['sandboxID']}/network", json={}).status_code == 204
        r = await probe(srv, sb, [web, other])
        assert not failed(r[0]) and not failed(r[1]), r
    finally:
        kill(srv, sb)


async def test_domains_by_host_and_sni_and_dns_only_for_allowed_names(srv: ServerProc, outside: OutsideNetwork) -> None:
    sb = create(srv, network={"allowOut": ["allowed.test", "*.wild.test"], "denyOut": ["0.0.0.0/0"]})
    try:
        outside.clear_dns_log()
        r = await probe(srv, sb, [
            {"kind": "dns", "name": "allowed.test"},
            {"kind": "dns", "name": "a.wild.test"},
            {"kind": "dns", "name": "other.test"},
            {"kind": "http", "url": "http://allowed.test/"},
            {"kind": "http", "url": f"http://{outside.web_ip}/", "headers": {"Host": "x.wild.test"}},
            {"kind": "http", "url": f"http://{outside.web_ip}/", "headers": {"Host": "other.test"}},
            {"kind": "http", "url": f"http://{outside.other_ip}/"},
            {"kind": "tls", "ip": outside.web_ip, "sni": "allowed.test"},
            {"kind": "tls", "ip": outside.web_ip, "sni": "other.test"},
        ])
        assert r[0] == outside.web_ip and r[1] == outside.web_ip, r
        assert failed(r[2]), r  # not an allowed name: not resolved
        assert "other.test" not in outside.dns_log()
        assert r[3]["host"] == "allowed.test" and r[4]["host"] == "x.wild.test", r
        assert failed(r[5]) and failed(r[6]), r  # a Host that is not allowed; an IP with no name
        assert r[7]["tls"] and failed(r[8]), r  # TLS by its SNI
        # The HTTP server saw the slot's address: the proxy dials from the sandbox's namespace.
        assert r[3]["peer"].startswith("10.200.")
    finally:
        kill(srv, sb)


async def test_a_loopback_server_in_the_guest_is_reached_through_the_proxy(srv: ServerProc) -> None:
    sb = create(srv)  # the template's start_cmd serves /srv/www on 127.0.0.1:8080
    try:
        headers = {"E2b-Sandbox-Id": sb["sandboxID"], "E2b-Sandbox-Port": "8080"}
        r = httpx.get(f"{srv.url}/", headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        assert "hello" in r.text.lower()
    finally:
        kill(srv, sb)


async def test_private_traffic_needs_the_traffic_token(srv: ServerProc) -> None:
    sb = create(srv, network={"allowPublicTraffic": False})
    try:
        token = sb.get("trafficAccessToken")
        assert token
        headers = {"E2b-Sandbox-Id": sb["sandboxID"], "E2b-Sandbox-Port": "8080"}
        assert httpx.get(f"{srv.url}/", headers=headers, timeout=30).status_code == 403
        ok = httpx.get(f"{srv.url}/", headers={**headers, "e2b-traffic-access-token": token}, timeout=30)
        assert ok.status_code == 200, ok.text
    finally:
        kill(srv, sb)


async def test_kill_returns_the_slot_clean(srv: ServerProc) -> None:
    sb = create(srv)
    index = slot_of(srv, sb)
    assert netns.exists(f"{NETNS_PREFIX}{index}")
    kill(srv, sb)
    assert wait_until(lambda: not netns.exists(f"{NETNS_PREFIX}{index}"), 10)
    assert not (CLAIMS_DIR / str(index)).exists()
    assert f"{HOST_IF_PREFIX}{index}" not in psutil.net_if_addrs()


async def test_restart_keeps_slots_and_rules_and_stop_removes_everything(
    e2e_config: Config, test_template: str, outside: OutsideNetwork, tmp_path: Path,
) -> None:
    # No pool of ready slots: the sandbox's is the only slot this server makes, so what it leaves is
    # told apart from the slots the module's server makes meanwhile (its pools refill in the background).
    s = make_server(tmp_path / "s", e2e_config, template=test_template, pools=False,
                    network={"dns_upstreams": [outside.dns_ip], "slot_pool": 0}).start(keep=True)
    owner = owner_id(s.data_root)  # whose claims are this server's
    try:
        sb = create(s, network={"denyOut": [f"{outside.web_ip}/32"]})
        index = slot_of(s, sb)
        assert s.stop() == 0, s.log()  # --keep: the sandbox and its slot stay
        assert netns.exists(f"{NETNS_PREFIX}{index}")
        s.start(keep=False)  # adopts it: same slot, same rules, its DNS served again
        r = await probe(s, sb, [{"kind": "http", "url": f"http://{outside.web_ip}/"},
                                {"kind": "http", "url": f"http://{outside.other_ip}/"},
                                {"kind": "dns", "name": "allowed.test"}])
        assert failed(r[0]) and not failed(r[1]) and r[2] == outside.web_ip, r
    finally:
        assert s.stop() == 0, s.log()
        s.cleanup()
    left = our_leftovers()
    assert f"{NETNS_PREFIX}{index}" not in left["netns"] and f"{HOST_IF_PREFIX}{index}" not in left["links"], left
    assert str(index) not in left["claims"], left
    claims = {p.name: p.read_text() for p in CLAIMS_DIR.iterdir()} if CLAIMS_DIR.is_dir() else {}
    assert not [name for name, text in claims.items() if owner in text], claims


async def test_user_networking_is_isolated_where_namespaces_are_not_used(e2e_config: Config, test_template: str) -> None:
    """``network = "user"`` (hosts without root or namespaces): the guest reaches nothing, not even
    the host's loopback services (QEMU's 10.0.2.2), and the host still reaches the agent."""
    import asyncio

    from tests.e2e.server_helpers import free_port
    from trenvx.config import NetworkConfig, NetworkMode
    from trenvx.sandbox.manager import SandboxManager
    from trenvx.template.builder import TemplateBuilder

    name = test_template + "-usernet"
    tpl = e2e_config.template[test_template].model_copy(update={"name": name})
    cfg = e2e_config.model_copy(update={
        "network": NetworkConfig(mode=NetworkMode.user), "template": {**e2e_config.template, name: tpl},
    })
    await TemplateBuilder(cfg).build(name)
    port = free_port()
    host_server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
    try:
        async with SandboxManager(cfg, pools=False) as m:
            assert m.network is None
            sb = await m.create(name)
            code = (f"import socket\nfor a in [('10.0.2.2', {port}), ('10.0.2.3', 53), ('203.0.113.10', 80)]:\n"
                    "    s = socket.socket(); s.settimeout(3)\n"
                    "    try:\n        s.connect(a); print('OPEN', a)\n    except Exception as e:\n        print('no', a, e)\n")
            r = await sb.run(["python3", "-c", code], timeout=60)
            assert r.exit_code == 0 and b"OPEN" not in r.stdout, r.stdout
            assert sum(line.startswith(b"no ") for line in r.stdout.splitlines()) == 3
            await m.kill(sb.id)
    finally:
        host_server.close()
        await host_server.wait_closed()


SPOOF = r"""
import socket, struct, sys
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
def packet(src, dst, name):
    q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
    udp = struct.pack("!HHHH", 40000, 53, 8 + len(q), 0) + q
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return ip[:10] + struct.pack("!H", csum(ip)) + ip[12:] + udp
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for src, name in ((sys.argv[1], "spoofed.test"), ("10.0.2.15", "control.test")):
    s.sendto(packet(src, sys.argv[2], name), (sys.argv[2], 0))
print("sent")
"""


async def test_a_guest_cannot_spoof_its_source_address(srv: ServerProc, outside: OutsideNetwork) -> None:
    """Raw packets with another source (here: another sandbox's slot address) never leave the slot;
    the same packet from the guest's own address does (the control)."""
    a, b = create(srv), create(srv)
    try:
        from trenvx.network.slot import SlotAddress

        victim = SlotAddress.of(slot_of(srv, b), "10.200.0.0/16").slot_ip
        outside.clear_dns_log()
        async with through_proxy(srv.url, a) as agent:
            r = await agent.run(["python3", "-c", SPOOF, victim, outside.dns_ip], user="root", timeout=60)
        assert r.exit_code == 0, r.stderr
        assert wait_until(lambda: "control.test" in outside.dns_log(), 10), outside.dns_log()
        assert "spoofed.test" not in outside.dns_log()
    finally:
        kill(srv, a)
        kill(srv, b)


def test_unmodified_e2b_sdk_sets_and_updates_egress(srv: ServerProc, outside: OutsideNetwork, monkeypatch) -> None:
    """E2B's own package, pointed at trenvx the documented way, passes the rules through and they hold."""
    from e2b import Sandbox

    monkeypatch.setenv("E2B_API_URL", srv.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", srv.url)
    monkeypatch.setenv("E2B_API_KEY", "unused-locally")
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    fetch = (f"import urllib.request as u\nfor ip in ('{outside.web_ip}', '{outside.other_ip}'):\n"
             "    try:\n        u.urlopen(f'http://{ip}/', timeout=5); print(ip, 'ok')\n"
             "    except Exception as e:\n        print(ip, 'blocked')\n")
    sbx = Sandbox.create("e2e-test", timeout=120, network={"deny_out": ["0.0.0.0/0"], "allow_out": [outside.web_ip]})
    try:
        out = sbx.commands.run(f"python3 -c \"{fetch}\"").stdout
        assert f"{outside.web_ip} ok" in out and f"{outside.other_ip} blocked" in out, out
        sbx.update_network({"allow_out": [outside.other_ip], "deny_out": ["0.0.0.0/0"]})
        out = sbx.commands.run(f"python3 -c \"{fetch}\"").stdout
        assert f"{outside.web_ip} blocked" in out and f"{outside.other_ip} ok" in out, out
        sbx.update_network({})
        out = sbx.commands.run(f"python3 -c \"{fetch}\"").stdout
        assert out.count(" ok") == 2, out
    finally:
        sbx.kill()
    off = Sandbox.create("e2e-test", timeout=120, allow_internet_access=False)
    try:
        out = off.commands.run(f"python3 -c \"{fetch}\"").stdout
        assert out.count("blocked") == 2, out
    finally:
        off.kill()


UDP_FLOW = r"""
import socket, struct, sys, time
def query(name):
    return struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"".join(
        bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(query("before.test"), (sys.argv[1], 53))
time.sleep(float(sys.argv[2]))
s.sendto(query("after.test"), (sys.argv[1], 53))
"""


async def test_replacing_the_rules_cuts_flows_already_open(srv: ServerProc, outside: OutsideNetwork) -> None:
    """A flow opened while allowed (one UDP socket, so one conntrack entry) carries nothing more
    once PUT /network denies its destination."""
    import asyncio

    sb = create(srv)
    try:
        outside.clear_dns_log()
        async with through_proxy(srv.url, sb) as agent:
            job = asyncio.ensure_future(agent.run(["python3", "-c", UDP_FLOW, outside.dns_ip, "6"], timeout=60))
            assert await asyncio.to_thread(wait_until, lambda: "before.test" in outside.dns_log(), 20)
            with srv.client() as c:
                r = c.put(f"/sandboxes/{sb['sandboxID']}/network", json={"denyOut": [f"{outside.dns_ip}/32"]})
                assert r.status_code == 204, r.text
            assert (await job).exit_code == 0
        await asyncio.sleep(1)
        assert "after.test" not in outside.dns_log(), outside.dns_log()
    finally:
        kill(srv, sb)


async def test_a_reused_slot_address_never_gets_the_last_sandboxs_connections(
        e2e_config: Config, test_template: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A slot's address goes to a later sandbox once one ends. The proxy's kept-alive connections to
    it belonged to the ended VM (its namespace went without a FIN): the later sandbox's requests must
    get new connections, not a reset (a 502) on an old one. Four slots, no pool of ready slots, five
    sandboxes one after another: at least one address is reused while the proxy still keeps
    connections to it (kept 30 s)."""
    with running_server(tmp_path_factory.mktemp("net1"), e2e_config, template=test_template, pools=False,
                        network={"slot_cidr": "10.203.7.0/28", "slot_pool": 0}) as srv:
        headers = {"E2b-Sandbox-Port": str(AGENT_PORT)}  # the agent keeps connections alive
        slots: list[int] = []
        with httpx.Client(timeout=30) as http:
            for n in range(5):
                sb = create(srv)
                try:
                    slots.append(slot_of(srv, sb))
                    for _ in range(3):  # kept alive between these on the proxy's side
                        r = http.get(f"{srv.url}/health", headers={**headers, "E2b-Sandbox-Id": sb["sandboxID"]})
                        assert r.status_code in (200, 204), (n, slots, r.status_code, r.text)
                finally:
                    kill(srv, sb)
        assert len(set(slots)) < len(slots), slots
