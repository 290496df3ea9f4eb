"""Errors as JSON ``{"code": <HTTP status>, "message": "..."}`` (E2B's ``Error``).

One table maps the sandbox layer's exceptions to statuses; a client's mistake is always a 4xx
that says what to fix (400 names the field), never a bare 500. Egress rules this server cannot
enforce (``NetworkUnavailable``, e.g. ``[network] mode = "user"``, where sandboxes have no egress at
all) are a 409, as E2B answers a request that conflicts with the sandbox's state: the request is
well-formed, this host's setup is what refuses it, and the message says which setup would accept it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from ..cluster.node import ClusterUnavailable
from ..sandbox.lifecycle import InvalidTimeout
from ..sandbox.limits import LimitReached, OutOfMemory
from ..sandbox.reclaim import ReclaimFailed
from ..network.policy import PolicyError
from ..sandbox.manager import (
    ManagerClosed, NetworkUnavailable, PortUnavailable, SandboxConflict, SandboxNotFound, TemplateNetworkMismatch,
)
from ..sandbox.snapshots import SnapshotNameTaken
from ..template.integrity import TemplateDamaged
from ..template.store import TemplateNotFound

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with its HTTP status; raised by routes, rendered by :func:`install`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def _clean(text: str) -> str:
    """Messages may quote client input: never let a lone surrogate break the JSON encoding."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"code": status, "message": _clean(message), **extra}, status_code=status, headers=headers)


def error_body(status: int, message: str, **extra: Any) -> bytes:
    return json.dumps({"code": status, "message": message, **extra}).encode()


#: exception type -> (status, extra headers)
STATUS_OF: list[tuple[type[BaseException], int, dict[str, str] | None]] = [
    (SandboxNotFound, 404, None),
    (SnapshotNameTaken, 409, None),
    (TemplateNotFound, 404, None),
    (TemplateDamaged, 500, None),  # the host's fault: its message says how to rebuild the template
    (InvalidTimeout, 400, None),
    (SandboxConflict, 409, None),
    (NetworkUnavailable, 409, None),
    (TemplateNetworkMismatch, 409, None),
    (PolicyError, 400, None),
    (LimitReached, 429, {"Retry-After": "5"}),
    (OutOfMemory, 503, {"Retry-After": "10"}),
    (ManagerClosed, 503, None),
    (PortUnavailable, 502, None),
    (ReclaimFailed, 502, None),
    (ClusterUnavailable, 503, {"Retry-After": "5"}),
]


def status_for(exc: BaseException) -> tuple[int, dict[str, str] | None] | None:
    for typ, status, headers in STATUS_OF:
        if isinstance(exc, typ):
            return status, headers
    return None


def describe_validation_error(errors: list[dict[str, Any]]) -> str:
    """``body.timeout: Input should be a valid integer`` -- the field at fault first."""
    parts = []
    for e in errors[:5]:
        loc = [str(p) for p in e.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            where = loc[0] + (" field " + ".".join(loc[1:]) if len(loc) > 1 else "")
        else:
            where = ".".join(loc) or "request"
        msg = e.get("msg", "invalid")
        if e.get("type") == "json_invalid":
            where, msg = "body", "is not valid JSON"
        elif e.get("type") == "missing" and len(loc) <= 1:
            msg = "a JSON body is required"
        elif e.get("type") == "extra_forbidden":
            msg = "unknown field (not part of E2B's API, or not supported by trenvx); leave it out"
        elif len(loc) == 1 and loc[0] == "body" and e.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            msg = "expected a JSON object (with Content-Type: application/json)"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts) or "invalid request"


def _allowed_methods(request: Request) -> set[str]:
    """Every method some documented route accepts on this path (Starlette names only the first
    route's). A path that a route names literally (``/sandboxes/metrics``) is that route's, even
    where a route with a parameter (``/sandboxes/{sandboxID}``) would also match it."""
    from starlette.routing import Match

    def walk(routes):  # FastAPI wraps included routers; their routes carry no prefix here
        for r in routes:
            inner = getattr(r, "original_router", None)
            if inner is not None:
                yield from walk(inner.routes)
            else:
                yield r

    matched = []
    for route in walk(request.app.router.routes):
        if not getattr(route, "include_in_schema", True) or not getattr(route, "methods", None):
            continue
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            matched.append(route)
    literal = [r for r in matched if not getattr(r, "param_convertors", None)]
    methods: set[str] = set()
    for route in literal or matched:
        methods |= set(route.methods)
    return methods


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, describe_validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
            headers["Allow"] = ", ".join(sorted(_allowed_methods(request)))
        return error_response(exc.status_code, message, headers or None)

    for typ, status, headers in STATUS_OF:
        def _make(status: int = status, headers: dict[str, str] | None = headers):
            async def handler(request: Request, exc: Exception) -> JSONResponse:
                return error_response(status, str(exc), headers)
            return handler

        app.add_exception_handler(typ, _make())

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
