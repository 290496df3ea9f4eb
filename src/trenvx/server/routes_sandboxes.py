"""Sandbox routes, in the shapes of E2B's REST API.

    POST   /sandboxes, /v2/sandboxes            create (201)
    GET    /sandboxes                           running sandboxes (filter: metadata)
    GET    /v2/sandboxes                        filters: metadata, state, template; paginated
    GET    /sandboxes/{sandboxID}               one sandbox
    DELETE /sandboxes/{sandboxID}               kill (204)
    POST   /sandboxes/{sandboxID}/timeout       the sandbox ends `timeout` s from now (204)
    POST   /sandboxes/{sandboxID}/refreshes     keep alive `duration` more seconds (204)
    POST   /sandboxes/{sandboxID}/connect       (and /v2/...) E2B's connect: resume, extend, return tokens
    POST   /sandboxes/{sandboxID}/pause         stop its vCPUs (204; 409 if paused)
    POST   /sandboxes/{sandboxID}/resume        continue (201; 409 if running)
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import urllib.parse
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, Query, Request, Response

from ..sandbox.lifecycle import InvalidTimeout, check_timeout
from ..sandbox.limits import AdmissionError
from ..sandbox.manager import ManagerClosed, Sandbox, SandboxManager
from ..sandbox.state import SandboxRecord
from ..template.store import TemplateNotFound
from .auth import require_api_key
from .errors import ApiError
from .models import (
    ConnectRequest, CreatedSandbox, Error, ListedSandbox, NewSandbox, ReclaimedMemory, RefreshRequest, SandboxDetail,
    TimeoutRequest, TrenvxSandboxInfo,
)

log = logging.getLogger(__name__)

E2B_DEFAULT_TEMPLATE = "base"
"""What E2B's SDKs send when no template is named; it means the server's default template."""

ERRORS = {
    400: {"model": Error, "description": "Bad request: the message names the field at fault"},
    401: {"model": Error, "description": "Missing or invalid X-API-Key"},
    404: {"model": Error, "description": "No such sandbox or template"},
}

router = APIRouter(dependencies=[Depends(require_api_key)], responses={401: ERRORS[401]}, tags=["sandboxes"])


def manager_of(request: Request) -> SandboxManager:
    return request.app.state.manager


def _ts(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.UTC)


def _info_of_running(request: Request, sb: Sandbox, with_memory: bool) -> dict:
    rss = pss = None
    if with_memory:
        rss, pss = sb.memory()
    m = sb.build.manifest
    return dict(
        templateID=sb.template, alias=sb.template, sandboxID=sb.id, clientID=request.app.state.client_id,
        startedAt=_ts(sb.created_at), endAt=_ts(sb.end_at), cpuCount=m.machine.vcpu, memoryMB=m.machine.mem_mb,
        diskSizeMB=sb.record().disk_mb, state=sb.state, envdVersion=request.app.state.envd_version,
        metadata=dict(sb.metadata),
        trenvx=TrenvxSandboxInfo(
            pid=sb.pid, rssBytes=rss, pssBytes=pss, timeoutLeft=round(sb.timeout_left, 3), adopted=sb.adopted,
            buildID=m.build_id, vmm=m.vmm_type, accelerator=m.machine.accelerator,
            startTimes={k: round(v * 1000, 3) for k, v in sb.start_times.items()},
            startSource=sb.restored.source,
        ),
    )


def _info_of_ended(request: Request, rec: SandboxRecord) -> dict:
    return dict(
        templateID=rec.template, alias=rec.template, sandboxID=rec.id, clientID=request.app.state.client_id,
        startedAt=_ts(rec.created_at), endAt=_ts(rec.ended_at or rec.end_at), cpuCount=rec.vcpu,
        memoryMB=rec.mem_mb, diskSizeMB=rec.disk_mb, state="exited", envdVersion=request.app.state.envd_version,
        metadata=dict(rec.metadata),
        trenvx=TrenvxSandboxInfo(
            pid=rec.pid, timeoutLeft=0.0, endReason=rec.end_reason,
            endedAt=_ts(rec.ended_at) if rec.ended_at else None, buildID=rec.build_id,
        ),
    )


def _created(request: Request, sb: Sandbox) -> CreatedSandbox:
    return CreatedSandbox(
        templateID=sb.template, sandboxID=sb.id, alias=sb.template, clientID=request.app.state.client_id,
        envdVersion=request.app.state.envd_version, envdAccessToken=sb.access_token,
        domain=request.app.state.domain, startTimes={k: round(v * 1000, 3) for k, v in sb.start_times.items()},
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
    timeout = _timeout(body.timeout, orch.default_timeout_s, orch.max_timeout_s, "timeout")
    template = body.templateID
    if template == E2B_DEFAULT_TEMPLATE and template not in manager.templates.names():
        template = manager.config.default_template
    try:
        sb = await manager.create(template, env_vars=body.envVars, metadata=body.metadata, timeout_s=timeout)
    except TemplateNotFound as e:
        raise ApiError(404, f"body field templateID: {e}") from None
    except (AdmissionError, InvalidTimeout, ManagerClosed):
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
    return [_info_of_running(request, sb, False) for sb in manager_of(request).list() if _matches(sb.metadata, wanted)]


@router.get("/v2/sandboxes", response_model=list[ListedSandbox], responses={400: ERRORS[400]},
            summary="List sandboxes with filters (pagination: the x-next-token header)")
async def list_sandboxes_v2(
    request: Request,
    response: Response,
    metadata: Annotated[str | None, Query(description="URL-encoded key=value pairs, all must match")] = None,
    state: Annotated[str | None, Query(
        pattern=r"^((running|paused|exited)(,(running|paused|exited))*)?$",
        description="Comma-separated: running, paused, exited (trenvx)")] = None,
    template: Annotated[str | None, Query(max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    nextToken: Annotated[str | None, Query(pattern=r"^[0-9]{1,9}$",
                                           description="The x-next-token header of the previous page")] = None,
    order: Annotated[Literal["asc", "desc"], Query()] = "asc",
    memory: Annotated[bool, Query(description="trenvx: include RSS and PSS of each VMM (slower)")] = False,
) -> list[dict]:
    wanted = parse_metadata_query(metadata)
    states = {"running", "paused"}
    if state:
        states = {s.strip() for s in state.split(",") if s.strip()}
        bad = states - {"running", "paused", "exited"}
        if bad or not states:
            raise ApiError(400, f"query field state: unknown state(s) {sorted(bad) or [state]}; use running, paused, exited")
    manager = manager_of(request)
    items: list[tuple[float, str, dict]] = []
    if states & {"running", "paused"}:
        for sb in manager.list():
            if sb.state in states and _matches(sb.metadata, wanted) and (not template or sb.template == template):
                items.append((sb.created_at, sb.id, _info_of_running(request, sb, memory)))
    if "exited" in states:
        for rec in manager.ended():
            if _matches(rec.metadata, wanted) and (not template or rec.template == template):
                items.append((rec.created_at, rec.id, _info_of_ended(request, rec)))
    items.sort(key=lambda x: (x[0], x[1]), reverse=order == "desc")
    start = int(nextToken) if nextToken else 0
    page = items[start:start + limit]
    if len(items) > start + limit:
        response.headers["x-next-token"] = str(start + limit)
    return [x[2] for x in page]


@router.get("/sandboxes/{sandboxID}", response_model=SandboxDetail, responses={404: ERRORS[404]},
            summary="One running sandbox")
async def get_sandbox(request: Request, sandboxID: str) -> dict:
    sb = manager_of(request).get(sandboxID)
    info = _info_of_running(request, sb, True)
    return {**info, "envdAccessToken": sb.access_token, "domain": request.app.state.domain}


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


async def _connect(request: Request, sandboxID: str, body: ConnectRequest | None) -> CreatedSandbox:
    manager = manager_of(request)
    sb = manager.get(sandboxID)
    orch = manager.config.orchestrator
    seconds = _timeout(body.timeout if body else None, orch.default_timeout_s, orch.max_timeout_s, "timeout")
    if sb.paused:
        await manager.resume(sandboxID)
    manager.refresh(sandboxID, seconds)
    return _created(request, sb)


@router.post("/sandboxes/{sandboxID}/connect", response_model=CreatedSandbox,
             responses={400: ERRORS[400], 404: ERRORS[404]},
             summary="Connect to a running sandbox: extends its timeout, returns its tokens")
async def connect(request: Request, sandboxID: str,
                  body: Annotated[ConnectRequest | None, Body()] = None) -> CreatedSandbox:
    return await _connect(request, sandboxID, body)


@router.post("/v2/sandboxes/{sandboxID}/connect", response_model=CreatedSandbox,
             responses={400: ERRORS[400], 404: ERRORS[404]}, summary="Connect to a running sandbox (E2B v2 path)")
async def connect_v2(request: Request, sandboxID: str,
                     body: Annotated[ConnectRequest | None, Body()] = None) -> CreatedSandbox:
    return await _connect(request, sandboxID, body)


@router.post("/sandboxes/{sandboxID}/pause", status_code=204,
             responses={404: ERRORS[404], 409: {"model": Error, "description": "Already paused"}},
             summary="Pause a sandbox: its vCPUs stop, its memory stays (the timeout keeps running)")
async def pause(request: Request, sandboxID: str) -> Response:
    await manager_of(request).pause(sandboxID)
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
             responses={404: ERRORS[404], 409: {"model": Error, "description": "Not paused"}},
             summary="Resume a paused sandbox")
async def resume(request: Request, sandboxID: str) -> CreatedSandbox:
    sb = await manager_of(request).resume(sandboxID)
    return _created(request, sb)
