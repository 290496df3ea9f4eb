"""The cluster's routes on each node: what nodes ask each other (template copies), and the
cluster's members for operators (``GET /cluster/nodes``).

Internal routes answer only requests that prove the cluster's secret (see
:mod:`.cluster_routing`); they are not in the OpenAPI document.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse

from ..cluster.node import ClusterNode
from ..cluster.records import NodeRecord
from ..cluster.sandbox_move import SandboxMoveError
from ..cluster.template_copy import TemplateCopyError, build_file, describe_build, sha256_of
from ..sandbox.handover import HandoverRefused
from ..template.store import TemplateNotFound
from .auth import require_api_key
from .errors import ApiError

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["cluster"])


def node_of(request: Request) -> ClusterNode:
    node = getattr(request.app.state, "cluster", None)
    if node is None:
        raise ApiError(404, "this server is not part of a cluster (start it with --cluster etcd://...)")
    return node


def internal_only(request: Request) -> ClusterNode:
    node = node_of(request)
    if not request.scope.get("state", {}).get("cluster_internal"):
        raise ApiError(403, "only the cluster's nodes may ask this (header X-Trenvx-Cluster: the cluster's secret)")
    return node


@router.get("/cluster/nodes", response_model=list[NodeRecord], summary="The cluster's live nodes (trenvx)")
async def nodes(request: Request) -> list[NodeRecord]:
    node = node_of(request)
    return sorted((await node.live_nodes(max_age_s=0)).values(), key=lambda n: n.name)


@router.get("/cluster/templates/{name}", include_in_schema=False)
async def offer(request: Request, name: str) -> dict:
    node = internal_only(request)
    try:
        return await asyncio.to_thread(describe_build, node.manager.templates, node.manager.data_root, name)
    except TemplateNotFound as e:
        raise ApiError(404, str(e)) from None
    except TemplateCopyError as e:
        raise ApiError(409, str(e)) from None


@router.get("/cluster/templates/{name}/{build_id}/files/{file:path}", include_in_schema=False)
async def file(request: Request, name: str, build_id: str, file: str) -> FileResponse:
    node = internal_only(request)
    try:
        path = build_file(node.manager.templates, node.manager.data_root, name, build_id, file)
    except FileNotFoundError:
        raise ApiError(404, f"no file {file!r} in build {build_id} of {name}") from None
    return FileResponse(path, media_type="application/octet-stream")


# -- a paused sandbox handed over to another node (see trenvx.cluster.sandbox_move) -----------------


@router.post("/cluster/sandboxes/{sandbox_id}/handover", include_in_schema=False)
async def handover(request: Request, sandbox_id: str) -> dict:
    node = internal_only(request)
    try:
        record, files = await node.handover.hold(sandbox_id)
    except HandoverRefused as e:
        raise ApiError(409, str(e)) from None
    workdir = Path(record.workdir)
    try:
        digests = await asyncio.to_thread(lambda: [
            {"name": str(f.relative_to(workdir)), "size": f.stat().st_size, "mode": f.stat().st_mode & 0o777,
             "sha256": sha256_of(f)} for f in files])
    except BaseException:
        node.handover.abort(sandbox_id)
        raise
    return {"record": dataclasses.asdict(record), "files": digests, "template": record.template,
            "build_id": record.build_id}


@router.get("/cluster/sandboxes/{sandbox_id}/files/{file:path}", include_in_schema=False)
async def handover_file(request: Request, sandbox_id: str, file: str) -> FileResponse:
    node = internal_only(request)
    if not node.handover.is_held(sandbox_id):
        raise ApiError(409, f"sandbox {sandbox_id} is not being handed over")
    workdir = node.manager.get(sandbox_id).restored.workdir.resolve()
    path = (workdir / file).resolve()
    if not path.is_relative_to(workdir) or not path.is_file():
        raise ApiError(404, f"no file {file!r} in sandbox {sandbox_id}")
    return FileResponse(path, media_type="application/octet-stream")


@router.post("/cluster/sandboxes/{sandbox_id}/handover/done", include_in_schema=False)
async def handover_done(request: Request, sandbox_id: str) -> dict:
    node = internal_only(request)
    node.moved_away(sandbox_id)
    try:
        await node.handover.release(sandbox_id)
    except HandoverRefused as e:
        raise ApiError(409, str(e)) from None
    return {"released": sandbox_id}


@router.post("/cluster/sandboxes/{sandbox_id}/handover/abort", include_in_schema=False)
async def handover_abort(request: Request, sandbox_id: str) -> dict:
    node = internal_only(request)
    node.handover.abort(sandbox_id)
    return {"aborted": sandbox_id}


@router.post("/cluster/sandboxes/{sandbox_id}/pull", include_in_schema=False)
async def pull(request: Request, sandbox_id: str, source: str) -> dict:
    """Move the paused sandbox here from node ``source`` (asked by the node a client's resume reached)."""
    node = internal_only(request)
    try:
        seconds = await node.pull(sandbox_id, source)
    except SandboxMoveError as e:
        raise ApiError(409, str(e)) from None
    return {"moved": sandbox_id, "seconds": round(seconds, 3)}
