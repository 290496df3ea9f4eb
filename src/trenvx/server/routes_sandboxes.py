"""Sandbox routes, in the shapes of E2B's REST API.

    POST   /sandboxes, /v2/sandboxes            create (201)
    GET    /sandboxes                           running sandboxes (filter: metadata)
    GET    /v2/sandboxes                        newest first; filters: metadata, state, template,
                                                startedAfter/startedBefore; paginated by an opaque cursor
    GET    /sandboxes/{sandboxID}               one sandbox
    DELETE /sandboxes/{sandboxID}               kill (204)
    POST   /sandboxes/{sandboxID}/timeout       the sandbox ends `timeout` s from now (204)
    POST   /sandboxes/{sandboxID}/refreshes     keep alive `duration` more seconds (204)
    POST   /sandboxes/{sandboxID}/connect       (and /v2/...) E2B's connect: resume (201) or extend (200),
                                                return tokens
    POST   /sandboxes/{sandboxID}/pause         pause to disk (204; 409 if paused, 503 if its agent
                                                does not freeze and the pause needs it)
    POST   /sandboxes/{sandboxID}/resume        resume (201; 409 if running; E2B: deprecated)
    PUT    /sandboxes/{sandboxID}/network       replace the egress rules (204)
    GET    /sandboxes/{sandboxID}/metrics       CPU, memory and disk samples (query start/end: unix seconds)
    GET    /sandboxes/metrics?sandbox_ids=a,b   the latest sample of each (at most 100 ids)

Network (issue 12, E2B's shapes): a create takes ``allow_internet_access`` and ``network``
{allowOut, denyOut, dnsServers, allowPublicTraffic, maskRequestHost}; they become an
:class:`~trenvx.network.policy.EgressPolicy` (a malformed entry is a 400 naming it) that the
manager enforces (a host that cannot is a 409). ``allowPublicTraffic: false`` makes the create
answer carry ``trafficAccessToken``. ``GET /sandboxes/{id}`` reports the rules in force.

Lifecycle (E2B's create fields, :class:`~trenvx.sandbox.lifecycle.LifecyclePolicy`): ``autoPause:
true`` pauses the sandbox to disk at its timeout instead of killing it (with its memory unless
``autoPauseMemory: false``); ``autoResume: {enabled: true}`` lets a request through the proxy
resume it while it is paused with its memory (by its timeout or a pause call). ``GET
/sandboxes/{id}`` reports ``lifecycle`` {onTimeout, autoResume}; the deprecated resume's
``autoPause`` changes it.

E2B options trenvx does not implement (``mcp``, ``iam``, ``volumeMounts``, the network's
``rules``, ``egressProxy``, ``httpsPorts``) are a 400 naming them when given a value that asks for
them, never dropped: a caller relying on them must learn that they are not there. The list is
:data:`.unimplemented.UNIMPLEMENTED_OPTIONS`.

Pause (E2B's shapes, :mod:`trenvx.sandbox.suspend`): ``{memory: false}`` keeps only the
filesystem (a resume boots it); ``requireHealthyGuest: true`` refuses (503) a pause whose agent does
not answer, which otherwise goes ahead and marks the sandbox ``envdUnresponsiveAtPause``: then only a
resume with ``memory: false`` is accepted (409 ``sandbox_snapshot_guest_agent_unresponsive``
otherwise). A paused sandbox's timeout does not run; connect and resume give it back what was left,
extended to their ``timeout`` if that is later.

Metrics (E2B's shape): the server's :class:`~trenvx.sandbox.metrics_sampler.MetricsSampler` samples
every running sandbox's agent every 5 s (less often with many sandboxes) and keeps the last 30
minutes; a sandbox with no sample yet is sampled when asked. Paused sandboxes are not sampled;
ended ones are a 404 like every other route. trenvx has one API key, so every sandbox belongs to
its holder: there is no other team whose sandboxes could be asked for.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import re
import time
import urllib.parse
from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Body, Depends, Query, Request, Response

from ..cluster.records import SandboxEntry
from ..network.policy import EgressPolicy, PolicyError
from ..sandbox.lifecycle import InvalidTimeout, LifecyclePolicy, check_timeout
from ..diskspace import DataRootFull
from ..sandbox.limits import AdmissionError
from ..sandbox.manager import (
    ManagerClosed, NetworkUnavailable, PauseRefused, PauseUnsupported, ResumeRefused, Sandbox, SandboxConflict,
    SandboxManager, SandboxNotFound, TemplateNetworkMismatch,
)
from ..sandbox.metrics_sampler import MetricSample, MetricsSampler
from ..sandbox.snapshots import InvalidSnapshotRequest, template_name_of
from ..sandbox.state import SandboxRecord
from ..template.store import TemplateNotFound
from .auth import require_api_key
from .errors import ApiError, error_response
from .models import (
    ConnectRequest, CreatedSandbox, Error, ListedSandbox, NetworkConfig, NetworkUpdate, NewSandbox, PauseDetail,
    PauseRequest, ReclaimedMemory, RefreshRequest, ResumeRequest, SandboxDetail, SandboxesWithMetrics, SandboxMetric,
    SandboxLifecycle, SandboxNetworkInfo, TimeoutRequest, TrenvxSandboxInfo,
)
from .proxy import announced_domain
from .unimplemented import note_unknown_fields, refuse_unimplemented

log = logging.getLogger(__name__)

E2B_DEFAULT_TEMPLATE = "base"
"""What E2B's SDKs send when no template is named; it means the server's default template."""

ERRORS = {
    400: {"model": Error, "description": "Bad request: the message names the field at fault"},
    401: {"model": Error, "description": "Missing or invalid X-API-Key"},
    403: {"model": Error, "description": "No API key is configured and the caller is not on this machine"},
    404: {"model": Error, "description": "No such sandbox or template"},
    409: {"model": Error, "description": "This server cannot enforce egress rules (the message says why)"},
}

router = APIRouter(dependencies=[Depends(require_api_key)], responses={401: ERRORS[401], 403: ERRORS[403]},
                   tags=["sandboxes"])


def manager_of(request: Request) -> SandboxManager:
    return request.app.state.manager


def _ts(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.UTC)


def _policy(where: str, *, allow_internet_access: bool | None, allow_out: list[str] | None,
            deny_out: list[str] | None, dns_servers: list[str] | None) -> EgressPolicy:
    try:
        return EgressPolicy.from_e2b(allow_internet_access=allow_internet_access, allow_out=allow_out,
                                     deny_out=deny_out, dns_servers=dns_servers)
    except PolicyError as e:  # its message starts with the field: "allowOut: '...' is neither ..."
        raise ApiError(400, f"body field {where}{e}") from None


def egress_of_create(body: NewSandbox) -> EgressPolicy | None:
    """The egress policy a create body asks for; None when it names none (the default: open)."""
    net: NetworkConfig | None = body.network
    if body.allow_internet_access is None and (
        net is None or (net.allowOut is None and net.denyOut is None and net.dnsServers is None)
    ):
        return None
    return _policy("network.", allow_internet_access=body.allow_internet_access,
                   allow_out=net.allowOut if net else None, deny_out=net.denyOut if net else None,
                   dns_servers=net.dnsServers if net else None)


def lifecycle_of_create(body: NewSandbox) -> LifecyclePolicy:
    """The lifecycle a create body asks for (E2B's ``autoPause``, ``autoPauseMemory``, ``autoResume``).
    As in E2B's API, ``autoResume`` stands apart from ``autoPause`` (it also wakes a sandbox paused
    by a pause call); E2B's SDKs refuse the combinations that make no sense before they send them."""
    return LifecyclePolicy(auto_pause=body.autoPause is True, auto_pause_memory=body.autoPauseMemory is not False,
                           auto_resume=body.autoResume is not None and body.autoResume.enabled)


def _lifecycle_info(sb: Sandbox) -> SandboxLifecycle:
    policy = sb.lifecycle
    return SandboxLifecycle(onTimeout=policy.on_timeout, autoResume=policy.auto_resume,
                            autoPauseMemory=policy.auto_pause_memory)


def _network_info(request: Request, sb: Sandbox) -> tuple[SandboxNetworkInfo, bool | None]:
    e2b = sb.egress.to_e2b()
    info = SandboxNetworkInfo(
        allowOut=cast(list[str], e2b.get("allowOut", [])), denyOut=cast(list[str], e2b.get("denyOut", [])),
        dnsServers=cast("list[str] | None", e2b.get("dnsServers")),
        allowPublicTraffic=sb.allow_public_traffic, maskRequestHost=sb.mask_request_host,
    )
    return info, sb.allow_internet_access


def _info_of_running(request: Request, sb: Sandbox, with_memory: bool) -> dict:
    return describe_running(request.app.state, sb, with_memory)


def describe_running(state: Any, sb: Sandbox, with_memory: bool = False) -> dict:
    """A running or paused sandbox as lists show it (``state``: the app's, for its client id and
    envd version)."""
    rss = pss = None
    if with_memory:
        rss, pss = sb.memory()
    m = sb.build.manifest
    info = sb.pause_info
    pause = None if info is None else PauseDetail(
        kind=info.kind, pausedAt=_ts(info.paused_at), storedBytes=info.stored_bytes, ramPages=info.ram_pages,
        pauseSeconds=round(info.seconds, 3), frozen=list(info.frozen),
        reason="timeout" if info.reason == "timeout" else "requested",
    )
    return dict(
        templateID=sb.template, alias=sb.template, sandboxID=sb.id, clientID=state.client_id,
        startedAt=_ts(sb.created_at), endAt=_ts(sb.shown_end_at), cpuCount=m.machine.vcpu, memoryMB=m.machine.mem_mb,
        diskSizeMB=sb.build.disk_mb, state=sb.state, envdVersion=state.envd_version,
        metadata=dict(sb.metadata),
        envdUnresponsiveAtPause=True if info is not None and info.envd_unresponsive else None,
        trenvx=TrenvxSandboxInfo(
            pid=sb.pid or None, rssBytes=rss, pssBytes=pss, timeoutLeft=round(sb.timeout_left, 3), adopted=sb.adopted,
            buildID=m.build_id, vmm=m.vmm_type, accelerator=m.machine.accelerator,
            startTimes={k: round(v * 1000, 3) for k, v in sb.start_times.items()},
            startSource=sb.restored.source, pause=pause, node=_node_name(state),
        ),
    )


def _info_of_ended(request: Request, rec: SandboxRecord) -> dict:
    return describe_ended(request.app.state, rec)


def _node_name(state: Any) -> str | None:
    node = getattr(state, "cluster", None)
    return node.name if node is not None else None


def describe_ended(state: Any, rec: SandboxRecord) -> dict:
    """An ended sandbox as lists show it."""
    return dict(
        templateID=rec.template, alias=rec.template, sandboxID=rec.id, clientID=state.client_id,
        startedAt=_ts(rec.created_at), endAt=_ts(rec.ended_at or rec.end_at), cpuCount=rec.vcpu,
        memoryMB=rec.mem_mb, diskSizeMB=rec.disk_mb, state="exited", envdVersion=state.envd_version,
        metadata=dict(rec.metadata),
        trenvx=TrenvxSandboxInfo(
            pid=rec.pid, timeoutLeft=0.0, endReason=rec.end_reason,
            endedAt=_ts(rec.ended_at) if rec.ended_at else None, buildID=rec.build_id, node=_node_name(state),
        ),
    )


def _domain(request: Request) -> str:
    return announced_domain(request.app.state.domain, request.headers.get("host"))


def _created(request: Request, sb: Sandbox) -> CreatedSandbox:
    return CreatedSandbox(
        templateID=sb.template, sandboxID=sb.id, alias=sb.template, clientID=request.app.state.client_id,
        envdVersion=request.app.state.envd_version, envdAccessToken=sb.access_token,
        trafficAccessToken=sb.traffic_access_token or None, domain=_domain(request),
        startTimes={k: round(v * 1000, 3) for k, v in sb.start_times.items()},
        startSource=sb.restored.source,
    )


def parse_metadata_query(value: str | None) -> dict[str, str]:
    """E2B's metadata filter: ``urlencode({quote(k): quote(v)})``, so unquote after parsing."""
    if not value:
        return {}
    pairs = urllib.parse.parse_qsl(value, keep_blank_values=True)
    return {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in pairs}


def _matches(metadata: dict[str, str], wanted: dict[str, str]) -> bool:
    return all(metadata.get(k) == v for k, v in wanted.items())


def _timeout(value: int | None, default: int, max_s: int, field: str) -> float:
    try:
        return check_timeout(default if value is None else value, max_s, field)
    except InvalidTimeout as e:
        raise ApiError(400, f"body field {field}: {e}") from None


async def _create(request: Request, response: Response, body: NewSandbox) -> CreatedSandbox:
    manager = manager_of(request)
    orch = manager.config.orchestrator
    refuse_unimplemented(body)
    note_unknown_fields(body, "POST /sandboxes")
    timeout = _timeout(body.timeout, orch.default_timeout_s, orch.max_timeout_s, "timeout")
    egress = egress_of_create(body)
    lifecycle = lifecycle_of_create(body)
    public = True if body.network is None or body.network.allowPublicTraffic is None else body.network.allowPublicTraffic
    template = body.templateID or manager.config.default_template
    try:
        template = template_name_of(template)  # a snapshot id: "<id>:default"
    except InvalidSnapshotRequest as e:
        raise ApiError(404, f"body field templateID: {e}") from None
    if template == E2B_DEFAULT_TEMPLATE and template not in manager.templates.names():
        template = manager.config.default_template
    try:
        sb = await manager.create(template, env_vars=body.envVars, metadata=body.metadata, timeout_s=timeout,
                                  egress=egress, allow_public_traffic=public,
                                  allow_internet_access=body.allow_internet_access,
                                  mask_request_host=body.network.maskRequestHost if body.network else None,
                                  lifecycle=lifecycle)
    except TemplateNotFound as e:
        raise ApiError(404, f"body field templateID: {e}") from None
    except PauseUnsupported as e:
        raise ApiError(409, f"body field autoPause: {e}") from None
    except (AdmissionError, InvalidTimeout, ManagerClosed, NetworkUnavailable, TemplateNetworkMismatch):
        raise
    except Exception as e:  # noqa: BLE001 - a VMM or agent failure: the server's fault, said plainly
        log.exception("creating a sandbox of %s failed", template)
        raise ApiError(500, f"the sandbox failed to start: {type(e).__name__}: {e}") from None
    stats = request.app.state.spawns.setdefault(sb.template, {"count": 0, "last": None})
    stats["count"] += 1
    stats["last"] = _ts(sb.created_at)
    created = _created(request, sb)
    response.headers["X-Trenvx-Timings"] = json.dumps(created.startTimes, separators=(",", ":"))
    response.headers["X-Trenvx-Start-Source"] = created.startSource or ""
    response.headers["Location"] = f"/sandboxes/{sb.id}"
    return created


CREATE_RESPONSES = {
    **ERRORS,
    409: {"model": Error, "description": "Egress rules were asked for and this server cannot enforce them, or "
                                         "autoPause for a template whose VMM cannot pause to disk"},
    429: {"model": Error, "description": "A sandbox limit (per host or per template) is reached"},
    500: {"model": Error, "description": "The sandbox failed to start (the message says why)"},
    503: {"model": Error, "description": "Not enough free memory on the host, or the server is stopping"},
}


@router.post("/sandboxes", status_code=201, response_model=CreatedSandbox, responses=CREATE_RESPONSES,
             summary="Create a sandbox from a template")
async def create_sandbox(request: Request, response: Response, body: NewSandbox) -> CreatedSandbox:
    return await _create(request, response, body)


@router.post("/v2/sandboxes", status_code=201, response_model=CreatedSandbox, responses=CREATE_RESPONSES,
             summary="Create a sandbox from a template (E2B v2 path)")
async def create_sandbox_v2(request: Request, response: Response, body: NewSandbox) -> CreatedSandbox:
    return await _create(request, response, body)


@router.get("/sandboxes", response_model=list[ListedSandbox], responses={400: ERRORS[400]},
            summary="List running sandboxes")
async def list_sandboxes(
    request: Request,
    metadata: Annotated[str | None, Query(description="URL-encoded key=value pairs, all must match")] = None,
) -> list[dict]:
    wanted = parse_metadata_query(metadata)
    out = [_info_of_running(request, sb, False) for sb in manager_of(request).list() if _matches(sb.metadata, wanted)]
    for entry in await _cluster_entries(request):
        if entry.state in ("running", "paused") and _matches(entry.metadata, wanted):
            out.append(_entry_info(entry))
    return out


async def _cluster_entries(request: Request) -> list[SandboxEntry]:
    """The sandboxes of the cluster's other nodes, and this node's ended ones, as their entries
    say (none without a cluster, or for a request from another node, which wants this node's own).
    This node's running and paused sandboxes come from the manager (fresher)."""
    node = getattr(request.app.state, "cluster", None)
    if node is None or request.scope.get("state", {}).get("cluster_internal"):
        return []
    here = {sb.id for sb in manager_of(request).list()}
    return [e for e in await node.entries() if e.id not in here]


def _entry_info(entry: SandboxEntry) -> dict:
    info = dict(entry.info)
    tr = info.get("trenvx")
    if isinstance(tr, dict) and entry.state != "exited":
        end = parse_rfc3339(info.get("endAt"), "endAt") if info.get("endAt") else None
        left = max(0.0, end.timestamp() - time.time()) if end is not None else 0.0
        info["trenvx"] = {**tr, "timeoutLeft": round(left, 3)}
    elif isinstance(tr, dict):
        info["trenvx"] = {**tr, "timeoutLeft": 0.0, **({"endReason": entry.end_reason} if entry.end_reason else {})}
    return info


NEXT_TOKEN_PATTERN = r"^[0-9]{1,19}\.[A-Za-z0-9_-]{1,128}$"


def _position(created_at: float, sandbox_id: str) -> tuple[int, str]:
    """Where a sandbox sits in the list order: its start time in microseconds, then its id."""
    return round(created_at * 1_000_000), sandbox_id


def encode_cursor(created_at: float, sandbox_id: str) -> str:
    """The x-next-token of a page: where the page ended (start time and id of its last item), so
    the next page continues strictly after it whatever was created or killed in between. Clients
    pass it back as it is (E2B calls it opaque)."""
    us, sid = _position(created_at, sandbox_id)
    return f"{us}.{sid}"


def decode_cursor(token: str) -> tuple[int, str]:
    """The inverse of :func:`encode_cursor`; a 400 naming ``nextToken`` for anything else."""
    if not re.fullmatch(NEXT_TOKEN_PATTERN, token):
        raise ApiError(400, "query field nextToken: not a token from the x-next-token header of a "
                            "previous page")
    us, sid = token.split(".", 1)
    return int(us), sid


def parse_rfc3339(value: str | None, field: str) -> dt.datetime | None:
    """An RFC 3339 timestamp of a query (``Z`` or an offset; a naive one is UTC)."""
    if value is None:
        return None
    text = value.strip().replace(" ", "+")  # an unescaped "+" of the offset arrives as a space
    if text.endswith(("z", "Z")):
        text = text[:-1] + "+00:00"
    text = re.sub(r"(T\d\d:\d\d:)60", r"\g<1>59", text, count=1, flags=re.I)  # a leap second
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ApiError(400, f"query field {field}: {value!r} is not an RFC 3339 timestamp "
                            "(e.g. 2026-01-02T03:04:05Z)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t


@router.get("/v2/sandboxes", response_model=list[ListedSandbox], responses={400: ERRORS[400]},
            summary="List sandboxes with filters, newest first (pagination: the x-next-token header)")
async def list_sandboxes_v2(
    request: Request,
    response: Response,
    metadata: Annotated[str | None, Query(description="URL-encoded key=value pairs, all must match")] = None,
    state: Annotated[str | None, Query(
        pattern=r"^((running|paused|exited)(,(running|paused|exited))*)?$",
        description="Comma-separated: running, paused, exited (trenvx)")] = None,
    template: Annotated[str | None, Query(max_length=128)] = None,
    startedAfter: Annotated[str | None, Query(
        max_length=64, json_schema_extra={"format": "date-time"},
        description="RFC 3339: only sandboxes started at or after this time")] = None,
    startedBefore: Annotated[str | None, Query(
        max_length=64, json_schema_extra={"format": "date-time"},
        description="RFC 3339: only sandboxes started at or before this time")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    nextToken: Annotated[str | None, Query(pattern=NEXT_TOKEN_PATTERN,
                                           description="The x-next-token header of the previous page "
                                                       "(an opaque cursor)")] = None,
    order: Annotated[Literal["asc", "desc"], Query(description="By start time; newest first by default")] = "desc",
    memory: Annotated[bool, Query(description="trenvx: include RSS and PSS of each VMM (slower)")] = False,
) -> list[dict]:
    wanted = parse_metadata_query(metadata)
    states = {"running", "paused"}
    if state:
        states = {s.strip() for s in state.split(",") if s.strip()}
        bad = states - {"running", "paused", "exited"}
        if bad or not states:
            raise ApiError(400, f"query field state: unknown state(s) {sorted(bad) or [state]}; use running, paused, exited")
    after = parse_rfc3339(startedAfter, "startedAfter")
    before = parse_rfc3339(startedBefore, "startedBefore")
    cursor = decode_cursor(nextToken) if nextToken else None
    desc = order == "desc"

    def wanted_item(created_at: float, sid: str) -> bool:
        # compared as reported (startedAt, to the microsecond): a startedAt seen is a bound that holds it
        if after is not None and _ts(created_at) < after:
            return False
        if before is not None and _ts(created_at) > before:
            return False
        if cursor is not None:
            here = _position(created_at, sid)
            return here < cursor if desc else here > cursor
        return True

    manager = manager_of(request)
    found: list[tuple[float, str, Sandbox | SandboxRecord | SandboxEntry]] = []
    if states & {"running", "paused"}:
        for sb in manager.list():
            if (sb.state in states and _matches(sb.metadata, wanted) and (not template or sb.template == template)
                    and wanted_item(sb.created_at, sb.id)):
                found.append((sb.created_at, sb.id, sb))
    if "exited" in states:
        for rec in manager.ended():
            if (_matches(rec.metadata, wanted) and (not template or rec.template == template)
                    and wanted_item(rec.created_at, rec.id)):
                found.append((rec.created_at, rec.id, rec))
    entries = await _cluster_entries(request)
    if entries:
        have = {x[1] for x in found}
        for entry in entries:
            if (entry.id not in have and entry.state in states and _matches(entry.metadata, wanted)
                    and (not template or entry.template == template) and wanted_item(entry.created_at, entry.id)):
                found.append((entry.created_at, entry.id, entry))
    found.sort(key=lambda x: _position(x[0], x[1]), reverse=desc)
    page = found[:limit]
    if len(found) > limit:
        response.headers["x-next-token"] = encode_cursor(page[-1][0], page[-1][1])
    return [_info_of_running(request, x[2], memory) if isinstance(x[2], Sandbox) else
            _entry_info(x[2]) if isinstance(x[2], SandboxEntry) else _info_of_ended(request, x[2]) for x in page]


def sampler_of(request: Request) -> MetricsSampler:
    return request.app.state.sampler


def _metric(s: MetricSample) -> SandboxMetric:
    return SandboxMetric(
        timestamp=_ts(s.t), timestampUnix=int(s.t), cpuCount=s.cpu_count, cpuUsedPct=s.cpu_used_pct,
        memUsed=s.mem_used, memTotal=s.mem_total, memCache=s.mem_cache, diskUsed=s.disk_used, diskTotal=s.disk_total,
    )


MAX_METRICS_IDS = 100
"""Sandboxes one GET /sandboxes/metrics may name (E2B's limit)."""
UNIX_SECONDS = Query(ge=0, le=1 << 40, description="Unix timestamp in seconds")


# Registered before GET /sandboxes/{sandboxID}, which would take "metrics" for an id.
@router.get("/sandboxes/metrics", response_model=SandboxesWithMetrics, responses={400: ERRORS[400]},
            summary="The latest metrics sample of each sandbox named (those not found, or not sampled yet, are left out)")
async def sandboxes_metrics(
    request: Request,
    sandbox_ids: Annotated[str, Query(
        max_length=MAX_METRICS_IDS * 65, pattern=r"^[a-z0-9, -]*$",  # sandbox ids: lowercase letters, digits, '-'
        description=f"Comma-separated sandbox ids, at most {MAX_METRICS_IDS}")],
) -> SandboxesWithMetrics:
    ids = list(dict.fromkeys(i.strip() for i in sandbox_ids.split(",") if i.strip()))
    if len(ids) > MAX_METRICS_IDS:
        raise ApiError(400, f"query field sandbox_ids: {len(ids)} ids, at most {MAX_METRICS_IDS} per request")
    manager, sampler = manager_of(request), sampler_of(request)
    found: dict[str, SandboxMetric] = {}
    for sid in ids:
        try:
            manager.get(sid)
        except SandboxNotFound:
            continue
        latest = sampler.latest(sid)
        if latest is not None:
            found[sid] = _metric(latest)
    return SandboxesWithMetrics(sandboxes=found)


@router.api_route("/sandboxes/metrics", methods=["DELETE", "PATCH", "POST", "PUT"], include_in_schema=False)
async def sandboxes_metrics_other_methods(request: Request) -> None:
    """Not DELETE /sandboxes/{sandboxID} of a sandbox named "metrics": a 405, as for any path."""
    raise ApiError(405, f"method {request.method} is not allowed on /sandboxes/metrics", {"Allow": "GET"})


@router.get("/sandboxes/{sandboxID}/metrics", response_model=list[SandboxMetric],
            responses={400: ERRORS[400], 404: ERRORS[404]},
            summary="CPU, memory and disk use of a sandbox over time, oldest first (a sample every 5 s)")
async def sandbox_metrics(
    request: Request,
    sandboxID: str,
    start: Annotated[int | None, UNIX_SECONDS] = None,
    end: Annotated[int | None, UNIX_SECONDS] = None,
) -> list[SandboxMetric]:
    sb = manager_of(request).get(sandboxID)  # (start after end: an empty interval, no samples)
    sampler = sampler_of(request)
    if sampler.latest(sb.id) is None:
        await sampler.sample_now(sb)  # the first request does not wait for the sampler's next pass
    return [_metric(s) for s in sampler.samples(sb.id)
            if (start is None or int(s.t) >= start) and (end is None or int(s.t) <= end)]


@router.get("/sandboxes/{sandboxID}", response_model=SandboxDetail, responses={404: ERRORS[404]},
            response_model_exclude_none=True,  # E2B's client reads "dnsServers": null as a list
            summary="One running sandbox")
async def get_sandbox(request: Request, sandboxID: str) -> dict:
    # The tokens go to every caller that got this far: require_api_key let through only holders of
    # the API key, or, on a server without one, local callers (see auth.py).
    sb = manager_of(request).get(sandboxID)
    info = _info_of_running(request, sb, True)
    network, allow_internet_access = _network_info(request, sb)
    return {**info, "envdAccessToken": sb.access_token, "trafficAccessToken": sb.traffic_access_token or None,
            "allowInternetAccess": allow_internet_access, "network": network, "domain": _domain(request),
            "lifecycle": _lifecycle_info(sb)}


@router.put("/sandboxes/{sandboxID}/network", status_code=204,
            responses={400: ERRORS[400], 404: ERRORS[404], 409: ERRORS[409]},
            summary="Replace the sandbox's egress rules (omitted fields are cleared)")
async def set_network(request: Request, sandboxID: str, body: NetworkUpdate) -> Response:
    manager = manager_of(request)
    manager.get(sandboxID)
    refuse_unimplemented(body, "network.")
    egress = _policy("", allow_internet_access=body.allow_internet_access, allow_out=body.allowOut,
                     deny_out=body.denyOut, dns_servers=body.dnsServers)
    await manager.set_network(sandboxID, egress, allow_internet_access=body.allow_internet_access)
    return Response(status_code=204)


@router.delete("/sandboxes/{sandboxID}", status_code=204, responses={404: ERRORS[404]},
               summary="Kill a sandbox and remove its files")
async def kill_sandbox(request: Request, sandboxID: str) -> Response:
    await manager_of(request).kill(sandboxID)
    return Response(status_code=204)


@router.post("/sandboxes/{sandboxID}/timeout", status_code=204, responses={400: ERRORS[400], 404: ERRORS[404]},
             summary="Set the timeout: the sandbox ends `timeout` seconds from now")
async def set_timeout(request: Request, sandboxID: str, body: TimeoutRequest) -> Response:
    manager = manager_of(request)
    manager.get(sandboxID)
    seconds = _timeout(body.timeout, 0, manager.config.orchestrator.max_timeout_s, "timeout")
    manager.set_timeout(sandboxID, seconds)
    return Response(status_code=204)


@router.post("/sandboxes/{sandboxID}/refreshes", status_code=204, responses={400: ERRORS[400], 404: ERRORS[404]},
             summary="Keep the sandbox alive for at least `duration` more seconds")
async def refresh(request: Request, sandboxID: str, body: Annotated[RefreshRequest | None, Body()] = None) -> Response:
    manager = manager_of(request)
    manager.get(sandboxID)
    orch = manager.config.orchestrator
    seconds = _timeout(body.duration if body else None, orch.default_timeout_s, orch.max_timeout_s, "duration")
    manager.refresh(sandboxID, seconds)
    return Response(status_code=204)


GUEST_UNRESPONSIVE = {"model": Error, "description": "Paused while its agent did not answer: resume it with "
                                                    "memory false (error_code sandbox_snapshot_guest_agent_unresponsive)"}
RESUME_RESPONSES = {
    201: {"model": CreatedSandbox, "description": "It was paused, and is resumed"},
    400: ERRORS[400], 404: ERRORS[404], 409: GUEST_UNRESPONSIVE,
    429: {"model": Error, "description": "A sandbox limit is reached: it stays paused"},
    500: {"model": Error, "description": "The resume failed (the message says why): it stays paused"},
    503: {"model": Error, "description": "Not enough free memory on the host: it stays paused"},
}


async def _resume_call(coro):  # noqa: ANN001, ANN202 - the manager's resume/connect, its errors as the API's
    try:
        return await coro
    except ResumeRefused as e:
        return error_response(409, str(e), error_code=e.error_code)
    except (SandboxNotFound, SandboxConflict, AdmissionError, InvalidTimeout, ManagerClosed, TemplateNetworkMismatch):
        raise
    except Exception as e:  # noqa: BLE001 - a VMM or agent failure: said plainly; the sandbox stays paused
        log.exception("resuming sandbox failed")
        raise ApiError(500, f"the sandbox failed to resume (it stays paused): {type(e).__name__}: {e}") from None


async def _connect(request: Request, response: Response, sandboxID: str,
                   body: ConnectRequest | None) -> CreatedSandbox | Response:
    manager = manager_of(request)
    manager.get(sandboxID)
    orch = manager.config.orchestrator
    seconds = _timeout(body.timeout if body else None, orch.default_timeout_s, orch.max_timeout_s, "timeout")
    memory = body is None or body.memory is not False
    got = await _resume_call(manager.connect(sandboxID, seconds, memory=memory))
    if isinstance(got, Response):
        return got
    sb, resumed = got
    response.status_code = 201 if resumed else 200
    return _created(request, sb)


CONNECT_SUMMARY = ("Connect to a sandbox: resume it if it is paused (201), else extend its timeout (200, never "
                   "shortened); returns its tokens")


@router.post("/sandboxes/{sandboxID}/connect", response_model=CreatedSandbox, responses=RESUME_RESPONSES,
             summary=CONNECT_SUMMARY)
async def connect(request: Request, response: Response, sandboxID: str,
                  body: Annotated[ConnectRequest | None, Body()] = None) -> CreatedSandbox | Response:
    return await _connect(request, response, sandboxID, body)


@router.post("/v2/sandboxes/{sandboxID}/connect", response_model=CreatedSandbox, responses=RESUME_RESPONSES,
             summary=CONNECT_SUMMARY + " (E2B v2 path)")
async def connect_v2(request: Request, response: Response, sandboxID: str,
                     body: Annotated[ConnectRequest | None, Body()] = None) -> CreatedSandbox | Response:
    return await _connect(request, response, sandboxID, body)


@router.post("/sandboxes/{sandboxID}/pause", status_code=204,
             responses={400: ERRORS[400], 404: ERRORS[404],
                        409: {"model": Error, "description": "Already paused, or its VMM cannot "
                                                                                "pause to disk"},
                        500: {"model": Error, "description": "The pause failed (the message says why): it runs on"},
                        507: {"model": Error, "description": "The data root is full: nothing was stored, it runs on"},
                        503: {"model": Error, "description": "Its agent did not freeze its filesystems and the "
                                                             "pause needs it (memory false, or requireHealthyGuest)"}},
             summary="Pause a sandbox to disk: its state is stored, its VMM ends (its timeout stops)")
async def pause(request: Request, sandboxID: str, body: Annotated[PauseRequest | None, Body()] = None) -> Response:
    manager = manager_of(request)
    try:
        await manager.pause(sandboxID, memory=body is None or body.memory is not False,
                            strict=body is not None and body.requireHealthyGuest is True)
    except PauseRefused as e:
        raise ApiError(503, str(e), {"Retry-After": "5"}) from None
    except PauseUnsupported as e:
        raise ApiError(409, str(e)) from None
    except DataRootFull as e:  # nothing was stored; the sandbox runs on
        raise ApiError(507, str(e)) from None
    except (SandboxNotFound, SandboxConflict):
        raise
    except Exception as e:  # noqa: BLE001 - a VMM or agent failure: said plainly; the sandbox runs on
        log.exception("pausing sandbox %s failed", sandboxID)
        raise ApiError(500, f"the sandbox failed to pause (it keeps running): {type(e).__name__}: {e}") from None
    return Response(status_code=204)


@router.post("/sandboxes/{sandboxID}/reclaim", response_model=ReclaimedMemory,
             responses={404: ERRORS[404], 409: {"model": Error, "description": "Paused"},
                        502: {"model": Error, "description": "The guest did not carry out the reclaim"}},
             summary="Give back the memory the sandbox's guest holds in caches (trenvx; it keeps running)")
async def reclaim(request: Request, sandboxID: str) -> ReclaimedMemory:
    r = await manager_of(request).reclaim(sandboxID)
    return ReclaimedMemory(sandboxID=r.sandbox_id, pssBeforeBytes=r.pss_before, pssAfterBytes=r.pss_after,
                           freedBytes=r.freed, seconds=round(r.seconds, 3))


@router.post("/sandboxes/{sandboxID}/resume", status_code=201, response_model=CreatedSandbox,
             responses={**RESUME_RESPONSES, 409: {"model": Error, "description": "Not paused, or paused while its "
                                                                                  "agent did not answer"}},
             summary="Resume a paused sandbox (E2B: deprecated, use connect)")
async def resume(request: Request, sandboxID: str,
                 body: Annotated[ResumeRequest | None, Body()] = None) -> CreatedSandbox | Response:
    manager = manager_of(request)
    sb = manager.get(sandboxID)
    lifecycle = None
    if body is not None and body.autoPause is not None:  # E2B's deprecated resume sets the auto-pause
        lifecycle = dataclasses.replace(sb.lifecycle, auto_pause=body.autoPause)
        if lifecycle.auto_pause:
            try:
                manager.suspender.check_supported(sb.build)
            except PauseUnsupported as e:
                raise ApiError(409, f"body field autoPause: {e}") from None
    orch = manager.config.orchestrator
    seconds = None if body is None or body.timeout is None else _timeout(
        body.timeout, orch.default_timeout_s, orch.max_timeout_s, "timeout")
    got = await _resume_call(manager.resume(sandboxID, timeout_s=seconds,
                                            memory=body is None or body.memory is not False))
    if isinstance(got, Response):
        return got
    if lifecycle is not None:  # once resumed: a refused or failed resume changes nothing
        manager.set_lifecycle(sandboxID, lifecycle)
    return _created(request, got)
