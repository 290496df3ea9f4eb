"""Request and response bodies of the HTTP API, in the shapes of E2B's REST API.

Field names are E2B's (camelCase, ``sandboxID``, ``templateID``, ...), so that E2B's clients
parse our answers. trenvx-only information sits in an extra ``trenvx`` object (E2B's generated
clients keep unknown fields aside) or in extra top-level fields they ignore. Fields are
type-checked strictly: ``"timeout": "60"`` is a 400, not a 60.

E2B options trenvx does not implement yet (``autoPause: true``, ``mcp``, ``volumeMounts``, the
network's ``rules``, ...) are parsed here and refused by the routes with a 400 naming them
(:mod:`.unimplemented` holds the one list); their documented schema admits only the values that
change nothing. Fields unknown to the create body are ignored (a newer E2B SDK's). The ``network``
objects are stricter: they decide what a sandbox may reach, so an unknown key is a 400 naming it.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictStr, StringConstraints, WithJsonSchema,
    field_validator,
)

SANDBOX_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,63}$"
TEMPLATE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
SANDBOX_ID_RE = re.compile(SANDBOX_ID_PATTERN)
TEMPLATE_ID_RE = re.compile(TEMPLATE_ID_PATTERN)
TEMPLATE_REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(:[A-Za-z0-9._-]{1,64})?$"
"""A template id as a create names it: E2B's SDK adds a tag to snapshot ids (``abc:default``)."""
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")

MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY = 256
MAX_METADATA_VALUE = 4096
MAX_ENV_VARS = 512
MAX_ENV_VALUE = 128 * 1024
MAX_EGRESS_ENTRIES = 1000
"""Entries of ``allowOut`` or ``denyOut`` (each becomes an element of the sandbox's firewall sets)."""
MAX_DNS_SERVERS = 10
"""Entries of ``dnsServers`` (E2B's limit)."""

SandboxStateName = Literal["running", "paused", "exited"]


def json_integer(v: Any, unit: str = "") -> Any:
    """A JSON integer (``60`` or ``60.0``), not a string, a bool or a fraction."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"must be an integer number{unit}")
    if isinstance(v, float):
        if not v.is_integer():
            raise ValueError(f"must be a whole number{unit}")
        return int(v)
    return v


def _json_int(v: Any) -> Any:
    return json_integer(v, " of seconds")


JsonInt = Annotated[int, BeforeValidator(_json_int)]
"""Seconds as a JSON integer (pydantic's lax mode would take ``"60"``)."""
JsonInteger = Annotated[int, BeforeValidator(json_integer)]
"""A count or size as a JSON integer. Bounds go before the validator, ``Annotated[int, Field(ge=..),
BeforeValidator(json_integer)]``: after it pydantic writes ``ge`` into the JSON schema, not ``minimum``."""
PortNumber = Annotated[int, Field(ge=1, le=65535), BeforeValidator(json_integer)]

# E2B features trenvx refuses (400 "not supported by trenvx", from the routes): the document says
# only their empty forms are accepted, the models still parse the rest so that the refusal names them.
_UNSUPPORTED = "Not supported by trenvx: only the empty form is accepted."
UnsupportedRules = Annotated[
    dict[str, Any] | None,
    WithJsonSchema({"anyOf": [{"type": "object", "maxProperties": 0}, {"type": "null"}], "description": _UNSUPPORTED}),
]
UnsupportedProxy = Annotated[dict[str, Any] | None, WithJsonSchema({"type": "null", "description": _UNSUPPORTED})]
UnsupportedPorts = Annotated[
    list[PortNumber] | None,
    WithJsonSchema({"anyOf": [{"type": "array", "maxItems": 0, "items": {"type": "integer"}}, {"type": "null"}],
                    "description": _UNSUPPORTED}),
]

# E2B create options trenvx does not implement yet (refused by the routes, see .unimplemented):
# parsed loosely enough that the refusal, not a type error, names them; documented with only the
# values that change nothing.
_NOT_YET = "Not implemented in trenvx yet: only the value(s) that change nothing are accepted."
UnimplementedObject = Annotated[
    dict[str, Any] | None,
    WithJsonSchema({"anyOf": [{"type": "object", "maxProperties": 0}, {"type": "null"}], "description": _NOT_YET}),
]
UnimplementedList = Annotated[
    list[dict[str, Any]] | None,
    WithJsonSchema({"anyOf": [{"type": "array", "maxItems": 0, "items": {"type": "object"}}, {"type": "null"}],
                    "description": _NOT_YET}),
]


class AutoResumeConfig(BaseModel):
    """E2B's ``SandboxAutoResumeConfig`` (``enabled`` is required there too)."""

    model_config = ConfigDict(extra="ignore")
    enabled: StrictBool = Field(description="true: traffic through the proxy resumes the sandbox while it is paused.")


class IamConfig(BaseModel):
    """E2B's ``SandboxIam``: a non-empty ``tokens`` map would enable workload identity."""

    model_config = ConfigDict(extra="ignore")
    tokens: dict[str, Any] | None = None


UnimplementedIam = Annotated[
    IamConfig | None,
    WithJsonSchema({"anyOf": [{"type": "object", "properties": {"tokens": {
        "anyOf": [{"type": "object", "maxProperties": 0}, {"type": "null"}]}}}, {"type": "null"}],
        "description": _NOT_YET}),
]

MetadataKey = Annotated[StrictStr, StringConstraints(min_length=1, max_length=MAX_METADATA_KEY)]
MetadataValue = Annotated[StrictStr, StringConstraints(max_length=MAX_METADATA_VALUE)]
EnvName = Annotated[StrictStr, StringConstraints(pattern=ENV_NAME_RE.pattern)]
EnvValue = Annotated[StrictStr, StringConstraints(max_length=MAX_ENV_VALUE, pattern=r"^[^\x00]*$")]
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(\.{_OCTET}){{3}}"
_CIDR = rf"{_IPV4}(/(3[0-2]|[12]?[0-9]))?"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"(\*\.)?{_LABEL}(\.{_LABEL})*\.?"


def _documented(pattern: str, max_length: int) -> WithJsonSchema:
    """The OpenAPI document states the exact form; the parser (network.policy) checks it and says
    what is wrong with an entry in words a pattern cannot (``denyOut takes no domain names; ...``)."""
    return WithJsonSchema({"type": "string", "minLength": 1, "maxLength": max_length, "pattern": f"^({pattern})$"})


AllowEntry = Annotated[StrictStr, StringConstraints(min_length=1, max_length=253),
                       _documented(f"{_CIDR}|{_DOMAIN}", 253)]
DenyEntry = Annotated[StrictStr, StringConstraints(min_length=1, max_length=253), _documented(_CIDR, 18)]
DnsServer = Annotated[StrictStr, StringConstraints(min_length=1, max_length=64), _documented(_IPV4, 15)]


class Error(BaseModel):
    """Every error: the HTTP status again as ``code``, and what went wrong (naming the field)."""

    code: int
    message: str


def _utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode (a lone surrogate?)") from None


def _check_metadata(v: dict[str, str] | None) -> dict[str, str] | None:
    if v is None:
        return v
    for k, val in v.items():
        _utf8(k, "a key")
        _utf8(val, f"the value of {k!r}")
    if len(v) > MAX_METADATA_ENTRIES:
        raise ValueError(f"at most {MAX_METADATA_ENTRIES} entries")
    for k, val in v.items():
        if not k or len(k) > MAX_METADATA_KEY:
            raise ValueError(f"keys must have 1 to {MAX_METADATA_KEY} characters (got {k[:40]!r})")
        if len(val) > MAX_METADATA_VALUE:
            raise ValueError(f"the value of {k!r} is longer than {MAX_METADATA_VALUE} characters")
    return v


def _check_env(v: dict[str, str] | None) -> dict[str, str] | None:
    if v is None:
        return v
    if len(v) > MAX_ENV_VARS:
        raise ValueError(f"at most {MAX_ENV_VARS} variables")
    for k, val in v.items():
        if not ENV_NAME_RE.match(k):
            raise ValueError(f"{k[:40]!r} is not a valid variable name (letters, digits, _; not starting with a digit)")
        _utf8(val, f"the value of {k!r}")
        if "\x00" in val or len(val) > MAX_ENV_VALUE:
            raise ValueError(f"the value of {k!r} contains a NUL byte or is longer than {MAX_ENV_VALUE} characters")
    return v


_EGRESS_DOC = {
    "allowOut": "Destinations the sandbox may reach: IPv4 addresses, CIDR blocks, domains (`example.com`, "
                "`*.example.com`; matched on the HTTP Host / TLS SNI of each connection). Allow wins over deny.",
    "denyOut": "IPv4 addresses or CIDR blocks the sandbox may not reach (`0.0.0.0/0`: everything not allowed).",
    "dnsServers": "IPv4 resolvers opened when allowOut names a domain (omitted: 8.8.8.8; `[]`: none).",
}


class EgressFields(BaseModel):
    """The egress rules, in the create body's ``network`` and in PUT /network alike."""

    model_config = ConfigDict(extra="forbid")

    allowOut: list[AllowEntry] | None = Field(default=None, max_length=MAX_EGRESS_ENTRIES,
                                               description=_EGRESS_DOC["allowOut"])
    denyOut: list[DenyEntry] | None = Field(default=None, max_length=MAX_EGRESS_ENTRIES,
                                              description=_EGRESS_DOC["denyOut"])
    dnsServers: list[DnsServer] | None = Field(default=None, max_length=MAX_DNS_SERVERS,
                                               description=_EGRESS_DOC["dnsServers"])


class NetworkConfig(EgressFields):
    """``network`` of POST /sandboxes (E2B's ``SandboxNetworkConfig``)."""

    allowPublicTraffic: StrictBool | None = Field(
        default=None,
        description="false: the sandbox's ports (not the agent's) answer only requests carrying its "
                    "`trafficAccessToken` in the `e2b-traffic-access-token` header. Default true.",
    )
    maskRequestHost: Annotated[StrictStr, StringConstraints(max_length=253)] | None = Field(
        default=None, description="Accepted and reported back (E2B's field); trenvx's proxy does not rewrite Host.",
    )
    httpsPorts: UnsupportedPorts = None
    rules: UnsupportedRules = None
    egressProxy: UnsupportedProxy = None


class NetworkUpdate(EgressFields):
    """PUT /sandboxes/{sandboxID}/network (E2B's ``SandboxNetworkUpdateConfig``): replaces the egress
    rules; an omitted field is cleared (``allowOut``/``denyOut`` empty, ``dnsServers`` the default)."""

    allow_internet_access: StrictBool | None = Field(
        default=None, description="false: the same as denyOut [\"0.0.0.0/0\"] (allowOut still applies).")
    rules: UnsupportedRules = None
    egressProxy: UnsupportedProxy = None


class SandboxNetworkInfo(BaseModel):
    """``network`` of GET /sandboxes/{sandboxID}: the rules in force (as E2B reports them)."""

    allowOut: list[str] = Field(default_factory=list)
    denyOut: list[str] = Field(default_factory=list)
    dnsServers: list[str] | None = Field(default=None, description="Only when allowOut names a domain.")
    allowPublicTraffic: bool = True
    maskRequestHost: str | None = None


class NewSandbox(BaseModel):
    """POST /sandboxes and POST /v2/sandboxes (E2B's ``NewSandbox``/``NewSandboxV2``). Unknown fields
    are kept aside (``model_extra``) only to be logged, and otherwise ignored."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": True})

    templateID: Annotated[StrictStr, Field(min_length=1, max_length=193, pattern=TEMPLATE_REF_PATTERN)] | None = Field(
        default=None,
        description="Template name, or a snapshot id (`<id>:default`; the tag `default` or `latest` may follow any "
                    "name). Absent (or null), or E2B's default `base`, means the server's default template."
    )
    timeout: JsonInt | None = Field(
        default=None, description="Seconds until the sandbox is killed (default: orchestrator.default_timeout_s)."
    )
    metadata: dict[MetadataKey, MetadataValue] | None = Field(
        default=None, max_length=MAX_METADATA_ENTRIES, description="Free-form labels, filterable."
    )
    envVars: dict[EnvName, EnvValue] | None = Field(
        default=None, max_length=MAX_ENV_VARS, description="Environment of every process."
    )
    autoPause: StrictBool | None = Field(
        default=None, description="true: when its timeout ends the sandbox is paused to disk, not killed (E2B's "
                                  "lifecycle on_timeout \"pause\"). Default false.")
    autoPauseMemory: StrictBool | None = Field(
        default=None, description="With autoPause: true (default) keeps its memory, so processes resume; false keeps "
                                  "only its filesystem (a resume boots it, and traffic does not wake it).")
    autoResume: AutoResumeConfig | None = Field(
        default=None, description="enabled true: a request through the proxy to the sandbox while it is paused "
                                  "(with its memory) resumes it and is then answered. Default false.")
    secure: StrictBool | None = Field(
        default=None, description="Accepted, either value: the agent always requires the sandbox's access token.")
    mcp: UnimplementedObject = Field(default=None, description="Not implemented yet: only null or {}.")
    iam: UnimplementedIam = Field(default=None, description='Not implemented yet: only null or {"tokens": {}}.')
    volumeMounts: UnimplementedList = Field(default=None, description="Not implemented yet: only [].")
    allow_internet_access: StrictBool | None = Field(
        default=None, description="false: no egress at all (the same as network.denyOut [\"0.0.0.0/0\"]).")
    network: NetworkConfig | None = Field(default=None, description="Egress rules and public access of the sandbox.")

    @field_validator("metadata")
    @classmethod
    def _valid_metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return _check_metadata(v)

    @field_validator("envVars")
    @classmethod
    def _valid_env(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return _check_env(v)


class CreatedSandbox(BaseModel):
    """201 of POST /sandboxes (E2B's ``Sandbox``) plus the restore's stage timings."""

    templateID: str
    sandboxID: str
    alias: str | None = None
    clientID: str
    envdVersion: str
    envdAccessToken: str
    trafficAccessToken: str | None = Field(
        default=None, description="Set when network.allowPublicTraffic is false: send it as `e2b-traffic-access-token` "
                                  "to reach the sandbox's ports.")
    domain: str | None = None
    startTimes: dict[str, float] = Field(
        default_factory=dict, description="trenvx: milliseconds spent in each stage of the restore."
    )
    startSource: str | None = Field(
        default=None, description="trenvx: hot or warm (taken from a pool) or cold (a new VMM process)."
    )


class PauseDetail(BaseModel):
    """trenvx: what a paused sandbox's pause stored."""

    kind: Literal["memory", "filesystem"] = Field(description="memory: processes resume; filesystem: it boots again.")
    pausedAt: dt.datetime
    storedBytes: int = Field(description="Bytes stored for its memory and device state (the pages that differ "
                                         "from its template's); its disk is its own anyway.")
    ramPages: int = Field(description="Pages of guest RAM stored (4 KiB each).")
    pauseSeconds: float
    frozen: list[str] = Field(default_factory=list, description="Filesystems frozen (synced) before the pause.")
    reason: Literal["requested", "timeout"] = Field(
        default="requested", description="requested: a pause call; timeout: its lifecycle's auto-pause.")


class TrenvxSandboxInfo(BaseModel):
    """trenvx's additions to a listed sandbox."""

    pid: int | None = None
    rssBytes: int | None = None
    pssBytes: int | None = None
    timeoutLeft: float | None = Field(default=None, description="Seconds until the sandbox is killed.")
    endReason: str | None = None
    endedAt: dt.datetime | None = None
    adopted: bool = False
    buildID: str | None = None
    node: str | None = Field(default=None, description="In a cluster: the node that runs (or ran) the sandbox.")
    vmm: str | None = None
    accelerator: str | None = None
    startTimes: dict[str, float] = Field(default_factory=dict, description="Milliseconds per restore stage.")
    startSource: str | None = Field(default=None, description="hot / warm (pool) or cold (new VMM process).")
    pause: PauseDetail | None = Field(default=None, description="Set while the sandbox is paused to disk.")


class ListedSandbox(BaseModel):
    """An item of GET /sandboxes and GET /v2/sandboxes."""

    templateID: str
    alias: str | None = None
    sandboxID: str
    clientID: str
    startedAt: dt.datetime
    endAt: dt.datetime
    cpuCount: int
    memoryMB: int
    diskSizeMB: int
    state: SandboxStateName
    envdVersion: str
    metadata: dict[str, str] = Field(default_factory=dict)
    envdUnresponsiveAtPause: bool | None = Field(
        default=None, description="Paused while its agent did not answer: it resumes only with memory false.")
    trenvx: TrenvxSandboxInfo = Field(default_factory=TrenvxSandboxInfo)


class SandboxLifecycle(BaseModel):
    """``lifecycle`` of GET /sandboxes/{sandboxID} (E2B's ``SandboxLifecycle``)."""

    onTimeout: Literal["kill", "pause"] = Field(description="What its timeout does: kill it, or pause it to disk.")
    autoResume: bool = Field(description="Whether traffic through the proxy resumes it while it is paused.")
    autoPauseMemory: bool = Field(default=True, description="trenvx: whether its auto-pause keeps its memory.")


class SandboxDetail(ListedSandbox):
    """GET /sandboxes/{sandboxID}."""

    envdAccessToken: str | None = None
    trafficAccessToken: str | None = Field(default=None, description="trenvx: as returned by create (E2B's "
                                                                     "SandboxDetail has no such field).")
    allowInternetAccess: bool | None = Field(default=None, description="As given on create or by the last PUT "
                                                                       "/network; null: not set explicitly.")
    domain: str | None = None
    network: SandboxNetworkInfo = Field(default_factory=SandboxNetworkInfo)
    lifecycle: SandboxLifecycle | None = None


class SandboxMetric(BaseModel):
    """An item of GET /sandboxes/{sandboxID}/metrics (E2B's ``SandboxMetric``): one sample."""

    timestamp: dt.datetime = Field(description="When the sample was taken (UTC).")
    timestampUnix: int = Field(description="The same, in seconds since the epoch.")
    cpuCount: int = Field(description="vCPUs of the sandbox.")
    cpuUsedPct: float = Field(description="CPU use over all vCPUs since the previous sample, 0-100.")
    memUsed: int = Field(description="Guest memory in use, bytes (total minus available).")
    memTotal: int = Field(description="Guest memory, bytes.")
    memCache: int = Field(description="Guest page cache, bytes.")
    diskUsed: int = Field(description="Used bytes of the guest's root filesystem.")
    diskTotal: int = Field(description="Size of the guest's root filesystem, bytes.")


class SandboxesWithMetrics(BaseModel):
    """GET /sandboxes/metrics (E2B's ``SandboxesWithMetrics``): sandbox id -> its latest sample."""

    sandboxes: dict[str, SandboxMetric]


class TimeoutRequest(BaseModel):
    """POST /sandboxes/{sandboxID}/timeout: the sandbox ends ``timeout`` seconds from now."""

    model_config = ConfigDict(extra="ignore")
    timeout: JsonInt


class RefreshRequest(BaseModel):
    """POST /sandboxes/{sandboxID}/refreshes: keep the sandbox alive ``duration`` more seconds."""

    model_config = ConfigDict(extra="ignore")
    duration: JsonInt | None = Field(default=None, description="Seconds (default: the default timeout).")


class ReclaimedMemory(BaseModel):
    """POST /sandboxes/{sandboxID}/reclaim (trenvx): memory given back by the sandbox's guest."""

    sandboxID: str
    pssBeforeBytes: int = Field(description="PSS of the sandbox's VMM before the reclaim")
    pssAfterBytes: int
    freedBytes: int
    seconds: float


class ConnectRequest(BaseModel):
    """POST /sandboxes/{sandboxID}/connect: resumes a paused sandbox, and extends the timeout to at
    least ``timeout`` seconds."""

    model_config = ConfigDict(extra="ignore")
    timeout: JsonInt | None = None
    memory: StrictBool | None = Field(
        default=None, description="false: a paused sandbox boots from its disk (its processes are gone) instead of "
                                  "resuming its memory; no effect on a running sandbox.")


class ResumeRequest(ConnectRequest):
    """POST /sandboxes/{sandboxID}/resume (E2B's deprecated ``ResumedSandbox``)."""

    autoPause: StrictBool | None = Field(
        default=None, description="true: from now on its timeout pauses it (as create's autoPause); false: its "
                                  "timeout kills it. Absent: unchanged.")


class PauseRequest(BaseModel):
    """POST /sandboxes/{sandboxID}/pause (E2B's ``SandboxPauseRequest``)."""

    model_config = ConfigDict(extra="ignore")
    memory: StrictBool | None = Field(
        default=None, description="true (default): memory and filesystem, processes resume; false: only the "
                                  "filesystem (synced and frozen first), a resume boots from it.")
    requireHealthyGuest: StrictBool | None = Field(
        default=None, description="true: refuse (503) when the sandbox's agent does not answer, instead of pausing "
                                  "its memory anyway (which then resumes only with memory false).")


class TemplateBuildInfo(BaseModel):
    buildID: str
    status: Literal["building", "waiting", "ready", "error"] = "ready"
    createdAt: dt.datetime
    updatedAt: dt.datetime
    finishedAt: dt.datetime | None = None
    cpuCount: int
    memoryMB: int
    diskSizeMB: int | None = None
    envdVersion: str | None = None
    trenvxBuildID: str = Field(description="trenvx: the build's directory name under data_root/templates/NAME/.")


class Template(BaseModel):
    """An item of GET /templates (E2B's ``Template``)."""

    templateID: str
    buildID: str
    cpuCount: int
    memoryMB: int
    diskSizeMB: int
    public: bool = False
    aliases: list[str]
    names: list[str]
    createdAt: dt.datetime
    updatedAt: dt.datetime
    createdBy: None = None
    lastSpawnedAt: dt.datetime | None = None
    spawnCount: int = 0
    buildCount: int
    envdVersion: str
    buildStatus: Literal["building", "waiting", "ready", "error"] = "ready"
    isDefault: bool = False
    trenvx: dict[str, Any] = Field(default_factory=dict, description="trenvx: VMM, accelerator, stage timings, sizes.")


class TemplateWithBuilds(Template):
    """GET /templates/{templateID}."""

    builds: list[TemplateBuildInfo]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    sandboxes: int
    templates: list[str]
    accelerator: str | None = None
