"""The TOML configuration as typed models. Every default lives here, once.

The file has the shape of TrEnv-X's ``example_config.toml``::

    data_root = "/var/lib/trenvx"
    fc_binary_path = ""
    ch_binary_path = ""

    [orchestrator]
    host = "127.0.0.1"
    port = 5000

    [template_manager]
    template_id = "default-sandbox"

    [template."default-sandbox"]
    vcpu = 1
    mem_mb = 256
    disk_mb = 512
    dockerfile = "default-sandbox/Dockerfile"
    start_cmd.cmd = ""
    ready_cmd = ""

Relative paths (Dockerfiles, build contexts, env files) are resolved against the directory of
the config file. Loading fails before any work is done, with a message that names the file, the
template and the key at fault.
"""

from __future__ import annotations

import os
import re
import tomllib
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_DATA_ROOT = Path("/var/lib/trenvx")
DEFAULT_PORT = 5000
AGENT_PORT = 49983
"""The TCP port the guest agent listens on inside every VM (the port of E2B's envd)."""
INTERPRETER_PORT = 49999
"""The code interpreter's port in templates that run it (E2B's code-interpreter port)."""
USER_NAME_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
"""A portable account name (what Debian's adduser accepts by default)."""


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid. The message says what to fix."""


class VmmType(str, Enum):
    qemu = "qemu"
    firecracker = "firecracker"
    cloud_hypervisor = "cloud-hypervisor"


class StartMode(str, Enum):
    snapshot = "snapshot"
    snapshot_private = "snapshot-private"
    boot = "boot"


class Accelerator(str, Enum):
    auto = "auto"
    kvm = "kvm"
    tcg = "tcg"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class StartCommand(_Strict):
    """A command started in the template VM before the snapshot; it keeps running in every sandbox."""

    cmd: str = ""
    working_dir: str = "/"
    envfile_path: str = ""
    """A file of KEY=VALUE lines (relative to the config file) exported to the start command."""


TEMPLATE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A template's name or alias (the API's template ids)."""


class TemplateConfig(_Strict):
    """One ``[template."NAME"]`` table."""

    name: str = ""
    vcpu: int = Field(default=1, ge=1, le=64)
    mem_mb: int = Field(default=256, ge=64, le=1024 * 1024)
    disk_mb: int = Field(default=512, ge=0, le=1024 * 1024)
    """Free space added to the root filesystem on top of its content; in overlay mode the size of
    the writable layer (at least 64 MiB)."""
    kernel_version: str = "auto"
    """Debian kernel ABI such as ``6.1.0-28``; ``auto`` takes the newest cloud kernel apt offers."""
    docker_img: str = ""
    dockerfile: str = ""
    context: str = ""
    """Build context of the Dockerfile; defaults to the Dockerfile's directory."""
    no_pull: bool = False
    huge_pages: bool = False
    overlay: bool | None = None
    """The root filesystem as TrEnv-X's overlay mode: the template's image on virtio-pmem, mapped
    with DAX and shared by every sandbox (no copy in any guest's page cache), under a writable
    layer on each sandbox's own disk. ``None`` (the default): on with QEMU, off with Firecracker
    (no virtio-pmem: ``true`` is refused) and Cloud Hypervisor (supported, not yet run)."""
    vmm_type: VmmType = VmmType.qemu
    start_cmd: StartCommand = StartCommand()
    ready_cmd: str = ""
    ready_timeout_s: float = Field(default=120.0, gt=0)
    boot_timeout_s: float = Field(default=300.0, gt=0)
    code_interpreter: bool = False
    """Run trenvx's code interpreter in the template's sandboxes: a server on port 49999 speaking
    E2B's code-interpreter protocol, with a Python kernel (numpy, pandas, matplotlib imported when
    the image has them) already running in the snapshot. The image needs python3-ipykernel and
    python3-jupyter-client (configs/code-interpreter/Dockerfile)."""
    aliases: list[str] = Field(default_factory=list)
    """Other names a create may give for this template (E2B's SDKs ask for ``code-interpreter-v1``,
    TrEnv-X's for ``default-code-interpreter``). Not an input of the build."""
    user: str = "user"
    """The account commands and file calls of the template's sandboxes run as when a request names
    none (E2B's default user). Every build has ``user`` (uid 1000, home /home/user, passwordless
    sudo where sudo is installed); another name must be an account of the image, e.g. ``root``.
    ``start_cmd`` and ``ready_cmd`` run as root whatever this says."""

    @field_validator("user")
    @classmethod
    def _user_name(cls, v: str) -> str:
        if not USER_NAME_RE.fullmatch(v):
            raise ValueError(
                f"{v!r} is not a user name: use lowercase letters, digits, '_' and '-', starting with "
                "a letter or '_', at most 32 characters (e.g. \"user\" or \"root\")"
            )
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "TemplateConfig":
        if self.docker_img and self.dockerfile:
            raise ValueError("set either docker_img or dockerfile, not both")
        return self


class OrchestratorConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_PORT, ge=1, le=65535)
    api_key: str = ""
    default_timeout_s: int = Field(default=300, ge=1)
    max_sandboxes: int = Field(default=500, ge=1)
    max_sandboxes_per_template: int = Field(default=500, ge=1)
    memory_headroom_mb: int = Field(default=1024, ge=0)
    """Refuse a sandbox (503) when, after reserving its whole guest RAM, less than this would be left."""
    max_timeout_s: int = Field(default=24 * 3600, ge=1)
    """The longest timeout a sandbox may be given (POST /sandboxes, POST /sandboxes/{id}/timeout)."""
    domain: str = "localhost"
    """The sandbox domain: ``PORT-SANDBOXID.<domain>`` in a request's Host reaches PORT inside a sandbox."""
    keep_on_exit: bool = False
    """Leave sandboxes running when the server stops, for a restarted server to adopt (``--keep``)."""
    log_file: str = ""
    """Server log file; empty: data_root/run/server.log."""
    reaper_interval_s: float = Field(default=1.0, gt=0, le=60)
    """How often expired sandboxes are looked for."""
    ended_retention_s: int = Field(default=3600, ge=0)
    """How long ended sandboxes stay listed (``sandbox ls -a``, ``GET /v2/sandboxes?state=exited``) and
    explained in 404s; then they are forgotten (0: at once)."""
    ended_retention_max: int = Field(default=500, ge=0)
    """The most ended sandboxes kept, whatever their age: past it the ones that ended first are
    forgotten as others end (0: none kept). 500, as many as ``max_sandboxes`` lets run by default: a
    full server killed at once is still explained, and a busy hour of short-lived sandboxes (a test
    suite, a benchmark) is not listed by the thousand."""
    paused_retention_s: int = Field(default=7 * 24 * 3600, ge=0)
    """How long a sandbox may stay paused (by a pause call or its lifecycle's auto-pause); past it
    the sandbox is killed (end reason ``paused_retention_expired``) and its files removed. 0: kept
    until killed."""
    auto_resume_wait_s: float = Field(default=120.0, gt=0, le=3600)
    """How long a request through the proxy waits for the auto-resume of a paused sandbox it woke
    (past it: 503 with Retry-After; the resume goes on)."""
    start_mode: StartMode = StartMode.snapshot
    """How a sandbox starts. ``snapshot``: restored from the template's snapshot, guest RAM shared
    copy-on-write (the product). The other two are baselines for ``benchmarks/``:
    ``snapshot-private`` restores from a full snapshot into private memory (E2B-style: every
    sandbox a copy of the guest RAM); ``boot`` boots the template's kernel and disk with no snapshot
    (its ``start_cmd`` does not run). Pools are used only with ``snapshot``."""
    max_request_body_kb: int = Field(default=1024, ge=1)
    """Largest body of an API request (the proxy to sandboxes is not limited)."""
    health_check_interval_s: float = Field(default=15.0, ge=0, le=3600)
    """How often the agent of every running sandbox is asked ``/health`` (paused ones are skipped);
    0: never. Each ask may take up to this long (at most 5 s)."""
    health_check_grace_s: float = Field(default=120.0, gt=0, le=24 * 3600)
    """A running sandbox whose agent has not answered ``/health`` for this long is ended (reason
    ``unresponsive``). Generous: under TCG on a loaded host an agent can be slow for tens of seconds
    without being hung."""
    orphan_watchdog: bool = True
    """Start a small process with the server that, should the server die without a successor,
    ends its sandboxes at their timeouts (see :mod:`trenvx.sandbox.orphan_watchdog`)."""


class PoolConfig(_Strict):
    """Pools of VMs made ahead of creates, per template (``[pool]``).

    - **warm**: a VMM process started and waiting for the snapshot (``-incoming defer``), its QMP
      connected and its disk overlay made; a create loads the snapshot, resumes and gives the
      identity.
    - **hot**: a sandbox already restored, resumed and warmed up (its agent has answered, the
      ``hot_warmup_cmd`` has run once); a create only gives it its identity. Under TCG this skips
      the ~300 ms a new QEMU process spends translating guest code on its first request, at the
      memory cost of a running, warmed-up sandbox for each one kept (measured: 83 MiB PSS each,
      most of it TCG's translated code; far less under KVM). On by default with 2 kept.

    Each tier is refilled in the background to ``clamp(min, creates in the last
    demand_window_s, max)``, and never while the host has less than ``memory_headroom_mb`` plus one
    guest's RAM available. A create never waits for a refill: an empty pool means the slower path.
    """

    templates: list[str] | None = None
    """Templates that get pools; unset: the default template (``template_manager.template_id``)."""
    warm_min: int = Field(default=2, ge=0)
    warm_max: int = Field(default=16, ge=0)
    hot_min: int = Field(default=2, ge=0)
    hot_max: int = Field(default=16, ge=0)
    hot_warmup_cmd: str = "python3 -c pass"
    """Run once in each hot sandbox before it is handed out (empty: only the agent's health)."""
    demand_window_s: float = Field(default=60.0, gt=0)
    refill_parallelism: int = Field(default=2, ge=1, le=64)
    """VMs made at once while refilling."""
    refill_priority: Literal["normal", "nice", "idle"] = "normal"
    """CPU priority of a VM while it is made and kept for a pool (a create takes it back to normal):
    ``normal``; ``nice`` (nice 10, the policy before issue 18); ``idle`` (its cgroup's ``cpu.idle``,
    else nice 10 + ``SCHED_IDLE``). Measured side by side (benchmarks/start_latency.py --modes
    hot,hot-nice,hot-normal, 100 creates 0.5 s apart, TCG, 2 cores): a create's p99 was 115 ms with
    refills at normal priority, 142 ms at nice and 955 ms idle, because a starved refill empties the
    pool and a quarter of the creates then restore cold. A full pool matters more than the CPU a
    refill takes from the create beside it; ``idle`` suits a host where creates come rarely and
    other work must not be disturbed."""

    @model_validator(mode="after")
    def _min_le_max(self) -> "PoolConfig":
        for tier in ("warm", "hot"):
            lo, hi = getattr(self, f"{tier}_min"), getattr(self, f"{tier}_max")
            if lo > hi:
                raise ValueError(f"{tier}_min ({lo}) is larger than {tier}_max ({hi})")
        return self


class NetworkMode(str, Enum):
    auto = "auto"
    netns = "netns"
    user = "user"


DEFAULT_BLOCKED_CIDRS = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
    "168.63.129.16/32",
)
"""Never reachable from a sandbox: this host's own and neighbouring networks (private ranges,
carrier-grade NAT, link-local with the cloud metadata address 169.254.169.254, Azure's platform
address 168.63.129.16, multicast)."""


class NetworkConfig(_Strict):
    """How sandboxes are networked (``[network]``).

    ``netns`` (the default wherever it can run: root, network namespaces, tap, nftables): every
    sandbox's VMM runs in a network namespace of its own (a *slot*) with a tap device; the guest
    keeps the address baked into the snapshot (10.0.2.15) and the namespace translates it to the
    slot's own address. The host reaches the guest only through that address; the guest reaches
    neither the host nor other sandboxes, and its egress follows its rules (E2B's allowOut /
    denyOut) below ``blocked_cidrs``. ``user``: QEMU's user networking, restricted: the guest
    reaches nothing at all (no egress), the host reaches it through port forwards on 127.0.0.1.
    ``auto``: netns where it works, else user with a warning (``trenvx doctor`` says why).

    A template is built for one mode (its snapshot holds the network device's backend): changing
    the mode rebuilds templates.
    """

    mode: NetworkMode = NetworkMode.auto
    slot_cidr: str = "10.200.0.0/16"
    """Addresses of the slots as the host sees them: a /30 per slot (host end, slot end)."""
    blocked_cidrs: list[str] = Field(default_factory=lambda: list(DEFAULT_BLOCKED_CIDRS))
    """Destinations no sandbox reaches, whatever its rules (the operator's word wins over allowOut)."""
    route_without_nat: list[str] = Field(default_factory=list)
    """Destinations reached with the slot's own address (routed, not masqueraded): for an
    upstream that routes ``slot_cidr`` back to this host. Everything else is masqueraded."""
    dns_upstreams: list[str] = Field(default_factory=list)
    """Resolvers asked for sandboxes (``IP`` or ``IP:PORT``), from each sandbox's namespace (so
    ``blocked_cidrs`` apply: never the host's own resolver); empty: 8.8.8.8 and 1.1.1.1."""
    slot_pool: int = Field(default=4, ge=0, le=256)
    """Slots (namespace, veth, tap, rules) made ahead of creates."""

    @field_validator("slot_cidr")
    @classmethod
    def _slot_cidr(cls, v: str) -> str:
        import ipaddress

        try:
            net = ipaddress.IPv4Network(v)
        except ValueError as e:
            raise ValueError(f"{v!r} is not an IPv4 network such as 10.200.0.0/16 ({e})") from None
        if net.prefixlen > 28:
            raise ValueError(f"{v} holds fewer than 4 slots; use a /28 or larger (e.g. /16)")
        return v

    @field_validator("blocked_cidrs", "route_without_nat")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        import ipaddress

        for c in v:
            try:
                ipaddress.IPv4Network(c, strict=False)
            except ValueError:
                raise ValueError(f"{c!r} is not an IPv4 address or CIDR block") from None
        return v


class TemplateManagerConfig(_Strict):
    template_id: str = "default-sandbox"
    keep_builds: int = Field(default=2, ge=1)
    """Builds kept per template after a new one is published: the current one and the newest
    others, up to this many; older ones go unless a sandbox (running or paused) or a snapshot
    stands on them. Each build holds the template's memory and disk (gigabytes)."""


class VmmConfig(_Strict):
    """Knobs of the VMM processes (all VMMs)."""

    accelerator: Accelerator = Accelerator.auto
    tcg_tb_size_mb: int = Field(default=64, ge=1)
    """TCG's translation cache per VM (only the part used costs memory). Starting python3 in a
    guest fills ~50 MiB of it; at 32 MiB the cache flushed and retranslated on every command."""
    qemu_binary: str = "qemu-system-x86_64"


class JailConfig(_Strict):
    """``[jail]``: what each sandbox's VMM process runs with (trenvx.vmm.jail): its own uid and gid,
    no capabilities, a mount namespace showing only its sandbox's files, a cgroup with the
    template's limits, QEMU's seccomp policy. Template builds are not jailed."""

    enabled: bool | Literal["auto"] = "auto"
    """``auto``: on where the host allows it (the server runs as root); each piece the host does not
    allow (mount namespaces, cgroups, QEMU's ``-sandbox``) is left out with a log line, as
    ``trenvx doctor`` reports. ``true``: refuse to start sandboxes unless VMMs can get their own uid."""
    uid_base: int = Field(default=3_000_000, ge=1000, le=2**31 - 2**20)
    """VMMs get uids (and equal gids) ``uid_base + 1`` .. ``uid_base + uid_count - 1``, claimed host-wide;
    ``uid_base`` itself is the group that may read shared template files. No passwd entries needed;
    pick a range no user, container or ``/etc/subuid`` entry uses."""
    uid_count: int = Field(default=65536, ge=2, le=2**20)
    memory_overhead_mb: int = Field(default=384, ge=0)
    """The VMM's memory limit is the template's ``mem_mb`` plus this (QEMU itself, TCG's translation
    cache of ``[vmm] tcg_tb_size_mb``, device buffers)."""
    pids_max: int = Field(default=512, ge=16)
    """Threads and processes of one VMM (QEMU's block I/O pool alone may start 64 threads)."""
    cpu_weight: int = Field(default=100, ge=1, le=10000)
    """The cgroup v2 ``cpu.weight`` of a sandbox's VMM (v1: ``cpu.shares`` = weight * 10.24); a
    pool's VMs run at idle weight until a create takes one."""
    mount_namespace: bool = True
    """Hide the rest of data_root from each VMM (where the host allows mount namespaces)."""


class ClusterConfig(_Strict):
    """Many nodes, one API (``[cluster]``, or ``trenvx serve --cluster etcd://...``). Empty ``etcd``:
    a single machine, no etcd, nothing of this runs.

    Each node registers in etcd under a lease it renews every ``lease_ttl_s / 3``; a node that
    stops renewing is dead ``lease_ttl_s`` later, and its sandboxes are reported lost. A request to
    any node works for every sandbox: a create is placed (the best of ``candidates`` nodes by
    memory headroom, preferring nodes that hold the template's build and a hot pool), and a
    sandbox's requests go to the node that owns it."""

    etcd: str = ""
    """``etcd://HOST:PORT[,HOST:PORT...]``: the members of the etcd cluster (any of them will do)."""
    name: str = ""
    """This node's name, unique in the cluster; empty: the host name plus the API port."""
    advertise_url: str = ""
    """Where the other nodes reach this node's API (``http://HOST:PORT``); empty: from
    ``[orchestrator] host`` and ``port`` (a wildcard host becomes the host's name)."""
    prefix: str = "/trenvx"
    """The etcd key prefix of this cluster (several clusters can share one etcd)."""
    lease_ttl_s: int = Field(default=10, ge=2, le=300)
    candidates: int = Field(default=3, ge=1, le=64)
    """K of "best of K": nodes sampled for each create, the best of them chosen."""
    secret: str = ""
    """What nodes prove to each other on internal requests (placed creates, template copies); empty:
    derived from the API key (``TRENVX_CLUSTER_SECRET`` wins). Nodes without either answer
    internal requests from loopback only."""
    etcd_timeout_s: float = Field(default=2.0, gt=0, le=60)
    """How long one etcd request may take before the next member is tried."""

    @field_validator("etcd")
    @classmethod
    def _etcd(cls, v: str) -> str:
        v = v.strip()
        if v and not re.fullmatch(r"(etcd|etcd\+https?|https?)://[^\s/]+(,[^\s/,]+)*/?", v):
            raise ValueError(f"{v!r} is not an etcd address; use etcd://HOST:PORT[,HOST:PORT...]")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", v):
            raise ValueError(f"node name {v!r}: use letters, digits, '.', '_' and '-' (at most 63)")
        return v

    @property
    def enabled(self) -> bool:
        return bool(self.etcd)


class Config(_Strict):
    data_root: Path = DEFAULT_DATA_ROOT
    fc_binary_path: str = ""
    ch_binary_path: str = ""
    orchestrator: OrchestratorConfig = OrchestratorConfig()
    template_manager: TemplateManagerConfig = TemplateManagerConfig()
    vmm: VmmConfig = VmmConfig()
    pool: PoolConfig = PoolConfig()
    network: NetworkConfig = NetworkConfig()
    cluster: ClusterConfig = ClusterConfig()
    jail: JailConfig = JailConfig()
    template: dict[str, TemplateConfig] = Field(default_factory=dict)
    source_path: Path | None = Field(default=None, exclude=True)

    @field_validator("template", mode="before")
    @classmethod
    def _name_templates(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: ({**t, "name": k} if isinstance(t, dict) else t) for k, t in v.items()}
        return v

    @model_validator(mode="after")
    def _aliases_unique(self) -> "Config":
        seen: dict[str, str] = {}
        for name, tpl in self.template.items():
            for alias in tpl.aliases:
                if not TEMPLATE_NAME_RE.fullmatch(alias):
                    raise ValueError(f"template {name!r}: alias {alias!r} is not a template name (letters, digits, "
                                     "'.', '_' and '-', starting with a letter or digit)")
                other = seen.get(alias) or (alias if alias in self.template else None)
                if other is not None:
                    raise ValueError(f"template {name!r}: alias {alias!r} is already the name or an alias of "
                                     f"template {other!r}; names and aliases must be unique")
                seen[alias] = name
        return self

    def canonical_template(self, name: str) -> str:
        """The configured template ``name`` is an alias of, else ``name`` itself."""
        if name in self.template:
            return name
        for tpl_name, tpl in self.template.items():
            if name in tpl.aliases:
                return tpl_name
        return name

    def get_template(self, name: str) -> TemplateConfig:
        try:
            return self.template[name]
        except KeyError:
            known = ", ".join(sorted(self.template)) or "none"
            raise ConfigError(
                f"template {name!r} is not defined in {self.source_path or 'the config'} "
                f"(defined: {known}); add a [template.\"{name}\"] table"
            ) from None

    @property
    def default_template(self) -> str:
        return self.template_manager.template_id


def _format_error(path: Path, err: ValidationError) -> str:
    lines = [f"invalid configuration in {path}:"]
    for e in err.errors():
        loc = list(e["loc"])
        where = ".".join(str(p) for p in loc)
        if len(loc) >= 2 and loc[0] == "template":
            where = f'[template."{loc[1]}"] key ' + (".".join(str(p) for p in loc[2:]) or "(table)")
        else:
            where = f"key {where}"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; see configs/example_config.toml)"
        elif e["type"] == "enum":
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def _check_files(cfg: Config, base: Path) -> Config:
    """Resolve relative paths against the config's directory and check the files exist."""
    templates = {}
    for name, t in cfg.template.items():
        updates: dict[str, Any] = {}
        if t.dockerfile:
            df = (base / t.dockerfile).resolve()
            if not df.is_file():
                raise ConfigError(
                    f'[template."{name}"] key dockerfile in {cfg.source_path}: '
                    f"file {df} does not exist; fix the path (relative paths start at {base})"
                )
            updates["dockerfile"] = str(df)
            ctx = (base / t.context).resolve() if t.context else df.parent
            if not ctx.is_dir():
                raise ConfigError(
                    f'[template."{name}"] key context in {cfg.source_path}: directory {ctx} does not exist'
                )
            updates["context"] = str(ctx)
        if t.start_cmd.envfile_path:
            ef = (base / t.start_cmd.envfile_path).resolve()
            if not ef.is_file():
                raise ConfigError(
                    f'[template."{name}"] key start_cmd.envfile_path in {cfg.source_path}: '
                    f"file {ef} does not exist"
                )
            updates["start_cmd"] = t.start_cmd.model_copy(update={"envfile_path": str(ef)})
        templates[name] = t.model_copy(update=updates) if updates else t
    data_root = cfg.data_root if cfg.data_root.is_absolute() else (base / cfg.data_root).resolve()
    return cfg.model_copy(update={"template": templates, "data_root": data_root})


def parse_config(data: dict[str, Any], path: Path) -> Config:
    try:
        cfg = Config.model_validate({**data, "source_path": path})
    except ValidationError as e:
        raise ConfigError(_format_error(path, e)) from None
    return _check_files(cfg, path.parent)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file. ``TRENVX_DATA_ROOT`` overrides ``data_root``."""
    p = Path(path).resolve()
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist; pass --config with the path of a TOML file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    if env_root := os.environ.get("TRENVX_DATA_ROOT"):
        data["data_root"] = env_root
    return parse_config(data, p)
