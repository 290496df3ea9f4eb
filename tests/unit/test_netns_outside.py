"""The stand-in internet (tests/netns_outside.py) works from the host and leaves nothing behind:
HTTP on both web addresses, HTTPS with SNI, DNS answers and its query log; after exit (also after
an error inside, and over a stale namespace left by a crashed run) no namespace, link or route."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import struct
import subprocess

import pytest

from tests import netns_outside
from tests.netns_outside import HOST_LINK, NETNS, ROUTED, OutsideNetwork, outside_network


def get_json(ip: str, *, host: str, port: int = 80, tls: ssl.SSLContext | None = None) -> dict[str, object]:
    conn: http.client.HTTPConnection
    if tls is None:
        conn = http.client.HTTPConnection(ip, port, timeout=5)
    else:
        # Connect to the IP, send ``host`` as SNI and Host (what a client resolving ``host`` would do).
        conn = http.client.HTTPSConnection(ip, port, timeout=5, context=tls)
        sock = socket.create_connection((ip, port), timeout=5)
        conn.sock = tls.wrap_socket(sock, server_hostname=host)
    try:
        conn.request("GET", "/x", headers={"Host": host})
        resp = conn.getresponse()
        assert resp.status == 200
        return json.loads(resp.read())
    finally:
        conn.close()


def dns_query(server: str, name: str, qtype: int = 1) -> tuple[int, list[str]]:
    """(rcode, A records) for ``name`` from ``server``."""
    qid = 0x5151
    packet = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    packet += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00" + struct.pack("!HH", qtype, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(packet, (server, 53))
        reply = s.recv(4096)
    rid, flags, _qd, ancount = struct.unpack_from("!HHHH", reply)
    assert rid == qid and flags & 0x8000
    pos = len(packet)
    ips = []
    for _ in range(ancount):
        rtype, _cls, _ttl, rdlen = struct.unpack_from("!HHIH", reply, pos + 2)
        if rtype == 1:
            ips.append(socket.inet_ntoa(reply[pos + 12:pos + 12 + rdlen]))
        pos += 12 + rdlen
    return flags & 0xF, ips


def assert_nothing_left() -> None:
    assert NETNS not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert subprocess.run(["ip", "link", "show", HOST_LINK], capture_output=True).returncode != 0
    assert not subprocess.run(["ip", "route", "show", ROUTED], capture_output=True, text=True).stdout.strip()


def test_outside_network_serves_http_tls_and_dns_and_leaves_nothing() -> None:
    with outside_network() as out:
        assert isinstance(out, OutsideNetwork)
        assert get_json(out.web_ip, host="allowed.test") == {
            "peer": out.host_ip, "host": "allowed.test", "server": out.web_ip, "path": "/x", "tls": False}
        assert get_json(out.other_ip, host="other.test")["server"] == out.other_ip

        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        got = get_json(out.web_ip, host="a.wild.test", port=443, tls=insecure)
        assert got["tls"] is True and got["host"] == "a.wild.test" and got["server"] == out.web_ip
        verified = ssl.create_default_context(cafile=str(out.ca_cert))
        assert get_json(out.web_ip, host="allowed.test", port=443, tls=verified)["tls"] is True

        out.clear_dns_log()
        assert dns_query(out.dns_ip, "allowed.test") == (0, [out.web_ip])
        assert dns_query(out.dns_ip, "x.y.Wild.test") == (0, [out.web_ip])
        assert dns_query(out.dns_ip, "other.test") == (0, [out.other_ip])
        assert dns_query(out.dns_ip, "other.test", qtype=28) == (0, [])
        assert dns_query(out.dns_ip, "wild.test") == (3, [])
        assert dns_query(out.dns_ip, "nowhere.test") == (3, [])
        assert out.dns_log() == ["allowed.test", "x.y.wild.test", "other.test", "other.test", "wild.test",
                                 "nowhere.test"]
        out.clear_dns_log()
        assert out.dns_log() == []
    assert_nothing_left()


def test_an_error_inside_and_a_stale_namespace_are_cleaned_up() -> None:
    netns_outside._require_netns()
    # What a crashed run leaves: the namespace, the host's veth end and the route.
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    subprocess.run(["ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", "tvxtstale1"], check=True)
    subprocess.run(["ip", "link", "set", HOST_LINK, "up"], check=True)
    subprocess.run(["ip", "route", "add", ROUTED, "dev", HOST_LINK], check=True)
    with pytest.raises(RuntimeError, match="boom"):
        with outside_network() as out:
            assert get_json(out.web_ip, host="allowed.test")["server"] == out.web_ip
            raise RuntimeError("boom")
    assert_nothing_left()
    assert subprocess.run(["ip", "link", "show", "tvxtstale1"], capture_output=True).returncode != 0
