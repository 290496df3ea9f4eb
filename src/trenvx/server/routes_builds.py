"""Template build routes in E2B's shapes (the v3 build flow of E2B's ``Template`` SDK).

::

    POST /v3/templates                                   request a build -> templateID, buildID (202)
    GET  /templates/{templateID}/files/{hash}            upload link for a COPY step's files (201)
    PUT  /templates/{templateID}/files/{hash}?expires=&signature=   the upload itself (the link)
    POST /v2/templates/{templateID}/builds/{buildID}     the steps: checked, build queued (202)
    GET  /templates/{templateID}/builds/{buildID}/status build status, logEntries from logsOffset
    GET  /templates/{templateID}/builds/{buildID}/logs   build logs (cursor, direction, level)

The build itself is :class:`~trenvx.template.build_api.BuildService`'s. Every route needs the API
key like the rest of the API, except the upload: E2B's SDK PUTs its archive to the URL it was
given without its API headers (as to a presigned S3 URL), so the link carries the proof instead:
an HMAC of (template, hash, expiry) under a secret of this server process, valid for one hour.
The upload is served before the API's body limit (archives are larger than API bodies), streamed
to disk with its own bound (:data:`~trenvx.template.uploads.MAX_UPLOAD_BYTES`), then checked
(:func:`~trenvx.template.uploads.check_archive`) before it is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from ..template.build_api import BuildApiError, BuildRecord, BuildService, LogEntry
from ..template.steps import FILES_HASH_RE
from ..template.uploads import MAX_UPLOAD_BYTES, UnsafeArchive
from .auth import require_api_key
from .errors import ApiError, error_body
from .models import TEMPLATE_ID_RE, Error, json_integer

UPLOAD_LINK_TTL_S = 3600
_UPLOAD_PATH = re.compile(r"^/templates/([^/]+)/files/([0-9a-f]{64})$")
BUILD_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,127}(:latest)?$"
_STATUS = {"invalid": 400, "not_found": 404, "conflict": 409, "busy": 429}

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["template builds"],
                   responses={401: {"model": Error, "description": "Missing or invalid X-API-Key"}})


_HOST_CPUS = os.cpu_count() or 1
_HOST_MB = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
ERRORS = {
    400: {"model": Error, "description": "Bad request: the message names the field at fault"},
    404: {"model": Error, "description": "No such template or build"},
    409: {"model": Error, "description": "The name belongs to a configured template, or the build was started already"},
    429: {"model": Error, "description": "Too many builds queued"},
}


class TemplateBuildRequestV3(BaseModel):
    """E2B's body of ``POST /v3/templates`` (``alias`` is the deprecated spelling of ``name``)."""

    model_config = ConfigDict(extra="ignore")
    name: Annotated[str, StringConstraints(pattern=BUILD_NAME_PATTERN)] = Field(
        description="The template's name (and alias), optionally with the tag `:latest`, the only tag here.")
    alias: Annotated[str, StringConstraints(pattern=BUILD_NAME_PATTERN)] | None = None
    tags: list[Literal["latest"]] | None = Field(default=None, max_length=1)
    teamID: str | None = Field(default=None, max_length=200, description="Accepted, not used (one team per server).")
    # JSON integers ("64" is refused, not coerced), bounds before the validator (see models.JsonInteger)
    cpuCount: Annotated[int, Field(ge=1, le=_HOST_CPUS), BeforeValidator(json_integer)] | None = None
    memoryMB: Annotated[int, Field(ge=64, le=max(64, _HOST_MB // 2)), BeforeValidator(json_integer)] | None = None
    minFreeDiskMB: Annotated[int, Field(ge=0, le=1024 * 1024), BeforeValidator(json_integer)] | None = None


class TemplateStep(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["RUN", "COPY", "ENV", "WORKDIR", "USER"]
    args: list[str] = Field(default_factory=list, max_length=1024)
    filesHash: Annotated[str, StringConstraints(pattern=FILES_HASH_RE.pattern)] | None = None
    force: bool = False


class TemplateBuildStartV2(BaseModel):
    """E2B's body of ``POST /v2/templates/{templateID}/builds/{buildID}``. What the server cannot
    build (a registry image, a step's bad arguments, files not uploaded) fails the build, with
    the reason in its status."""

    model_config = ConfigDict(extra="ignore")
    fromImage: str | None = Field(default=None, max_length=1000)
    fromTemplate: str | None = Field(default=None, max_length=1000)
    fromImageRegistry: dict[str, Any] | None = None
    force: bool = False
    steps: list[TemplateStep] | None = Field(default=None, max_length=500)
    startCmd: str | None = Field(default=None, max_length=256 * 1024)
    readyCmd: str | None = Field(default=None, max_length=256 * 1024)


class BuildRequested(BaseModel):
    templateID: str
    buildID: str
    public: bool
    names: list[str]
    tags: list[str]
    aliases: list[str]


class BuildFileUpload(BaseModel):
    present: bool
    url: str | None = None


class BuildLogEntry(BaseModel):
    timestamp: dt.datetime
    level: Literal["debug", "info", "warn", "error"]
    message: str
    step: str | None = None


class BuildStatusReason(BaseModel):
    message: str
    step: str | None = None
    logEntries: list[BuildLogEntry] = Field(default_factory=list)


class BuildStatus(BaseModel):
    templateID: str
    buildID: str
    status: Literal["waiting", "building", "ready", "error"]
    logs: list[str]
    logEntries: list[BuildLogEntry]
    reason: BuildStatusReason | None = None
    trenvx: dict[str, Any] | None = None


class BuildLogs(BaseModel):
    logs: list[BuildLogEntry]


def service(request: Request) -> BuildService:
    return request.app.state.builds


def _api_error(e: BuildApiError) -> ApiError:
    return ApiError(_STATUS[e.kind], e.message)


def _template_id(value: str) -> str:
    if not TEMPLATE_ID_RE.match(value):
        raise ApiError(404, f"template {value[:200]!r} does not exist")
    return value


def _entry(e: LogEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"timestamp": e.timestamp.isoformat().replace("+00:00", "Z"), "level": e.level,
                           "message": e.message}
    if e.step:
        out["step"] = e.step
    return out


def _sign(secret: bytes, template: str, files_hash: str, expires: int) -> str:
    return hmac.new(secret, f"{template}\n{files_hash}\n{expires}".encode(), hashlib.sha256).hexdigest()


@router.post("/v3/templates", status_code=202, response_model=BuildRequested,
             responses={400: ERRORS[400], 409: ERRORS[409]}, summary="Request a template build (E2B's v3)")
async def request_build(request: Request, body: TemplateBuildRequestV3) -> JSONResponse:
    name = body.name
    try:
        rec = service(request).request(name, tags=body.tags, cpu_count=body.cpuCount, memory_mb=body.memoryMB,
                                       min_free_disk_mb=body.minFreeDiskMB)
    except BuildApiError as e:
        raise _api_error(e) from None
    return JSONResponse({"templateID": rec.template, "buildID": rec.build_id, "public": False,
                         "names": [rec.template], "tags": ["latest"], "aliases": [rec.template]}, status_code=202)


@router.get("/templates/{templateID}/files/{hash}", status_code=201, response_model=BuildFileUpload,
            responses={400: ERRORS[400], 404: ERRORS[404]}, summary="Upload link for a COPY step's files")
async def upload_link(request: Request, templateID: str,
                      hash: str = Path(pattern=FILES_HASH_RE.pattern, description="The step's filesHash")) -> JSONResponse:
    builds = service(request)
    _template_id(templateID)
    if not builds.owned(templateID) and not builds.knows(templateID):
        raise ApiError(404, f"template {templateID!r} does not exist; request a build with POST /v3/templates first")
    expires = int(time.time()) + UPLOAD_LINK_TTL_S
    signature = _sign(request.app.state.upload_secret, templateID, hash, expires)
    url = str(request.url_for("upload_link", templateID=templateID, hash=hash))
    return JSONResponse({"present": builds.uploads.present(hash), "url": f"{url}?expires={expires}&signature={signature}"},
                        status_code=201)


@router.post("/v2/templates/{templateID}/builds/{buildID}", status_code=202,
             responses={400: ERRORS[400], 404: ERRORS[404], 409: ERRORS[409], 429: ERRORS[429]},
             summary="Start a requested build with its steps")
async def start_build(request: Request, templateID: str, buildID: str, body: TemplateBuildStartV2) -> JSONResponse:
    try:
        await service(request).start(_template_id(templateID), buildID, body.model_dump(exclude_none=True))
    except BuildApiError as e:
        raise _api_error(e) from None
    return JSONResponse(None, status_code=202)


def _record(request: Request, template: str, build_id: str) -> BuildRecord:
    try:
        return service(request).get(_template_id(template), build_id)
    except BuildApiError as e:
        raise _api_error(e) from None


@router.get("/templates/{templateID}/builds/{buildID}/status", response_model=BuildStatus, response_model_exclude_none=True,
            responses={400: ERRORS[400], 404: ERRORS[404]}, summary="Build status and its log from an offset")
async def build_status(request: Request, templateID: str, buildID: str,
                       logsOffset: int = Query(default=0, ge=0), limit: int = Query(default=100, ge=0, le=100),
                       level: str | None = Query(default=None, pattern="^(debug|info|warn|error)$")) -> dict[str, Any]:
    rec = _record(request, templateID, buildID)
    out: dict[str, Any] = {
        "templateID": rec.template, "buildID": rec.build_id, "status": rec.status, "logs": [],
        "logEntries": [_entry(e) for e in rec.entries(logsOffset, limit, level)],
    }
    if rec.status == "error" and rec.reason:
        reason: dict[str, Any] = {"message": rec.reason,
                                  "logEntries": [_entry(e) for e in rec.logs[-20:] if e.step == rec.reason_step]}
        if rec.reason_step:
            reason["step"] = rec.reason_step
        out["reason"] = reason
    if rec.trenvx_build_id:
        out["trenvx"] = {"buildID": rec.trenvx_build_id, "reused": rec.reused}
    return out


#: A log cursor is a time in ms since the epoch; past the year 9999 no datetime can hold it.
MAX_CURSOR_MS = 253_402_300_799_999


@router.get("/templates/{templateID}/builds/{buildID}/logs", response_model=BuildLogs, response_model_exclude_none=True,
            responses={400: ERRORS[400], 404: ERRORS[404]}, summary="Build logs")
async def build_logs(request: Request, templateID: str, buildID: str, cursor: int | None = Query(default=None, ge=0, le=MAX_CURSOR_MS),
                     limit: int = Query(default=100, ge=0, le=1000),
                     direction: str = Query(default="forward", pattern="^(forward|backward)$"),
                     level: str | None = Query(default=None, pattern="^(debug|info|warn|error)$"),
                     source: str | None = Query(default=None, pattern="^(temporary|persistent)$")) -> dict[str, Any]:
    rec = _record(request, templateID, buildID)
    entries = rec.entries(0, len(rec.logs), level)
    if cursor is not None:
        at = dt.datetime.fromtimestamp(cursor / 1000, dt.UTC)
        entries = [e for e in entries if (e.timestamp >= at if direction == "forward" else e.timestamp <= at)]
    if direction == "backward":
        entries = entries[::-1]
    return {"logs": [_entry(e) for e in entries[:limit]]}


class TemplateFileUploads:
    """ASGI middleware serving ``PUT /templates/{id}/files/{hash}?expires=&signature=`` (the upload
    links), streamed to disk; everything else passes to the app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.outer: FastAPI | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        m = _UPLOAD_PATH.match(scope.get("path", "")) if scope["type"] == "http" else None
        query = parse_qs(scope.get("query_string", b"").decode("latin-1")) if m is not None else {}
        if m is None or scope.get("method") != "PUT" or "signature" not in query:
            return await self.app(scope, receive, send)  # a PUT that is no upload link: the API's 405
        state = scope["app"].state if "app" in scope else self._state(scope)
        template, files_hash = m.group(1), m.group(2)
        try:
            expires = int(query.get("expires", [""])[0])
        except ValueError:
            return await _reply(send, 403, "upload link without a valid expires: get a new one with "
                                           f"GET /templates/{template}/files/{files_hash}")
        signature = query.get("signature", [""])[0]
        expected = _sign(state.upload_secret, template, files_hash, expires)
        if not hmac.compare_digest(expected, signature) or expires < time.time():
            return await _reply(send, 403, "upload link invalid or expired: get a new one with "
                                           f"GET /templates/{template}/files/{files_hash}")
        for k, v in scope.get("headers", ()):
            if k == b"content-length" and (not v.isdigit() or int(v) > MAX_UPLOAD_BYTES):
                return await _reply(send, 413, f"upload larger than {MAX_UPLOAD_BYTES >> 20} MiB (or a bad Content-Length)")
        builds: BuildService = state.builds
        tmp = builds.uploads.new_temp()
        try:
            size = 0
            with open(tmp, "wb") as f:
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    chunk = msg.get("body", b"")
                    size += len(chunk)
                    if size > MAX_UPLOAD_BYTES:
                        return await _reply(send, 413, f"upload larger than {MAX_UPLOAD_BYTES >> 20} MiB")
                    f.write(chunk)
                    if not msg.get("more_body", False):
                        break
            try:
                await asyncio.to_thread(builds.uploads.accept, tmp, files_hash)
            except UnsafeArchive as e:
                return await _reply(send, 400, f"the uploaded archive is refused: {e}")
        finally:
            tmp.unlink(missing_ok=True)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    def _state(self, scope: dict) -> Any:
        assert self.outer is not None
        return self.outer.state


async def _reply(send: Any, status: int, message: str) -> None:
    body = error_body(status, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def install(app: FastAPI) -> None:
    """The build routes, the upload middleware (call after the body limit is added, so that it
    sits in front of it) and the builds' shutdown (cancelled before the sandbox manager closes)."""
    builds = BuildService(app.state.manager.config)
    app.state.builds = builds
    app.state.upload_secret = secrets.token_bytes(32)
    app.include_router(router)
    holder: dict[str, TemplateFileUploads] = {}

    class _Uploads(TemplateFileUploads):
        def __init__(self, inner: Any) -> None:
            super().__init__(inner)
            self.outer = app
            holder["uploads"] = self

    app.add_middleware(_Uploads)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        async with inner(a) as state:
            try:
                yield state
            finally:
                await builds.aclose()

    app.router.lifespan_context = lifespan
