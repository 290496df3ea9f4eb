"""Plain data types returned by the SDK (dataclasses, no behaviour beyond parsing)."""

from __future__ import annotations

import base64
import datetime as _dt
from dataclasses import dataclass, field
from enum import Enum
from typing import IO, Any, Dict, List, Literal, Mapping, Optional, TypedDict, Union


def _parse_time(value: Any) -> Optional[_dt.datetime]:
    """An RFC 3339 timestamp (``2024-01-01T00:00:00.123456789Z``) as an aware datetime."""
    if not value or not isinstance(value, str):
        return None
    text = value.strip()
    if text.endswith("Z") or text.endswith("z"):
        text = text[:-1] + "+00:00"
    # Python parses at most 6 fractional digits; protobuf sends up to 9.
    if "." in text:
        head, _, rest = text.partition(".")
        digits = ""
        while rest and rest[0].isdigit():
            digits += rest[0]
            rest = rest[1:]
        text = f"{head}.{digits[:6].ljust(6, '0')}{rest}" if digits else head + rest
    try:
        parsed = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=_dt.timezone.utc)
    return parsed


def _int(value: Any, default: int = 0) -> int:
    """protobuf JSON sends 64-bit integers as strings."""
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _b64(value: Any) -> bytes:
    if not value:
        return b""
    text = str(value)
    text += "=" * (-len(text) % 4)
    return base64.b64decode(text.replace("-", "+").replace("_", "/"))


# --------------------------------------------------------------------------- sandboxes

#: Every IPv4 destination: ``deny_out=[ALL_TRAFFIC]`` blocks all egress not allowed by ``allow_out``.
ALL_TRAFFIC = "0.0.0.0/0"


class SandboxNetworkOpts(TypedDict, total=False):
    """``network`` of ``Sandbox.create`` (E2B's ``SandboxNetworkOpts``).

    ``allow_out``: IPv4 addresses, CIDR blocks and domains (``example.com``, ``*.example.com``,
    matched on the HTTP Host / TLS SNI of each connection) the sandbox may reach; allow wins over
    deny. ``deny_out``: addresses and CIDR blocks it may not reach (``[ALL_TRAFFIC]``: all but the
    allowed). Both may be a callable receiving a ``SandboxNetworkSelectorContext``.
    ``dns_servers``: resolvers opened when ``allow_out`` has a domain (default ``["8.8.8.8"]``).
    ``allow_public_traffic=False``: the sandbox's ports answer only requests carrying its
    ``traffic_access_token`` (header ``e2b-traffic-access-token``). ``mask_request_host`` is
    stored and reported back. ``rules``, ``egress_proxy``, ``https_ports``: not supported by
    trenvx (the backend refuses them with ``InvalidArgumentError``).
    """

    allow_out: Any
    deny_out: Any
    dns_servers: List[str]
    allow_public_traffic: bool
    mask_request_host: str
    https_ports: List[int]
    rules: Dict[str, Any]
    egress_proxy: Dict[str, Any]


class SandboxNetworkUpdate(TypedDict, total=False):
    """``update_network``'s argument (E2B's ``SandboxNetworkUpdate``): the new egress rules, replacing
    the old ones entirely (an option left out is cleared). ``allow_internet_access=False`` is
    ``deny_out=[ALL_TRAFFIC]``."""

    allow_out: Any
    deny_out: Any
    dns_servers: List[str]
    allow_internet_access: bool
    rules: Dict[str, Any]
    egress_proxy: Dict[str, Any]


class SandboxNetworkInfo(TypedDict, total=False):
    """A sandbox's network settings as ``get_info()`` reports them (E2B's ``SandboxNetworkInfo``);
    ``dns_servers`` only when ``allow_out`` names a domain."""

    allow_out: List[str]
    deny_out: List[str]
    dns_servers: List[str]
    allow_public_traffic: bool
    mask_request_host: str


class SandboxInfoLifecycle(TypedDict):
    """``lifecycle`` of ``get_info()`` (E2B's ``SandboxInfoLifecycle``): what its timeout does, and
    whether a request to it resumes it while it is paused."""

    on_timeout: Literal["pause", "kill"]
    auto_resume: bool


def _lifecycle_info(value: Any) -> Optional[SandboxInfoLifecycle]:
    """``lifecycle`` of ``GET /sandboxes/{id}`` (``{"onTimeout", "autoResume"}``) in E2B's Python names."""
    if not isinstance(value, Mapping) or value.get("onTimeout") not in ("pause", "kill"):
        return None
    return {"on_timeout": value["onTimeout"], "auto_resume": value.get("autoResume") is True}


def _network_info(value: Any) -> Optional[SandboxNetworkInfo]:
    """``network`` of ``GET /sandboxes/{id}`` in E2B's Python names (``allow_out``, ...)."""
    if not isinstance(value, Mapping):
        return None
    out: SandboxNetworkInfo = {}
    if isinstance(value.get("allowOut"), list):
        out["allow_out"] = [str(x) for x in value["allowOut"]]
    if isinstance(value.get("denyOut"), list):
        out["deny_out"] = [str(x) for x in value["denyOut"]]
    if isinstance(value.get("dnsServers"), list):
        out["dns_servers"] = [str(x) for x in value["dnsServers"]]
    if isinstance(value.get("allowPublicTraffic"), bool):
        out["allow_public_traffic"] = value["allowPublicTraffic"]
    if isinstance(value.get("maskRequestHost"), str):
        out["mask_request_host"] = value["maskRequestHost"]
    return out



@dataclass
class SandboxInfo:
    """A sandbox as the backend describes it (``GET /sandboxes``, ``GET /sandboxes/{id}``)."""

    sandbox_id: str
    template_id: str
    name: Optional[str] = None
    metadata: Dict[str, str] = field(default_factory=dict)
    started_at: Optional[_dt.datetime] = None
    end_at: Optional[_dt.datetime] = None
    state: str = "running"
    cpu_count: int = 0
    memory_mb: int = 0
    disk_size_mb: int = 0
    envd_version: Optional[str] = None
    client_id: Optional[str] = None
    allow_internet_access: Optional[bool] = None
    """As given on create or by the last ``update_network`` (None: not set explicitly)."""
    network: Optional[SandboxNetworkInfo] = None
    """The egress rules in force and public access (``get_info()`` only; None in ``list()``)."""
    lifecycle: Optional[SandboxInfoLifecycle] = None
    """What its timeout does, E2B's shape: ``{"on_timeout": "kill" | "pause", "auto_resume": bool}``
    (``get_info()`` only; None in ``list()``)."""

    @property
    def id(self) -> str:
        return self.sandbox_id

    @property
    def alias(self) -> Optional[str]:
        """TrEnv-X's name for the template alias."""
        return self.name

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "SandboxInfo":
        return cls(
            sandbox_id=str(d.get("sandboxID") or d.get("sandbox_id") or ""),
            template_id=str(d.get("templateID") or d.get("template_id") or ""),
            name=d.get("alias") or d.get("name"),
            metadata=dict(d.get("metadata") or {}),
            started_at=_parse_time(d.get("startedAt")),
            end_at=_parse_time(d.get("endAt")),
            state=str(d.get("state") or "running"),
            cpu_count=_int(d.get("cpuCount")),
            memory_mb=_int(d.get("memoryMB")),
            disk_size_mb=_int(d.get("diskSizeMB")),
            envd_version=d.get("envdVersion"),
            client_id=d.get("clientID"),
            allow_internet_access=d["allowInternetAccess"] if isinstance(d.get("allowInternetAccess"), bool) else None,
            network=_network_info(d.get("network")),
            lifecycle=_lifecycle_info(d.get("lifecycle")),
        )


@dataclass
class SandboxMetrics:
    """One sample of a sandbox's resource use (``get_metrics()``; E2B's ``SandboxMetrics``)."""

    cpu_count: int
    cpu_used_pct: float
    """CPU use over all vCPUs since the previous sample, 0-100."""
    disk_total: int
    disk_used: int
    mem_total: int
    mem_used: int
    mem_cache: int
    """Guest page cache, bytes."""
    timestamp: Optional[_dt.datetime]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "SandboxMetrics":
        return cls(
            cpu_count=_int(d.get("cpuCount")), cpu_used_pct=float(d.get("cpuUsedPct") or 0.0),
            disk_total=_int(d.get("diskTotal")), disk_used=_int(d.get("diskUsed")),
            mem_total=_int(d.get("memTotal")), mem_used=_int(d.get("memUsed")), mem_cache=_int(d.get("memCache")),
            timestamp=_parse_time(d.get("timestamp")),
        )


@dataclass
class TemplateInfo:
    """A template the backend can start sandboxes from (``GET /templates``)."""

    template_id: str
    aliases: List[str] = field(default_factory=list)
    build_id: Optional[str] = None
    cpu_count: int = 0
    memory_mb: int = 0
    disk_size_mb: int = 0
    public: bool = False
    created_at: Optional[_dt.datetime] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TemplateInfo":
        return cls(
            template_id=str(d.get("templateID") or d.get("template_id") or d.get("name") or ""),
            aliases=list(d.get("aliases") or []),
            build_id=d.get("buildID"),
            cpu_count=_int(d.get("cpuCount")),
            memory_mb=_int(d.get("memoryMB")),
            disk_size_mb=_int(d.get("diskSizeMB")),
            public=bool(d.get("public", False)),
            created_at=_parse_time(d.get("createdAt")),
            raw=dict(d),
        )


@dataclass
class SandboxConnectionInfo:
    """What the SDK needs to reach one sandbox's agent (from create/connect)."""

    sandbox_id: str
    template_id: str = ""
    client_id: str = ""
    envd_version: Optional[str] = None
    envd_access_token: Optional[str] = None
    domain: Optional[str] = None
    traffic_access_token: Optional[str] = None
    """Set when the sandbox was created with ``network={"allow_public_traffic": False}``."""

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "SandboxConnectionInfo":
        return cls(
            sandbox_id=str(d.get("sandboxID") or ""),
            template_id=str(d.get("templateID") or ""),
            client_id=str(d.get("clientID") or ""),
            envd_version=d.get("envdVersion"),
            envd_access_token=d.get("envdAccessToken"),
            domain=d.get("domain"),
            traffic_access_token=d.get("trafficAccessToken") or None,
        )


@dataclass
class SnapshotInfo:
    """A snapshot of a sandbox (``create_snapshot``, ``list_snapshots``): start sandboxes from it
    with ``Sandbox.create(snapshot_id)``."""

    snapshot_id: str
    """``<id or name>:default``: a template id."""
    names: List[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "SnapshotInfo":
        names = d.get("names")
        return cls(snapshot_id=str(d.get("snapshotID") or ""),
                   names=[str(n) for n in names] if isinstance(names, list) else [])


# --------------------------------------------------------------------------- files


class FileType(str, Enum):
    """Type of a filesystem entry."""

    FILE = "file"
    DIR = "dir"


_FILE_TYPES = {
    "FILE_TYPE_FILE": FileType.FILE,
    "FILE_TYPE_DIRECTORY": FileType.DIR,
    "file": FileType.FILE,
    "directory": FileType.DIR,
    "dir": FileType.DIR,
    1: FileType.FILE,
    2: FileType.DIR,
}


def _file_type(value: Any) -> Optional[FileType]:
    return _FILE_TYPES.get(value)


@dataclass
class EntryInfo:
    """A file or directory inside the sandbox."""

    name: str
    type: Optional[FileType]
    path: str
    size: int = 0
    mode: int = 0
    permissions: str = ""
    owner: str = ""
    group: str = ""
    modified_time: Optional[_dt.datetime] = None
    symlink_target: Optional[str] = None

    @property
    def is_dir(self) -> bool:
        return self.type == FileType.DIR

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "EntryInfo":
        return cls(
            name=str(d.get("name") or ""),
            type=_file_type(d.get("type")),
            path=str(d.get("path") or ""),
            size=_int(d.get("size")),
            mode=_int(d.get("mode")),
            permissions=str(d.get("permissions") or ""),
            owner=str(d.get("owner") or ""),
            group=str(d.get("group") or ""),
            modified_time=_parse_time(d.get("modifiedTime") or d.get("modified_time")),
            symlink_target=d.get("symlinkTarget", d.get("symlink_target")),
        )


@dataclass
class WriteInfo:
    """A file written by ``files.write`` (name, type and path as the agent reports them)."""

    name: str
    type: Optional[FileType]
    path: str

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "WriteInfo":
        return cls(
            name=str(d.get("name") or ""),
            type=_file_type(d.get("type")),
            path=str(d.get("path") or ""),
        )


class WriteEntry(TypedDict):
    """One file for ``files.write_files``: ``{"path": ..., "data": str | bytes | IO}``."""

    path: str
    data: Union[str, bytes, IO[Any]]


class FilesystemEventType(str, Enum):
    """What happened to a watched path."""

    CREATE = "create"
    WRITE = "write"
    REMOVE = "remove"
    RENAME = "rename"
    CHMOD = "chmod"


_EVENT_TYPES = {
    "EVENT_TYPE_CREATE": FilesystemEventType.CREATE,
    "EVENT_TYPE_WRITE": FilesystemEventType.WRITE,
    "EVENT_TYPE_REMOVE": FilesystemEventType.REMOVE,
    "EVENT_TYPE_RENAME": FilesystemEventType.RENAME,
    "EVENT_TYPE_CHMOD": FilesystemEventType.CHMOD,
    1: FilesystemEventType.CREATE,
    2: FilesystemEventType.WRITE,
    3: FilesystemEventType.REMOVE,
    4: FilesystemEventType.RENAME,
    5: FilesystemEventType.CHMOD,
}


@dataclass
class FilesystemEvent:
    """One change under a watched directory; ``name`` is relative to that directory."""

    name: str
    type: Optional[FilesystemEventType]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "FilesystemEvent":
        return cls(name=str(d.get("name") or ""), type=_EVENT_TYPES.get(d.get("type")))


# --------------------------------------------------------------------------- processes


@dataclass
class ProcessInfo:
    """A process running in the sandbox (``commands.list``)."""

    pid: int
    tag: Optional[str]
    cmd: str
    args: List[str]
    envs: Dict[str, str]
    cwd: Optional[str]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ProcessInfo":
        config = d.get("config") or {}
        return cls(
            pid=_int(d.get("pid")),
            tag=d.get("tag"),
            cmd=str(config.get("cmd") or ""),
            args=list(config.get("args") or []),
            envs=dict(config.get("envs") or {}),
            cwd=config.get("cwd"),
        )


@dataclass
class CommandResult:
    """How a command ended: its whole ``stdout`` and ``stderr``, ``exit_code`` and ``error``."""

    stdout: str
    stderr: str
    exit_code: int
    error: Optional[str] = None


@dataclass
class PtySize:
    """Size of a pseudo-terminal."""

    rows: int = 24
    cols: int = 80


@dataclass
class ProcessEvent:
    """One event of a process stream, decoded: exactly one of the fields is set."""

    pid: Optional[int] = None  # start
    stdout: Optional[bytes] = None
    stderr: Optional[bytes] = None
    pty: Optional[bytes] = None
    end: Optional["EndEvent"] = None
    keepalive: bool = False

    @classmethod
    def from_json(cls, message: Mapping[str, Any]) -> "ProcessEvent":
        """Decode a ``StartResponse``/``ConnectResponse`` message (``{"event": {...}}``)."""
        ev = message.get("event") or {}
        if "start" in ev:
            return cls(pid=_int((ev.get("start") or {}).get("pid")))
        if "data" in ev:
            data = ev.get("data") or {}
            if "stdout" in data:
                return cls(stdout=_b64(data["stdout"]))
            if "stderr" in data:
                return cls(stderr=_b64(data["stderr"]))
            if "pty" in data:
                return cls(pty=_b64(data["pty"]))
            return cls(keepalive=True)
        if "end" in ev:
            end = ev.get("end") or {}
            return cls(
                end=EndEvent(
                    exit_code=_int(end.get("exitCode", end.get("exit_code"))),
                    exited=bool(end.get("exited", False)),
                    status=str(end.get("status") or ""),
                    error=end.get("error") or None,
                )
            )
        return cls(keepalive=True)


@dataclass
class EndEvent:
    exit_code: int
    exited: bool
    status: str
    error: Optional[str] = None
