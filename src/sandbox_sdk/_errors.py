"""Turning HTTP answers and transport failures into the SDK's typed errors."""

from __future__ import annotations

import json
from typing import Any, Optional

import httpx

from . import _connect
from .exceptions import (
    AlreadyExistsError,
    AuthenticationError,
    BackendUnreachableError,
    ConflictError,
    InsufficientCapacityError,
    InvalidArgumentError,
    NotEnoughSpaceError,
    NotFoundError,
    PathNotFoundError,
    PermissionDeniedError,
    ProcessNotFoundError,
    RateLimitError,
    RpcError,
    SandboxError,
    SandboxNotFoundError,
    StreamError,
    TemplateNotFoundError,
    TimeoutError,
)

#: What a request was about; decides which "not found" a 404 means.
#: "api": backend REST call; "create": POST /sandboxes; "sandbox": REST call on one sandbox;
#: "process"/"files"/"envd": a request to the sandbox's agent through the proxy.
Context = str


def _body_message(body: bytes) -> tuple[Any, str]:
    """``(code, message)`` from a JSON error body ``{"code", "message"}``, or the raw text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None, text[:500]
    if isinstance(value, dict):
        msg = value.get("message") or value.get("detail") or value.get("error") or ""
        if not isinstance(msg, str):
            msg = json.dumps(msg)
        return value.get("code"), msg
    return None, text[:500]


def connect_error(
    code: str,
    message: str,
    *,
    context: Context = "envd",
    status_code: Optional[int] = None,
    sandbox_id: Optional[str] = None,
) -> SandboxError:
    """The typed error for a Connect error code from the guest agent."""
    detail = message or code
    if code == "not_found":
        if context == "files":
            return PathNotFoundError(
                f"{detail}: no such file or directory in the sandbox", status_code=status_code, code=code
            )
        if context == "process":
            return ProcessNotFoundError(
                f"{detail}: no such process in the sandbox (it may have exited; see commands.list())",
                status_code=status_code,
                code=code,
            )
        return NotFoundError(detail, status_code=status_code, code=code)
    if code in ("invalid_argument", "out_of_range", "failed_precondition"):
        return InvalidArgumentError(detail, status_code=status_code, code=code)
    if code == "already_exists":
        return AlreadyExistsError(detail, status_code=status_code, code=code)
    if code == "permission_denied":
        return PermissionDeniedError(
            f"{detail} (run as another user with user='root' if this is expected)", status_code=status_code, code=code
        )
    if code == "unauthenticated":
        return AuthenticationError(
            f"the sandbox's agent rejected the request: {detail}. The access token is given by the backend "
            "when the sandbox is created; reconnect with Sandbox.connect(sandbox_id)",
            status_code=status_code,
            code=code,
        )
    if code == "resource_exhausted":
        return NotEnoughSpaceError(
            f"{detail} (the sandbox ran out of a resource, usually disk space)", status_code=status_code, code=code
        )
    if code in ("deadline_exceeded", "canceled"):
        return TimeoutError(
            f"{detail}: the operation ran past its timeout; pass a larger timeout (0 means no limit)",
            status_code=status_code,
            code=code,
        )
    if code == "unavailable" and "was not found" in detail:
        # The backend's proxy ends a stream whose sandbox went away (killed, timed out, its VM died)
        # with "The sandbox ... was not found": the sandbox is gone, as E2B's SDK reads it too.
        return SandboxNotFoundError(detail, status_code=status_code, code=code)
    if code == "unavailable":
        where = f"sandbox {sandbox_id}" if sandbox_id else "the sandbox"
        return SandboxError(
            f"{where} is unavailable: {detail}. It may have been killed or be out of memory; check Sandbox.list()",
            status_code=status_code,
            code=code,
        )
    return RpcError(f"{code}: {detail}", status_code=status_code, code=code)


def http_error(
    status: int,
    body: bytes,
    *,
    context: Context = "api",
    sandbox_id: Optional[str] = None,
    template: Optional[str] = None,
    url: str = "",
) -> SandboxError:
    """The typed error for an HTTP error answer from the backend, its proxy or the agent."""
    connect = _connect.unary_error(body)
    if connect is not None:
        return connect_error(connect[0], connect[1], context=context, status_code=status, sandbox_id=sandbox_id)
    code, message = _body_message(body)
    detail = message or f"HTTP {status}"
    sbx = f"sandbox {sandbox_id!r}" if sandbox_id else "the sandbox"
    if status == 400:
        return InvalidArgumentError(f"the backend refused the request: {detail}", status_code=status, code=code)
    if status == 403 and context == "files":
        return PermissionDeniedError(
            f"{detail} (run as another user with user='root' if this is expected)", status_code=status, code=code
        )
    if status in (401, 403) and context in ("process", "files", "envd"):
        return AuthenticationError(
            f"{sbx}'s agent rejected the request ({detail}): the access token is given by the backend "
            "when the sandbox is created; reconnect with Sandbox.connect(sandbox_id)",
            status_code=status,
            code=code,
        )
    if status in (401, 403):
        return AuthenticationError(
            f"the backend rejected the credentials ({detail}). Pass api_key=... or set TRENVX_API_KEY "
            "to the key the backend was started with",
            status_code=status,
            code=code,
        )
    if status == 404:
        if context == "create":
            name = repr(template) if template else "the default template"
            return TemplateNotFoundError(
                f"template {name} was not found on the backend ({detail}). Build it with "
                "`template-manager --config <config.toml>`, or list the built ones with Sandbox.list_templates()",
                status_code=status,
                code=code,
            )
        if context == "files" and "sandbox" not in detail.lower():
            return PathNotFoundError(
                f"{detail}: no such file or directory in the sandbox", status_code=status, code=code
            )
        if context in ("sandbox", "process", "files", "envd"):
            return SandboxNotFoundError(
                f"{sbx} was not found ({detail}): it was killed or its timeout passed. "
                "Create a new one with Sandbox.create(), or list the running ones with Sandbox.list()",
                status_code=status,
                code=code,
            )
        return NotFoundError(f"{detail} ({url})" if url else detail, status_code=status, code=code)
    if status == 409:
        return ConflictError(f"{detail}", status_code=status, code=code)
    if status == 429:
        return RateLimitError(
            f"a limit of the backend was reached: {detail}. Kill sandboxes you no longer need "
            "(Sandbox.list() shows them) or raise the limit in the backend's configuration",
            status_code=status,
            code=code,
        )
    if status == 502 and context in ("process", "files", "envd") and "not found" in detail.lower():
        return SandboxNotFoundError(
            f"{sbx} was not found ({detail}): it was killed or its timeout passed. "
            "Create a new one with Sandbox.create(), or list the running ones with Sandbox.list()",
            status_code=status,
            code=code,
        )
    if status == 502 and context in ("process", "files", "envd"):
        return SandboxError(
            f"the backend could not reach {sbx}'s agent ({detail}); the sandbox may have been killed or "
            "its VM may have stopped. Check it with Sandbox.list()",
            status_code=status,
            code=code,
        )
    if status == 503:
        return InsufficientCapacityError(
            f"the backend has no capacity for this now: {detail}. Kill unused sandboxes or retry later",
            status_code=status,
            code=code,
        )
    if status == 504:
        return TimeoutError(f"the backend timed out: {detail}", status_code=status, code=code)
    if status == 507:
        return NotEnoughSpaceError(f"not enough disk space: {detail}", status_code=status, code=code)
    return SandboxError(f"HTTP {status} from {url or 'the backend'}: {detail}", status_code=status, code=code)


def transport_error(exc: Exception, *, url: str, what: str = "request") -> SandboxError:
    """The typed error for an httpx transport failure (nothing was answered)."""
    if isinstance(exc, SandboxError):
        return exc
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return BackendUnreachableError(
            f"cannot reach the trenvx backend at {url} ({exc or type(exc).__name__}). Is it running "
            "(`scripts/start.sh run`)? Pass target_addr=/api_url= or set SANDBOX_BACKEND_ADDR to its address",
        )
    if isinstance(exc, httpx.TimeoutException):
        return TimeoutError(
            f"the {what} to {url} timed out ({type(exc).__name__}); pass a larger request_timeout "
            "(or timeout) if the operation is expected to take longer",
        )
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        return StreamError(f"the connection to {url} broke during the {what}: {exc or type(exc).__name__}")
    if isinstance(exc, _connect.ProtocolError):
        return StreamError(f"malformed answer from {url}: {exc}")
    return SandboxError(f"{what} to {url} failed: {type(exc).__name__}: {exc}")
