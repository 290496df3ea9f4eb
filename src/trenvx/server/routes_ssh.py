"""SSH into sandboxes through the API: ``ssh root@<sandbox-id>`` (sandbox-cli's ssh-config, ``sandbox ssh``).

    POST /sandboxes/{sandboxID}/ssh          {"publicKeys": ["ssh-ed25519 AAAA... me@host"]}
                                             start sshd in the sandbox if it is not running, let the
                                             keys in as root and the template's user; answers the
                                             sandbox's host keys (200)
    GET  /sandboxes/{sandboxID}/ssh/tunnel   websocket: the bytes of the sandbox's port 22
                                             (:mod:`.tcp_tunnel`), for an ssh ``ProxyCommand``

Both are API routes: they need the API key (``X-API-Key``) like every other, or, on a server
without one, a caller on this machine (:mod:`.auth`). A sandbox's ports are reached through the
proxy by anyone who knows its id (unless it is private); sshd's port is not: it is reached only
through this tunnel, and sshd itself lets in only the keys the key holder installed.

Isolation: the tunnel's only parameter is the sandbox id, which must be a running sandbox of this
server; the port is always 22 and the address is the one the manager gives for that sandbox
(:meth:`~trenvx.sandbox.manager.SandboxManager.port_endpoint`: its QEMU forward on 127.0.0.1, or
its network slot's address), so no request can point it at another sandbox or at a host address.
Only public keys are sent into a sandbox, and the host key that comes back is checked
(:mod:`trenvx.guest.ssh_keys`) before a client pins it.

Sandboxes on Firecracker or Cloud Hypervisor have no network device yet: their port 22 cannot be
reached (the POST answers 409 naming the setup that would work, as other setup refusals do; the
websocket 502, as the proxy answers for their other ports).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Literal

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request, WebSocket
from pydantic import BaseModel, ConfigDict, Field, StrictStr, StringConstraints, WithJsonSchema
from starlette.responses import JSONResponse

from ..guest.client import AgentError
from ..guest.endpoint import TcpEndpoint
from ..guest.ssh_keys import MAX_KEY_CHARS, PUBLIC_KEY_PATTERN, InvalidPublicKey, parse_public_key
from ..guest.sshd import OPENSSH_HINT, SshdFailed, SshdUnavailable, prepare_sshd
from ..sandbox.manager import PortUnavailable, SandboxConflict, SandboxManager, SandboxNotFound
from .auth import API_KEY_HEADER, HOW_TO_SET_A_KEY, is_loopback, key_matches, require_api_key
from .errors import ApiError
from .models import SANDBOX_ID_RE, Error
from .tcp_tunnel import open_tcp, relay

log = logging.getLogger(__name__)

SSH_PORT = 22
GONE_POLL_S = 0.5
"""How often an open tunnel looks whether its sandbox still runs (a VM that is gone may never close its connections)."""
MAX_PUBLIC_KEYS = 16

ERRORS = {
    400: {"model": Error, "description": "Malformed public key (the message names it)"},
    401: {"model": Error, "description": "Missing or invalid X-API-Key"},
    403: {"model": Error, "description": "No API key is configured and the caller is not on this machine"},
    404: {"model": Error, "description": "No such sandbox"},
    409: {"model": Error, "description": "The sandbox is paused, its template has no OpenSSH server, or its port 22 "
                                         "cannot be reached from the host (Firecracker, Cloud Hypervisor)"},
    502: {"model": Error, "description": "The sandbox's agent could not start sshd (the message says why)"},
}


PublicKeyText = Annotated[
    StrictStr, StringConstraints(max_length=MAX_KEY_CHARS),
    # The document states the exact form; the parser checks it and names what is wrong in words.
    WithJsonSchema({"type": "string", "maxLength": MAX_KEY_CHARS, "pattern": PUBLIC_KEY_PATTERN,
                    "description": "One OpenSSH public key: TYPE BASE64 [COMMENT], as in a .pub file"}),
]


class SshRequest(BaseModel):
    """The public keys to let into the sandbox (OpenSSH one-line format, as in a ``.pub`` file)."""

    model_config = ConfigDict(extra="forbid")
    publicKeys: list[PublicKeyText] = Field(min_length=1, max_length=MAX_PUBLIC_KEYS)


class SshAccess(BaseModel):
    """sshd listens on the sandbox's port 22; these keys and users are what ssh needs to know."""

    sandboxID: str
    hostKeys: list[str] = Field(description="The sandbox's own host keys (TYPE BASE64), made on its first ssh")
    users: list[str] = Field(description="Accounts the keys log in as: root, and the template's user")
    sshd: Literal["started", "running"]
    tunnel: str = Field(description="Path of the websocket that carries the connection to port 22")


router = APIRouter(dependencies=[Depends(require_api_key)], responses={401: ERRORS[401], 403: ERRORS[403]},
                   tags=["ssh"])


def _check_id(sandbox_id: str) -> None:
    # No sandbox has such an id: 404 as for any unknown id (the schema allows any string there).
    if not SANDBOX_ID_RE.match(sandbox_id):
        raise ApiError(404, f"sandbox {sandbox_id[:70]!r} does not exist: it is not a sandbox id "
                            "(20 lowercase letters and digits)")


@router.post("/sandboxes/{sandboxID}/ssh", response_model=SshAccess,
             responses={400: ERRORS[400], 404: ERRORS[404], 409: ERRORS[409], 502: ERRORS[502]},
             summary="Start sshd in the sandbox and let public keys in (trenvx; for ssh root@<sandbox-id>)")
async def prepare(request: Request, sandboxID: str, body: SshRequest) -> SshAccess:
    _check_id(sandboxID)
    keys = []
    for i, text in enumerate(body.publicKeys):
        try:
            keys.append(parse_public_key(text))
        except InvalidPublicKey as e:
            raise ApiError(400, f"body field publicKeys[{i}]: {e}") from None
    manager: SandboxManager = request.app.state.manager
    sb = manager.get(sandboxID)
    if sb.paused:
        raise ApiError(409, f"sandbox {sandboxID} is paused; resume it first (sandbox-cli sandbox resume {sandboxID})")
    try:  # before starting anything: the VMs of Firecracker and Cloud Hypervisor have no port 22 to reach
        await manager.port_endpoint(sandboxID, SSH_PORT)
    except PortUnavailable as e:  # this sandbox's setup refuses it, as NetworkUnavailable is a 409 (errors.py)
        raise ApiError(409, f"sandbox {sandboxID} cannot be reached on port {SSH_PORT}, so not by ssh: {e}") from None
    users = ["root"] + ([sb.build.default_user] if sb.build.default_user not in ("", "root") else [])
    try:
        ready = await prepare_sshd(sb.agent, sb.id, keys, users)
    except SshdUnavailable as e:
        raise ApiError(409, f"template {sb.template} has no OpenSSH server ({e}): to ssh into its sandboxes, "
                            f"{OPENSSH_HINT}") from None
    except SshdFailed as e:
        raise ApiError(502, f"sandbox {sandboxID} could not start sshd: {e}") from None
    except TimeoutError:
        raise ApiError(502, f"sandbox {sandboxID} did not finish starting sshd in time") from None
    except (AgentError, httpx.HTTPError) as e:
        manager.get(sandboxID)  # gone meanwhile: a 404 says so
        raise ApiError(502, f"the agent of sandbox {sandboxID} could not run the sshd setup: "
                            f"{type(e).__name__}: {e}") from None
    log.info("sandbox %s: sshd %s for %s", sandboxID, "started" if ready.started else "running", ", ".join(ready.users))
    return SshAccess(sandboxID=sandboxID, hostKeys=[f"{k.type} {k.blob}" for k in ready.host_keys],
                     users=list(ready.users), sshd="started" if ready.started else "running",
                     tunnel=f"/sandboxes/{sandboxID}/ssh/tunnel")


# -- the tunnel -------------------------------------------------------------------------------

tunnel_router = APIRouter()
"""The websocket: its own router, as the HTTP key check (a FastAPI dependency) answers HTTP only."""


def _refusal(websocket: WebSocket) -> tuple[int, str] | None:
    """Why this websocket may not open (status, message); None when its caller holds the key
    (or is local, on a server without one). The same rules as :func:`~.auth.require_api_key`."""
    expected: str = websocket.app.state.api_key
    if not expected:
        client = websocket.scope.get("client")
        if client and not is_loopback(str(client[0])):
            return 403, ("this trenvx server has no API key, so it answers only callers on this machine "
                         f"(loopback); to use it from elsewhere, {HOW_TO_SET_A_KEY}")
        return None
    given = websocket.headers.get(API_KEY_HEADER)
    if given is None:
        return 401, f"missing {API_KEY_HEADER} header: this server requires an API key"
    if not key_matches(expected, given):
        return 401, "invalid API key"
    return None


async def _deny(websocket: WebSocket, status: int, message: str) -> None:
    """Refuse the handshake with an HTTP answer (a JSON error) where the server can send one, else close."""
    body = {"code": status, "message": message}
    try:
        await websocket.send_denial_response(JSONResponse(body, status_code=status))
    except RuntimeError:  # the server lacks the websocket denial extension
        await websocket.close(code=1008 if status < 500 else 1011, reason=message[:120])


async def _until_gone(manager: SandboxManager, sandbox_id: str) -> str:
    """Returns (why) once the sandbox no longer runs: ended, or paused (its VM is gone)."""
    while True:
        await asyncio.sleep(GONE_POLL_S)
        try:
            sb = manager.get(sandbox_id)
        except SandboxNotFound as e:
            return str(e)
        if sb.paused:
            return f"sandbox {sandbox_id} was paused"


@tunnel_router.websocket("/sandboxes/{sandboxID}/ssh/tunnel")
async def tunnel(websocket: WebSocket, sandboxID: str) -> None:
    refused = _refusal(websocket)
    if refused is not None:
        return await _deny(websocket, *refused)
    if not SANDBOX_ID_RE.match(sandboxID):
        return await _deny(websocket, 404, f"sandbox {sandboxID[:70]!r} does not exist: it is not a sandbox id")
    manager: SandboxManager = websocket.app.state.manager
    try:
        endpoint = await manager.port_endpoint(sandboxID, SSH_PORT)
    except SandboxNotFound as e:
        return await _deny(websocket, 404, str(e))
    except SandboxConflict as e:
        return await _deny(websocket, 409, str(e))
    except PortUnavailable as e:
        return await _deny(websocket, 502, f"port {SSH_PORT} of sandbox {sandboxID} cannot be reached: {e}")
    if not isinstance(endpoint, TcpEndpoint):  # (port_endpoint gives vsock only for the agent's port)
        return await _deny(websocket, 502, f"port {SSH_PORT} of sandbox {sandboxID} is not reachable over TCP")
    try:
        reader, writer = await open_tcp(endpoint.host, endpoint.port)
    except (OSError, asyncio.TimeoutError) as e:
        return await _deny(websocket, 502, f"nothing answers on port {SSH_PORT} of sandbox {sandboxID} "
                                           f"({type(e).__name__}: {e}); start sshd first: POST "
                                           f"/sandboxes/{sandboxID}/ssh (sandbox-cli does)")
    await websocket.accept()
    why = await relay(websocket, reader, writer, stop=_until_gone(manager, sandboxID))
    log.info("sandbox %s: ssh tunnel ended: %s", sandboxID, why)


def install(app: FastAPI) -> None:
    """Add the ssh routes to ``app`` (before any catch-all route)."""
    app.include_router(router)
    app.include_router(tunnel_router)


__all__ = ["SSH_PORT", "SshAccess", "SshRequest", "install", "router", "tunnel_router"]
