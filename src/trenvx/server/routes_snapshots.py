"""Fork and snapshot routes, in E2B's shapes (``e2b`` 2.63's ``fork``, ``create_snapshot``,
``list_snapshots``, ``delete_snapshot``):

- ``POST /sandboxes/{id}/fork`` ``{timeout?, count?: 1..100}`` -> 201, one entry per child:
  ``{"sandbox": <the created sandbox>}`` or ``{"error": {"code", "message"}}``. A refused request
  (400 count or timeout, 404 unknown, 409 paused) starts nothing and changes nothing.
- ``POST /sandboxes/{id}/snapshots`` ``{name?, memory?}`` -> 201 ``{snapshotID, names}``; the
  snapshot id (``<id or name>:default``) is a template id: ``POST /sandboxes`` starts copies.
- ``GET /snapshots?sandboxID=&name=&limit=&nextToken=`` -> 200, newest first (pagination: the
  ``x-next-token`` header, as ``GET /v2/sandboxes``).
- ``DELETE /templates/{id}`` -> 204 for a snapshot (its files go with the last sandbox using
  it), 404 unknown; templates themselves are not deleted over the API (409 says so).

The work is :mod:`trenvx.sandbox.snapshots`'s; these routes map its answers to E2B's statuses.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, WithJsonSchema

from ..sandbox.lifecycle import InvalidTimeout
from ..sandbox.manager import Sandbox, SandboxConflict, SandboxManager, SandboxNotFound
from ..sandbox.snapshots import (
    MAX_FORK_COUNT, SNAPSHOT_NAME_PATTERN, InvalidSnapshotRequest, SnapshotError, SnapshotNameTaken, SnapshotNotFound,
    SnapshotUnsupported, Snapshots, snapshot_id_of,
)
from ..template.store import TemplateBuild
from .auth import require_api_key
from .errors import ApiError, status_for
from .models import SANDBOX_ID_PATTERN, CreatedSandbox, Error, JsonInt
from .routes_sandboxes import NEXT_TOKEN_PATTERN, _created, decode_cursor, encode_cursor

log = logging.getLogger(__name__)

ERRORS = {
    400: {"model": Error, "description": "Bad request: the message names the field at fault"},
    401: {"model": Error, "description": "Missing or invalid X-API-Key"},
    404: {"model": Error, "description": "No such sandbox or snapshot"},
    409: {"model": Error, "description": "The sandbox is paused (resume it first), or cannot be snapshotted"},
    500: {"model": Error, "description": "The snapshot failed (the message says why)"},
}

router = APIRouter(dependencies=[Depends(require_api_key)], responses={401: ERRORS[401]}, tags=["snapshots"])


class ForkRequest(BaseModel):
    """E2B's ``SandboxForkRequest``."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": True})

    timeout: JsonInt | None = Field(default=None, description="Seconds each child lives (default: the server's "
                                                               "default timeout).")
    count: Annotated[JsonInt | None, WithJsonSchema({
        "anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_FORK_COUNT}, {"type": "null"}],
        "description": f"Children to start, 1 to {MAX_FORK_COUNT} (default 1)."})] = None


class ForkResult(BaseModel):
    """E2B's ``SandboxForkResult``: exactly one of ``sandbox`` and ``error``."""

    sandbox: CreatedSandbox | None = None
    error: Error | None = None


class SnapshotRequest(BaseModel):
    """E2B's ``SandboxSnapshotRequest``."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": True})

    # The document states the forms accepted; the route says in words what is wrong with another
    # (a namespace, a tag, a template's name).
    name: Annotated[StrictStr | None, Field(max_length=200), WithJsonSchema({
        "anyOf": [{"type": "string", "pattern": f"^{SNAPSHOT_NAME_PATTERN}(:(default|latest))?$"}, {"type": "null"}],
        "description": "A name for the snapshot (a new build of it if one has it); default: a new id. Lowercase "
                       "letters, digits, '-' and '_' (the tag 'default' may follow); not a template's name."})] = None
    memory: Annotated[StrictBool | None, WithJsonSchema({
        "anyOf": [{"type": "boolean", "enum": [True]}, {"type": "null"}],
        "description": "True or absent: trenvx's snapshots keep the memory (filesystem-only snapshots are not "
                       "served)."})] = None


class SnapshotInfo(BaseModel):
    """E2B's ``SnapshotInfo``."""

    snapshotID: str
    names: list[str]


def snapshots_of(request: Request) -> Snapshots:
    manager: SandboxManager = request.app.state.manager
    return manager.snapshots


def _info(build: TemplateBuild) -> SnapshotInfo:
    origin = build.manifest.snapshot
    return SnapshotInfo(snapshotID=snapshot_id_of(build), names=list(origin.names) if origin else [])


def _refusal(e: Exception, sandbox_id: str) -> ApiError:
    """The status of a refused snapshot or fork (nothing was made)."""
    if isinstance(e, SandboxNotFound):
        return ApiError(404, str(e))
    if isinstance(e, SandboxConflict):
        return ApiError(409, str(e))
    if isinstance(e, (SnapshotUnsupported, SnapshotNameTaken)):
        return ApiError(409, str(e))
    if isinstance(e, (InvalidSnapshotRequest, InvalidTimeout)):
        return ApiError(400, str(e))
    log.error("snapshot of sandbox %s failed: %s", sandbox_id, e)
    return ApiError(500, str(e))


def _child_error(e: Exception) -> Error:
    """The ``error`` entry of a child that did not start: its status as a create would answer."""
    found = status_for(e)
    if found is not None:
        return Error(code=found[0], message=str(e))
    return Error(code=500, message=f"the sandbox failed to start: {type(e).__name__}: {e}")


@router.post("/sandboxes/{sandboxID}/fork", status_code=201, response_model=list[ForkResult],
             response_model_exclude_none=True,
             responses={**ERRORS, 429: {"model": Error, "description": "Sandbox limit reached (per child, in the list)"}},
             summary="Fork a running sandbox: snapshot it once (it runs on, same id and timeout) and start "
                     "`count` sandboxes from the snapshot")
async def fork_sandbox(request: Request, sandboxID: str, body: ForkRequest | None = None) -> list[dict[str, Any]]:
    body = body or ForkRequest()
    count = 1 if body.count is None else body.count
    if not 1 <= count <= MAX_FORK_COUNT:
        raise ApiError(400, f"body field count: must be from 1 to {MAX_FORK_COUNT} (got {count}); nothing was forked")
    snapshots = snapshots_of(request)
    manager = snapshots.manager
    orch = manager.config.orchestrator
    timeout = orch.default_timeout_s if body.timeout is None else body.timeout
    if not 1 <= timeout <= orch.max_timeout_s:
        raise ApiError(400, f"body field timeout: must be from 1 to {orch.max_timeout_s} seconds (got {timeout}); "
                            "nothing was forked")
    try:
        results = await snapshots.fork(sandboxID, count=count, timeout_s=timeout)
    except (SandboxNotFound, SandboxConflict, SnapshotUnsupported, SnapshotNameTaken, InvalidSnapshotRequest, InvalidTimeout,
            SnapshotError) as e:
        raise _refusal(e, sandboxID) from None
    out: list[dict[str, Any]] = []
    for r in results:
        if isinstance(r, Sandbox):
            _count_spawn(request, r)
            out.append({"sandbox": _created(request, r)})
        else:
            out.append({"error": _child_error(r)})
    return out


def _count_spawn(request: Request, sb: Sandbox) -> None:
    stats = request.app.state.spawns.setdefault(sb.template, {"count": 0, "last": None})
    stats["count"] += 1
    stats["last"] = dt.datetime.fromtimestamp(sb.created_at, dt.UTC)


@router.post("/sandboxes/{sandboxID}/snapshots", status_code=201, response_model=SnapshotInfo, responses=ERRORS,
             summary="Snapshot a running sandbox (it runs on); new sandboxes start from the snapshot's id")
async def create_snapshot(request: Request, sandboxID: str, body: SnapshotRequest | None = None) -> SnapshotInfo:
    body = body or SnapshotRequest()
    if body.memory is False:
        raise ApiError(400, "body field memory: filesystem-only snapshots (memory: false, E2B's mode \"filesystem\") "
                            "are not served by trenvx; leave it out: a snapshot keeps the sandbox's memory and "
                            "its files")
    try:
        build = await snapshots_of(request).take(sandboxID, name=body.name)
    except (SandboxNotFound, SandboxConflict, SnapshotUnsupported, InvalidSnapshotRequest, SnapshotError) as e:
        raise _refusal(e, sandboxID) from None
    return _info(build)


def _created_ts(build: TemplateBuild) -> float:
    try:
        t = dt.datetime.fromisoformat(build.manifest.created_at)
    except ValueError:
        return 0.0
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp()


@router.get("/snapshots", response_model=list[SnapshotInfo], responses={400: ERRORS[400]},
            summary="Snapshots, newest first (pagination: the x-next-token header)")
async def list_snapshots(
    request: Request,
    response: Response,
    sandboxID: Annotated[str | None, Query(max_length=64, description="Only snapshots of this sandbox")] = None,
    name: Annotated[str | None, Query(max_length=200, description="Only the snapshot of this id or name "
                                                                  "(tag-qualified or not)")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 100,
    nextToken: Annotated[str | None, Query(pattern=NEXT_TOKEN_PATTERN,
                                           description="The x-next-token header of the previous page")] = None,
) -> list[SnapshotInfo]:
    import re

    if sandboxID is not None and not re.match(SANDBOX_ID_PATTERN, sandboxID):
        return []  # no sandbox has such an id
    cursor = decode_cursor(nextToken) if nextToken else None
    builds = snapshots_of(request).list(sandbox_id=sandboxID, name=name)
    items = [(round(_created_ts(b) * 1_000_000), b.name, b) for b in builds]
    items.sort(key=lambda x: (x[0], x[1]), reverse=True)
    if cursor is not None:
        items = [x for x in items if (x[0], x[1]) < cursor]
    page = items[:limit]
    if len(items) > limit:
        response.headers["x-next-token"] = encode_cursor(page[-1][0] / 1_000_000, page[-1][1])
    return [_info(x[2]) for x in page]


@router.delete("/templates/{templateID}", status_code=204,
               responses={404: ERRORS[404], 409: {"model": Error, "description": "A template, not a snapshot"}},
               summary="Delete a snapshot (sandboxes started from it run on; its files go with the last of them)")
async def delete_template(request: Request, templateID: str) -> Response:
    snapshots = snapshots_of(request)
    try:
        await snapshots.delete(templateID)
    except SnapshotNotFound as e:
        try:
            build = snapshots.store.current(templateID.split(":", 1)[0])
        except Exception:  # noqa: BLE001 - neither a snapshot nor a template
            raise ApiError(404, f"no snapshot or template {templateID[:200]!r}") from None
        if build.manifest.snapshot is None:
            raise ApiError(409, f"{templateID!r} is a template, not a snapshot: trenvx deletes only snapshots over "
                                "the API (templates are managed with template-manager)") from None
        raise ApiError(404, str(e)) from None
    return Response(status_code=204)
