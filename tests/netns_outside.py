"""A stand-in internet for the network tests, on this machine only: the ``tvxt-out`` namespace.

``with outside_network() as out:`` (as root) makes a network namespace ``tvxt-out`` joined to the
host by a veth pair (host ``tvxtout0`` 198.51.100.1/30, namespace ``tvxtout1`` 198.51.100.2/30,
the namespace's default route back through the host), routes the documentation range
203.0.113.0/24 from the host into it, and runs :mod:`tests.netns_outside_server` there:

============================  =========================================================================
203.0.113.10:80 and .11:80    HTTP: any request gets ``{"peer", "host", "server", "path", "tls"}`` JSON
203.0.113.10:443              the same over TLS, with a self-signed certificate made at start for
                              ``allowed.test``, ``*.wild.test``, ``other.test`` and 203.0.113.10
                              (:attr:`OutsideNetwork.ca_cert` verifies it)
203.0.113.53:53 (UDP)         DNS: ``allowed.test`` and ``*.wild.test`` -> .10, ``other.test`` -> .11,
                              NXDOMAIN otherwise; every qname is logged (:meth:`OutsideNetwork.dns_log`,
                              served on 203.0.113.53:80 ``/dns-log``)
============================  =========================================================================

Nothing is reachable outside this machine through it: both ranges are documentation ranges
(RFC 5737) that exist only in this namespace and the host's route to it. On exit, on success or
error, the server process, the namespace, the veth pair and the route are removed; a ``tvxt-out``
left by a crashed run is removed at start. A lock file serialises concurrent test runs on the
machine. Without root or ``ip netns`` the caller is skipped (``pytest.skip``) with the reason.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import http.client
import ipaddress
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NETNS = "tvxt-out"
HOST_LINK = "tvxtout0"
NS_LINK = "tvxtout1"
HOST_IP = "198.51.100.1"
NS_IP = "198.51.100.2"
ROUTED = "203.0.113.0/24"
WEB_IP = "203.0.113.10"
OTHER_IP = "203.0.113.11"
DNS_IP = "203.0.113.53"
RECORDS = {"allowed.test": WEB_IP, "*.wild.test": WEB_IP, "other.test": OTHER_IP}
CERT_NAMES = ("allowed.test", "*.wild.test", "other.test")
LOCK_FILE = Path("/run/tvxt-out.lock")


@dataclass(frozen=True)
class OutsideNetwork:
    """The addresses of the stand-in internet, and its DNS server's log."""

    netns: str = NETNS
    host_link: str = HOST_LINK
    host_ip: str = HOST_IP
    """The host's end of the veth: the source address of the host's own requests to the outside."""
    ns_ip: str = NS_IP
    routed: str = ROUTED
    web_ip: str = WEB_IP
    """HTTP on port 80, HTTPS on 443."""
    other_ip: str = OTHER_IP
    """HTTP on port 80."""
    dns_ip: str = DNS_IP
    records: dict[str, str] = field(default_factory=lambda: dict(RECORDS))
    ca_cert: Path = Path()
    """The server's self-signed certificate (PEM), usable as the CA to verify it."""

    def _dns_http(self, method: str, path: str) -> list[str]:
        conn = http.client.HTTPConnection(self.dns_ip, 80, timeout=5)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            body = json.loads(resp.read())
        finally:
            conn.close()
        return list(body["queries"])

    def dns_log(self) -> list[str]:
        """Every qname the DNS server received, lowercase, without trailing dot, in order."""
        return self._dns_http("GET", "/dns-log")

    def clear_dns_log(self) -> None:
        self._dns_http("POST", "/dns-log/clear")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def netns_exists() -> bool:
    return NETNS in _ip("netns", "list", check=False).stdout.split()


def link_exists() -> bool:
    return _ip("link", "show", HOST_LINK, check=False).returncode == 0


def route_exists() -> bool:
    return bool(_ip("route", "show", ROUTED, check=False).stdout.strip())


def cleanup() -> None:
    """Remove whatever ``tvxt-out`` left: its processes, the veth pair, the route, the namespace."""
    if netns_exists():
        for pid in _ip("netns", "pids", NETNS, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    if link_exists():
        _ip("link", "del", HOST_LINK, check=False)
    if route_exists():
        _ip("route", "del", ROUTED, check=False)
    if netns_exists():
        _ip("netns", "del", NETNS, check=False)
    deadline = time.monotonic() + 10
    while (link_exists() or netns_exists()) and time.monotonic() < deadline:  # the kernel frees it asynchronously
        time.sleep(0.05)
    if link_exists() or netns_exists() or route_exists():
        raise RuntimeError(f"could not remove the {NETNS} namespace, {HOST_LINK} or the route to {ROUTED}")


def _require_netns() -> None:
    if os.geteuid() != 0:
        pytest.skip("the outside network namespace needs root")
    if not shutil.which("ip"):
        pytest.skip("the outside network namespace needs iproute2's `ip`")
    if _ip("netns", "list", check=False).returncode != 0:
        pytest.skip("`ip netns` is unavailable here")


@contextlib.contextmanager
def _machine_lock(timeout: float = 300) -> Iterator[None]:
    """One ``tvxt-out`` per machine: other test runs wait for it (a crashed run's lock dies with it)."""
    with open(LOCK_FILE, "w") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{LOCK_FILE} held by another test run for {timeout:g}s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def make_certificate(directory: Path, names: tuple[str, ...] = CERT_NAMES,
                     ips: tuple[str, ...] = (WEB_IP,)) -> tuple[Path, Path]:
    """A self-signed certificate (also its own CA) for ``names`` and ``ips``: ``(cert, key)`` PEM
    files in ``directory``. Uses ``cryptography`` when installed, else the ``openssl`` CLI."""
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        san = ",".join([*(f"DNS:{n}" for n in names), *(f"IP:{i}" for i in ips)])
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-days", "2", "-subj", f"/CN={names[0]}", "-addext", f"subjectAltName={san}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-keyout", str(key_path), "-out", str(cert_path)],
            check=True, capture_output=True, timeout=60,
        )
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [*(x509.DNSName(n) for n in names), *(x509.IPAddress(ipaddress.IPv4Address(i)) for i in ips)]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _setup() -> None:
    _ip("netns", "add", NETNS)
    _ip("link", "add", HOST_LINK, "type", "veth", "peer", "name", NS_LINK, "netns", NETNS)
    # No IPv6 link-local chatter on the test link (best effort: IPv6 may be off altogether).
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv6/conf/{HOST_LINK}/disable_ipv6").write_text("1")
    subprocess.run(["ip", "netns", "exec", NETNS, "sh", "-c", f"echo 1 > /proc/sys/net/ipv6/conf/{NS_LINK}/disable_ipv6"],
                   capture_output=True, timeout=30)
    _ip("addr", "add", f"{HOST_IP}/30", "dev", HOST_LINK)
    _ip("link", "set", HOST_LINK, "up")
    _ip("-n", NETNS, "link", "set", "lo", "up")
    _ip("-n", NETNS, "addr", "add", f"{NS_IP}/30", "dev", NS_LINK)
    _ip("-n", NETNS, "link", "set", NS_LINK, "up")
    for ip in (WEB_IP, OTHER_IP, DNS_IP):
        _ip("-n", NETNS, "addr", "add", f"{ip}/32", "dev", "lo")
    _ip("-n", NETNS, "route", "add", "default", "via", HOST_IP)
    _ip("route", "add", ROUTED, "via", NS_IP, "dev", HOST_LINK)


def _start_server(cert: Path, key: Path, log_path: Path) -> subprocess.Popen[bytes]:
    argv = ["ip", "netns", "exec", NETNS, sys.executable, "-m", "tests.netns_outside_server",
            "--http", WEB_IP, "--http", OTHER_IP, "--tls", WEB_IP, "--dns", DNS_IP,
            "--cert", str(cert), "--key", str(key), *(f"--record={n}={ip}" for n, ip in RECORDS.items())]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the outside server did not start: {log_path.read_text(errors='replace')[-2000:]}")
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@contextlib.contextmanager
def outside_network() -> Iterator[OutsideNetwork]:
    """The stand-in internet (see the module docstring), removed again on exit."""
    _require_netns()
    with _machine_lock():
        cleanup()
        tmp = Path(tempfile.mkdtemp(prefix="tvxt-out-"))
        proc: subprocess.Popen[bytes] | None = None
        try:
            cert, key = make_certificate(tmp)
            try:
                _setup()
            except RuntimeError as e:
                if "netns" in str(e) and not netns_exists():
                    pytest.skip(f"cannot make a network namespace here: {e}")
                raise
            proc = _start_server(cert, key, tmp / "server.log")
            yield OutsideNetwork(ca_cert=cert)
        finally:
            try:
                if proc is not None:
                    _stop(proc)
            finally:
                cleanup()
                shutil.rmtree(tmp, ignore_errors=True)
