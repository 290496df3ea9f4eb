"""The cluster's routes on each node: what nodes ask each other (template copies), and the
cluster's members for operators (``GET /cluster/nodes``).

Internal routes answer only requests that prove the cluster's secret (see
:mod:`.cluster_routing`); they are not in the OpenAPI document.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse

from ..cluster.node import ClusterNode
from ..cluster.records import NodeRecord
from ..cluster.template_copy import TemplateCopyError, build_file, describe_build
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
