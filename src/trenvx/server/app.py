"""The ASGI application: the API routes, the proxy to sandboxes in front of them, errors, auth.

::

    app = create_app(config)                       # owns a SandboxManager with SQLite state
    uvicorn.run(app, host=..., port=...)

Request path: ``SandboxProxy`` (requests for a sandbox port leave here) -> body size limit ->
FastAPI routes (``X-API-Key`` checked per route; a server without a key answers local callers
only, see :mod:`.auth`) -> :class:`SandboxManager`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi

from .. import __version__ as trenvx_version
from ..cluster.node import ClusterNode, node_name
from ..config import Config
from ..sandbox.manager import SandboxManager
from ..sandbox.metrics_sampler import MetricsSampler
from . import errors, routes_builds, routes_not_implemented, routes_sandboxes, routes_snapshots, routes_templates
from . import log_redaction, routes_cluster, routes_ssh
from .cluster_routing import ClusterRouter
from .asgi_replies import respond_error
from .metrics import ServerMetrics
from .metrics import router as metrics_router
from .metrics_snapshots import register_snapshot_metrics
from .models import Error, Health, ListedSandbox
from .routes_sandboxes import describe_ended, describe_running
from .proxy import SandboxProxy

log = logging.getLogger(__name__)


def envd_version() -> str:
    try:
        from ..guest.agent import ENVD_COMPAT_VERSION

        return ENVD_COMPAT_VERSION
    except ImportError:  # pragma: no cover - the agent package is part of trenvx
        return "0.4.0"


class BodyLimit:
    """Refuse API request bodies larger than ``limit`` bytes with 413 (the proxy is not limited)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.limit
                except ValueError:
                    return await respond_error(send, 400, "header Content-Length: not a number")
                if too_big:
                    return await respond_error(send, 413, f"request body larger than {self.limit} bytes "
                                                   "(orchestrator.max_request_body_kb)")
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await respond_error(send, 413, f"request body larger than {self.limit} bytes "
                                               "(orchestrator.max_request_body_kb)")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _adjust_openapi(spec: dict[str, Any], *, api_key: bool, max_timeout_s: int) -> dict[str, Any]:
    """What FastAPI cannot infer: security only when a key is configured; timeout ranges from the config."""
    comps = spec.get("components", {})
    for item in spec.get("paths", {}).values():
        for op in item.values():
            if not isinstance(op, dict):
                continue
            if "requestBody" in op:  # the body limit answers every route with a body
                op.setdefault("responses", {}).setdefault("413", {
                    "description": "Request body too large (orchestrator.max_request_body_kb)",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                })
            if api_key:
                op.get("responses", {}).pop("403", None)  # only keyless servers refuse remote callers
            else:
                op.pop("security", None)
                op.get("responses", {}).pop("401", None)
    if not api_key:
        comps.pop("securitySchemes", None)
    schemas = comps.get("schemas", {})
    for name, field in (("NewSandbox", "timeout"), ("TimeoutRequest", "timeout"), ("RefreshRequest", "duration"),
                        ("ConnectRequest", "timeout"), ("ResumeRequest", "timeout"), ("ForkRequest", "timeout")):
        prop = schemas.get(name, {}).get("properties", {}).get(field)
        if prop is None:
            continue
        for variant in prop.get("anyOf", [prop]):
            if variant.get("type") == "integer":
                variant.update(minimum=1, maximum=max_timeout_s)
    env = schemas.get("NewSandbox", {}).get("properties", {}).get("envVars", {})
    for variant in env.get("anyOf", [env]):
        if variant.get("type") == "object":
            variant["additionalProperties"] = False
    return spec


def create_app(config: Config, *, manager: SandboxManager | None = None, keep: bool | None = None) -> FastAPI:
    """The API for ``config``. Without ``manager``, one with SQLite state under data_root/run/ is made."""
    if manager is None:
        from ..layout import DataRoot

        state_path = DataRoot(config.data_root).ensure().run / "state.sqlite"
        manager = SandboxManager(config, state_path=state_path, keep=keep)
    log_redaction.install()  # signed URLs' signatures and query tokens stay out of the access log
    orch = config.orchestrator
    proxy_holder: dict[str, SandboxProxy] = {}
    sampler = MetricsSampler(manager.list, lambda sb: sb.build.manifest.machine.vcpu)

    node: ClusterNode | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await manager.start()
        if manager.adopted or manager.cleaned:
            log.info("after restart: adopted %d running sandboxes %s, cleaned up %d dead ones %s",
                     len(manager.adopted), manager.adopted, len(manager.cleaned), manager.cleaned)
        sampler.start()
        if node is not None:
            await node.start()
        try:
            yield
        finally:
            if node is not None:
                node.stop_accepting()
            await sampler.stop()
            await manager.close()
            if node is not None:
                await node.close()
            for p in proxy_holder.values():
                await p.aclose()

    app = FastAPI(
        title="trenvx",
        version=trenvx_version,
        description=(
            "Sandboxes for AI agents: VMs restored from template snapshots. The API follows E2B's REST "
            "API; requests with `E2b-Sandbox-Id` + `E2b-Sandbox-Port` headers (or Host "
            "`PORT-SANDBOXID.<domain>`, or path `/sandboxes/SANDBOXID/ports/PORT/...`) are proxied to that "
            "port inside the sandbox."
        ),
        lifespan=lifespan,
        responses={413: {"model": Error, "description": "Request body too large"}},
    )
    app.state.manager = manager
    app.state.api_key = orch.api_key
    app.state.domain = orch.domain
    app.state.client_id = f"trenvx-{socket.gethostname()}"
    app.state.envd_version = envd_version()
    app.state.spawns = {}
    app.state.sampler = sampler
    errors.install(app)
    app.include_router(routes_sandboxes.router)
    app.include_router(routes_templates.router)
    routes_ssh.install(app)  # ssh root@<sandbox-id>: sshd on demand, a websocket tunnel to port 22
    app.state.metrics = ServerMetrics(manager)
    register_snapshot_metrics(app.state.metrics.registry, manager)
    app.include_router(metrics_router)

    @app.get("/health", response_model=Health, tags=["health"], summary="Liveness (no API key needed)")
    async def health(request: Request) -> Health:
        m: SandboxManager = request.app.state.manager
        names = m.templates.names()
        accel = None
        if m.config.default_template in names:
            with contextlib.suppress(Exception):
                accel = m.templates.current(m.config.default_template).manifest.machine.accelerator
        return Health(version=trenvx_version, sandboxes=len(m.list()), templates=names, accelerator=accel)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _adjust_openapi(
                get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes),
                api_key=bool(orch.api_key), max_timeout_s=orch.max_timeout_s,
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(BodyLimit, limit=orch.max_request_body_kb * 1024)
    routes_builds.install(app)  # template builds; its upload links are served in front of the body limit
    app.include_router(routes_not_implemented.router)  # last: E2B endpoints not built yet answer 501
    app.include_router(routes_snapshots.router)  # after: DELETE /templates/tags is not a template's delete

    class _Proxy(SandboxProxy):
        def __init__(self, inner: Any) -> None:
            super().__init__(inner, manager=manager, domain=orch.domain)
            proxy_holder["proxy"] = self

    app.add_middleware(_Proxy)
    app.state.cluster = None
    if config.cluster.enabled:
        name = node_name(config)
        node = ClusterNode(config, manager, describe=lambda sb: _listed(describe_running(app.state, sb), name),
                           describe_ended=lambda rec: _listed(describe_ended(app.state, rec), name))
        app.state.cluster = node
        app.include_router(routes_cluster.router)

        class _Router(ClusterRouter):
            def __init__(self, inner: Any) -> None:
                super().__init__(inner, node, manager, orch.domain)
                proxy_holder["cluster"] = self  # type: ignore[assignment]

        app.add_middleware(_Router)  # outermost: a sandbox of another node leaves before the proxy
    return app


def _listed(info: dict[str, Any], node: str) -> dict[str, Any]:
    """A description as the API sends it (JSON types) with its node, for the cluster's entries."""
    listed = ListedSandbox.model_validate(info)
    listed.trenvx.node = node
    return listed.model_dump(mode="json", exclude_none=True)
