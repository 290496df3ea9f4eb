"""``POST /init``: give a freshly restored sandbox its own identity.

Every sandbox of a template is restored from the same snapshot, so right after the restore
they all share the template's clock, hostname, machine id and kernel RNG state. ``/init``
fixes that in one request::

    {"sandboxId": "...", "envVars": {...}, "accessToken": "...",
     "timestamp": "2024-05-01T12:00:00.123456789Z" | <unix ns or s>,
     "hostname": "...", "entropy": "<base64>", "machineId": "<32 hex digits>",
     "defaultUser": "root", "defaultWorkdir": "/home/user"}

The system changes are best effort (each failure is logged, the request still succeeds);
:class:`SystemIdentity` can be told to skip some of them, which tests on a host need.
"""

from __future__ import annotations

import calendar
import ctypes
import ctypes.util
import fcntl
import hashlib
import logging
import os
import re
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from . import pbjson
from .connect import ConnectError
from .state import AgentState

log = logging.getLogger("trenvx_agent.identity")

#: ioctl numbers of <linux/random.h>.
RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
CLOCK_REALTIME = 0

SYSTEM_STEPS = ("clock", "hostname", "machine_id", "rng")

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
_RFC3339_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9})\d*)?(Z|z|[+-]\d{2}:?\d{2})$"
)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def parse_timestamp(value: Any) -> int:
    """Unix time in nanoseconds from RFC 3339 text or a number.

    Numbers (or digit strings) are read by magnitude: nanoseconds, microseconds,
    milliseconds or seconds (floats allowed for seconds).
    """
    if isinstance(value, bool):
        raise ConnectError("invalid_argument", "timestamp must be RFC 3339 text or a number")
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-?\d+(\.\d+)?", text):
            value = float(text) if "." in text else int(text)
        else:
            return _parse_rfc3339(text)
    if isinstance(value, (int, float)):
        magnitude = abs(value)
        if magnitude >= 1e17:
            return int(value)
        if magnitude >= 1e14:
            return int(value * 1_000)
        if magnitude >= 1e11:
            return int(value * 1_000_000)
        return int(round(value * 1_000_000_000))
    raise ConnectError("invalid_argument", "timestamp must be RFC 3339 text or a number")


def _parse_rfc3339(text: str) -> int:
    match = _RFC3339_RE.match(text)
    if not match:
        raise ConnectError("invalid_argument", f"timestamp {text!r} is not RFC 3339")
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    frac = (match.group(7) or "").ljust(9, "0")
    zone = match.group(8)
    try:
        seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    except (ValueError, OverflowError):
        raise ConnectError("invalid_argument", f"timestamp {text!r} is out of range") from None
    if zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        seconds -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return seconds * 1_000_000_000 + int(frac)


def machine_id_for(sandbox_id: str) -> str:
    """The 32-hex-digit machine id derived from a sandbox id."""
    return hashlib.sha256(b"trenvx-machine-id:" + sandbox_id.encode("utf-8")).hexdigest()[:32]


def _load_libc() -> ctypes.CDLL:
    # Loaded once when the agent starts, before the template's snapshot: a restored sandbox then
    # pays nothing for it. (``ctypes.util.find_library`` runs ldconfig in a subprocess, which
    # costs hundreds of milliseconds under TCG; it must not run on the /init path.)
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


_LIBC = _load_libc()


@dataclass
class SystemIdentity:
    """Applies clock, hostname, machine id and RNG changes to the running system."""

    skip: set[str] = field(default_factory=set)
    etc: str = "/etc"

    def set_clock(self, ns: int) -> None:
        ts = _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)
        if _LIBC.clock_settime(CLOCK_REALTIME, ctypes.byref(ts)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"clock_settime: {os.strerror(err)}")

    # Files are read and written as bytes: a text file's codec lookup imports modules in the guest,
    # which each restored sandbox would pay for (translated anew under TCG) on its /init.

    def set_hostname(self, hostname: str) -> None:
        socket.sethostname(hostname)
        name = hostname.encode("ascii")  # validated by the caller: letters, digits, '-' and '.'
        with open(os.path.join(self.etc, "hostname"), "wb") as f:
            f.write(name + b"\n")
        hosts_path = os.path.join(self.etc, "hosts")
        try:
            with open(hosts_path, "rb") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            lines = [b"127.0.0.1\tlocalhost", b"::1\tlocalhost ip6-localhost ip6-loopback"]
        lines = [line for line in lines if not line.split() or line.split()[0] != b"127.0.1.1"]
        lines.append(b"127.0.1.1\t" + name)
        # Rewrite in place: /etc/hosts is a bind mount (the guest's init) that cannot be renamed over.
        with open(hosts_path, "wb") as f:
            f.write(b"\n".join(lines) + b"\n")

    def write_machine_id(self, machine_id: str) -> None:
        with open(os.path.join(self.etc, "machine-id"), "wb") as f:
            f.write(machine_id.encode("ascii") + b"\n")

    def seed_rng(self, entropy: bytes) -> None:
        """Mix ``entropy`` into the kernel pool (credited), then force a CRNG reseed."""
        padded = entropy + b"\x00" * (-len(entropy) % 4)
        request = struct.pack("ii", len(entropy) * 8, len(entropy)) + padded
        fd = os.open("/dev/random", os.O_WRONLY | os.O_CLOEXEC)
        try:
            try:
                fcntl.ioctl(fd, RNDADDENTROPY, request)
            except OSError as exc:
                # Without CAP_SYS_ADMIN: still mix the bytes in, uncredited.
                log.warning("RNDADDENTROPY failed (%s); writing the entropy to /dev/random instead", exc)
                os.write(fd, entropy)
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        finally:
            os.close(fd)

    def _step(self, name: str, fn: Any, *args: Any) -> str | None:
        if name in self.skip:
            log.info("init: skipping %s (disabled)", name)
            return None
        try:
            fn(*args)
            return None
        except Exception as exc:  # best effort: one failing step must not fail /init
            log.warning("init: %s failed: %s", name, exc)
            return f"{name}: {exc}"


class InitApi:
    """``POST /init``, ``GET /envs``."""

    def __init__(self, state: AgentState, system: SystemIdentity) -> None:
        self.state = state
        self.system = system
        #: Failures of the last /init's system steps (for logs and tests).
        self.last_warnings: list[str] = []

    def init(self, body: dict[str, Any]) -> list[str]:
        """Apply an init request; returns the warnings of failed best-effort steps."""
        env_vars = pbjson.get_map(body, "envVars")
        hostname = pbjson.get_str(body, "hostname")
        if hostname and (len(hostname) > 64 or not _HOSTNAME_RE.match(hostname)):
            raise ConnectError("invalid_argument", f"invalid hostname {hostname!r}")
        timestamp_ns = parse_timestamp(pbjson.raw(body, "timestamp")) if pbjson.has(body, "timestamp") else None
        entropy = pbjson.get_bytes(body, "entropy")
        sandbox_id = pbjson.get_str(body, "sandboxId")
        machine_id = pbjson.get_str(body, "machineId")
        if machine_id and not re.fullmatch(r"[0-9a-f]{32}", machine_id):
            raise ConnectError("invalid_argument", f"machineId must be 32 lowercase hex digits, not {machine_id!r}")
        default_user = pbjson.get_str(body, "defaultUser")
        default_workdir = pbjson.get_str(body, "defaultWorkdir")

        warnings: list[str] = []
        if timestamp_ns is not None:
            warnings.append(self.system._step("clock", self.system.set_clock, timestamp_ns) or "")
        if hostname:
            warnings.append(self.system._step("hostname", self.system.set_hostname, hostname) or "")
        if sandbox_id:
            machine_id = machine_id or machine_id_for(sandbox_id)
            warnings.append(self.system._step("machine_id", self.system.write_machine_id, machine_id) or "")
            self.state.sandbox_id = sandbox_id
        if entropy:
            warnings.append(self.system._step("rng", self.system.seed_rng, entropy) or "")
        if env_vars:
            self.state.update_env(env_vars)
        if default_user:
            self.state.default_user = default_user
        if default_workdir:
            self.state.default_workdir = default_workdir
        if pbjson.has(body, "accessToken"):
            self.state.set_token(pbjson.get_str(body, "accessToken") or None)
        self.last_warnings = [w for w in warnings if w]
        log.debug("init: sandbox %s, hostname %s, %d env vars, token %s",
                 sandbox_id or "-", hostname or "-", len(env_vars), "set" if self.state.has_token else "none")
        return self.last_warnings
