"""Template routes (E2B's shapes): GET /templates, GET /templates/{templateID},
GET /templates/aliases/{alias}.

Templates are built with ``template-manager`` or through the build API (:mod:`.routes_builds`);
these routes list the published builds. A template's alias is its name.
"""

from __future__ import annotations

import datetime as dt
import uuid

from fastapi import APIRouter, Depends, Request

from ..template.store import TemplateBuild, TemplateManifest, TemplateNotFound
from .auth import require_api_key
from .errors import ApiError
from .models import TEMPLATE_ID_RE, Error, Template, TemplateBuildInfo, TemplateWithBuilds

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["templates"],
                   responses={401: {"model": Error, "description": "Missing or invalid X-API-Key"}})


def _created_at(m: TemplateManifest) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(m.created_at)
        return t if t.tzinfo else t.replace(tzinfo=dt.UTC)
    except ValueError:
        return dt.datetime.fromtimestamp(0, dt.UTC)


def _build_uuid(name: str, build_id: str) -> str:
    """E2B's clients expect build ids to be UUIDs: a stable one derived from ours."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"trenvx:{name}:{build_id}"))



def _template(request: Request, build: TemplateBuild, builds: list[TemplateBuild]) -> dict:
    m = build.manifest
    created = _created_at(m)
    first = min((_created_at(b.manifest) for b in builds), default=created)
    stats = request.app.state.spawns.get(m.name, {})
    tpl = request.app.state.manager.config.template.get(m.name)
    aliases = [m.name, *(tpl.aliases if tpl is not None else m.config.get("aliases") or [])]
    return dict(
        templateID=m.name, buildID=m.build_id, cpuCount=m.machine.vcpu, memoryMB=m.machine.mem_mb,
        diskSizeMB=build.disk_mb, aliases=aliases, names=aliases, createdAt=first, updatedAt=created,
        lastSpawnedAt=stats.get("last"), spawnCount=stats.get("count", 0), buildCount=len(builds),
        envdVersion=request.app.state.envd_version, buildStatus="ready",
        isDefault=m.name == request.app.state.manager.config.default_template,
        trenvx={
            "vmmType": m.vmm_type, "accelerator": m.machine.accelerator, "acceleratorReason": m.accelerator_reason,
            "kernelVersion": m.kernel_version, "stageSeconds": m.stage_seconds, "sizes": m.sizes,
            "rootfsSource": m.rootfs_source,
        },
    )


def _builds(request: Request, name: str) -> list[TemplateBuild]:
    return request.app.state.manager.templates.published(name)


@router.get("/templates", response_model=list[Template], summary="Built templates")
async def list_templates(request: Request) -> list[dict]:
    store = request.app.state.manager.templates
    out = []
    for name in store.names():
        try:
            build = store.current(name)
        except TemplateNotFound:
            continue
        if build.manifest.snapshot is not None:
            continue  # snapshots of sandboxes are listed by GET /snapshots
        out.append(_template(request, build, _builds(request, name)))
    return out


@router.get("/templates/aliases/{alias}", summary="The template an alias names",
            responses={404: {"model": Error, "description": "No template of that alias"}})
async def template_alias(request: Request, alias: str) -> dict:
    manager = request.app.state.manager
    builds = getattr(request.app.state, "builds", None)
    if not TEMPLATE_ID_RE.match(alias):
        raise ApiError(404, f"no template has the alias {alias[:200]!r} (aliases are template names: letters, "
                            "digits, '.', '_', '-')")
    name = manager.template_name(alias)  # an alias (configured, or recorded in a build) names its template
    if name in manager.templates.names() or (builds is not None and builds.knows(name)):
        return {"templateID": name, "public": False}
    raise ApiError(404, f"no template has the alias {alias!r}")


@router.get("/templates/{templateID}", response_model=TemplateWithBuilds,
            responses={404: {"model": Error, "description": "No built template of that name"}},
            summary="One template and its builds")
async def get_template(request: Request, templateID: str) -> dict:
    manager = request.app.state.manager
    if not TEMPLATE_ID_RE.match(templateID):
        raise ApiError(404, f"template {templateID[:200]!r} does not exist")
    templateID = manager.template_name(templateID)
    try:
        build = manager.templates.current(templateID)
    except TemplateNotFound as e:
        configured = templateID in manager.config.template
        raise ApiError(404, str(e) if configured else f"template {templateID!r} does not exist") from None
    builds = _builds(request, templateID)
    info = _template(request, build, builds)
    info["builds"] = [
        TemplateBuildInfo(
            buildID=_build_uuid(templateID, b.build_id), createdAt=_created_at(b.manifest),
            updatedAt=_created_at(b.manifest), finishedAt=_created_at(b.manifest), cpuCount=b.manifest.machine.vcpu,
            memoryMB=b.manifest.machine.mem_mb, diskSizeMB=b.disk_mb, envdVersion=request.app.state.envd_version,
            trenvxBuildID=b.build_id,
        )
        for b in builds
    ]
    return info
