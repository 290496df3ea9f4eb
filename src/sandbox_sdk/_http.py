"""The asynchronous HTTP core: the backend's REST API and the guest agent's envd protocol.

Everything the SDK sends goes through :func:`send`, which applies the timeout, retries what
is safe to retry (any request that failed to connect, since nothing was sent; idempotent
requests also after a broken connection) and maps failures to typed errors.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json as _json
import logging
import random
import ssl
import urllib.parse
from typing import IO, Any, AsyncIterable, AsyncIterator, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import httpx

from . import _connect
from ._config import ENVD_PORT, ConnectionConfig
from ._errors import Context, connect_error, http_error, transport_error
from ._lifecycle import create_lifecycle_body
from ._network import create_network_body, update_network_body
from .exceptions import InvalidArgumentError, SandboxError, StreamError, TimeoutError
from .models import SandboxConnectionInfo, SandboxInfo, SandboxMetrics, SnapshotInfo, TemplateInfo

log = logging.getLogger("sandbox_sdk")

USER_AGENT = "trenvx-sandbox-sdk/0.1"
#: Seconds between keepalive messages the agent sends on idle streams (E2B's value).
KEEPALIVE_INTERVAL_S = 50

_RETRY_ALWAYS = (httpx.ConnectError, httpx.ConnectTimeout)
_RETRY_IDEMPOTENT = _RETRY_ALWAYS + (httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout, httpx.WriteError)
_RETRY_STATUS = frozenset({502, 504})


_TLS: Optional[ssl.SSLContext] = None


def _tls_context() -> ssl.SSLContext:
    """One verifying TLS context for every client: httpx would load the CA bundle again for each
    sandbox object (~20 ms, a large part of a create from a warm pool)."""
    global _TLS
    if _TLS is None:
        _TLS = ssl.create_default_context()
    return _TLS


def make_client(config: ConnectionConfig) -> httpx.AsyncClient:
    """An httpx client for one sandbox object (connection pool shared by its calls)."""
    timeout = config.timeout(None)
    headers = {"User-Agent": USER_AGENT, **config.headers}
    if config.api_key:
        headers["X-API-Key"] = config.api_key
    kwargs: Dict[str, Any] = {}
    if config.transport is not None:
        kwargs["transport"] = config.transport
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=min(timeout or 10.0, 10.0)),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=32, keepalive_expiry=4.0),
        headers=headers,
        follow_redirects=False,
        trust_env=False,
        verify=_tls_context(),
        **kwargs,
    )


def _timeout(seconds: Optional[float], *, read: Any = "same") -> httpx.Timeout:
    connect = min(seconds, 10.0) if seconds else 10.0
    return httpx.Timeout(seconds, connect=connect, read=seconds if read == "same" else read)


async def send(
    client: httpx.AsyncClient,
    request: httpx.Request,
    *,
    config: ConnectionConfig,
    idempotent: bool = False,
    stream: bool = False,
    what: str = "request",
) -> httpx.Response:
    """Send one request with retries where safe; raises typed errors on transport failure."""
    attempts = 1 + max(0, config.retries)
    delay = 0.1
    for attempt in range(attempts):
        try:
            response = await client.send(request, stream=stream)
        except httpx.HTTPError as e:
            retryable = _RETRY_IDEMPOTENT if idempotent else _RETRY_ALWAYS
            if isinstance(e, retryable) and attempt + 1 < attempts:
                log.debug("retrying %s %s after %r", request.method, request.url, e)
                await asyncio.sleep(delay * (1 + random.random()))
                delay *= 3
                continue
            raise transport_error(e, url=str(request.url), what=what) from None
        if idempotent and response.status_code in _RETRY_STATUS and attempt + 1 < attempts:
            await response.aclose()
            await asyncio.sleep(delay * (1 + random.random()))
            delay *= 3
            continue
        return response
    raise AssertionError("unreachable")


async def _read_error(response: httpx.Response) -> bytes:
    try:
        return await response.aread()
    except httpx.HTTPError:
        return b""
    finally:
        await response.aclose()


# --------------------------------------------------------------------------- REST API


PAUSE_RESUME_TIMEOUT = 600.0
"""Seconds a pause or resume may take (a boot from disk takes minutes under software emulation)."""
MAX_FORK_COUNT = 100
"""Children one fork may ask for (the backend's limit, E2B's API's)."""


def _items(value: Any, key: str) -> List[Dict[str, Any]]:
    """A JSON list of objects, also when wrapped as ``{key: [...]}``."""
    if isinstance(value, dict):
        value = value.get(key) or []
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


class ApiClient:
    """The backend's REST API (E2B's shapes): sandboxes and templates."""

    def __init__(self, client: httpx.AsyncClient, config: ConnectionConfig) -> None:
        self._client = client
        self._config = config

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Any = None,
        request_timeout: Optional[float] = None,
        context: Context = "api",
        sandbox_id: Optional[str] = None,
        template: Optional[str] = None,
        ok: Sequence[int] = (200, 201, 204),
    ) -> httpx.Response:
        url = self._config.api_url + path
        request = self._client.build_request(
            method, url, json=json, params=params, timeout=_timeout(self._config.timeout(request_timeout))
        )
        response = await send(
            self._client,
            request,
            config=self._config,
            idempotent=method in ("GET", "DELETE", "HEAD", "PUT"),  # PUT /network replaces: safe to repeat
            what=f"{method} {path}",
        )
        if response.status_code not in ok:
            body = await _read_error(response)
            raise http_error(
                response.status_code, body, context=context, sandbox_id=sandbox_id, template=template, url=url
            )
        return response

    async def create_sandbox(
        self,
        template: Optional[str],
        timeout: Optional[int],
        metadata: Optional[Mapping[str, str]],
        envs: Optional[Mapping[str, str]],
        request_timeout: Optional[float] = None,
        *,
        allow_internet_access: Optional[bool] = None,
        network: Optional[Mapping[str, Any]] = None,
        lifecycle: Optional[Mapping[str, Any]] = None,
    ) -> SandboxConnectionInfo:
        body: Dict[str, Any] = {}
        if template:
            body["templateID"] = template
        if timeout is not None:
            body["timeout"] = int(timeout)
        if metadata:
            body["metadata"] = {str(k): str(v) for k, v in metadata.items()}
        if envs:
            body["envVars"] = {str(k): str(v) for k, v in envs.items()}
        if allow_internet_access is not None:
            if not isinstance(allow_internet_access, bool):
                raise InvalidArgumentError(f"allow_internet_access must be True or False, not {allow_internet_access!r}")
            body["allow_internet_access"] = allow_internet_access
        net = create_network_body(network)
        if net is not None:
            body["network"] = net
        body.update(create_lifecycle_body(lifecycle))
        r = await self._call(
            "POST", "/sandboxes", json=body, request_timeout=request_timeout, context="create", template=template
        )
        return SandboxConnectionInfo.from_json(r.json())

    async def get_sandbox(self, sandbox_id: str, request_timeout: Optional[float] = None) -> Dict[str, Any]:
        r = await self._call(
            "GET", f"/sandboxes/{sandbox_id}", request_timeout=request_timeout, context="sandbox", sandbox_id=sandbox_id
        )
        value = r.json()
        return value if isinstance(value, dict) else {}

    async def list_sandboxes(
        self,
        metadata: Optional[Mapping[str, str]] = None,
        state: Optional[Sequence[str]] = None,
        request_timeout: Optional[float] = None,
    ) -> List[SandboxInfo]:
        """Running sandboxes (``GET /sandboxes``); with ``state``, ``GET /v2/sandboxes`` (all pages)."""
        params: Dict[str, str] = {}
        if metadata:
            # E2B's encoding: each key and value quoted, then the pairs URL-encoded.
            params["metadata"] = urllib.parse.urlencode(
                {urllib.parse.quote(str(k)): urllib.parse.quote(str(v)) for k, v in metadata.items()}
            )
        if not state:
            r = await self._call("GET", "/sandboxes", params=params or None, request_timeout=request_timeout)
            return [SandboxInfo.from_json(item) for item in _items(r.json(), "sandboxes")]
        params["state"] = ",".join(state)
        out: List[SandboxInfo] = []
        while True:
            r = await self._call("GET", "/v2/sandboxes", params=params, request_timeout=request_timeout)
            out.extend(SandboxInfo.from_json(item) for item in _items(r.json(), "sandboxes"))
            token = r.headers.get("x-next-token")
            if not token:
                return out
            params["nextToken"] = token

    async def kill_sandbox(self, sandbox_id: str, request_timeout: Optional[float] = None) -> bool:
        """True if the sandbox was killed, False if it did not exist."""
        url = f"{self._config.api_url}/sandboxes/{sandbox_id}"
        request = self._client.build_request("DELETE", url, timeout=_timeout(self._config.timeout(request_timeout)))
        response = await send(self._client, request, config=self._config, idempotent=True, what="DELETE")
        if response.status_code == 404:
            await _read_error(response)
            return False
        if response.status_code not in (200, 202, 204):
            body = await _read_error(response)
            raise http_error(response.status_code, body, context="sandbox", sandbox_id=sandbox_id, url=url)
        await response.aclose()
        return True

    async def get_metrics(
        self, sandbox_id: str, start: Optional[int] = None, end: Optional[int] = None,
        request_timeout: Optional[float] = None,
    ) -> List[SandboxMetrics]:
        """``GET /sandboxes/{id}/metrics``: samples within [start, end] (unix seconds), oldest first."""
        params = {k: int(v) for k, v in (("start", start), ("end", end)) if v is not None}
        r = await self._call("GET", f"/sandboxes/{sandbox_id}/metrics", params=params or None,
                             request_timeout=request_timeout, context="sandbox", sandbox_id=sandbox_id)
        return [SandboxMetrics.from_json(item) for item in _items(r.json(), "metrics")]

    async def set_timeout(self, sandbox_id: str, timeout: int, request_timeout: Optional[float] = None) -> None:
        await self._call(
            "POST",
            f"/sandboxes/{sandbox_id}/timeout",
            json={"timeout": int(timeout)},
            request_timeout=request_timeout,
            context="sandbox",
            sandbox_id=sandbox_id,
        )

    async def update_network(
        self, sandbox_id: str, network: Mapping[str, Any], request_timeout: Optional[float] = None
    ) -> None:
        """``PUT /sandboxes/{id}/network``: replace the sandbox's egress rules (omitted: cleared)."""
        await self._call(
            "PUT",
            f"/sandboxes/{sandbox_id}/network",
            json=update_network_body(network),
            request_timeout=request_timeout,
            context="sandbox",
            sandbox_id=sandbox_id,
        )

    async def list_templates(self, request_timeout: Optional[float] = None) -> List[TemplateInfo]:
        r = await self._call("GET", "/templates", request_timeout=request_timeout)
        return [TemplateInfo.from_json(item) for item in _items(r.json(), "templates")]

    async def refresh(self, sandbox_id: str, duration: int, request_timeout: Optional[float] = None) -> None:
        """Keep the sandbox alive at least ``duration`` more seconds."""
        await self._call(
            "POST",
            f"/sandboxes/{sandbox_id}/refreshes",
            json={"duration": int(duration)},
            request_timeout=request_timeout,
            context="sandbox",
            sandbox_id=sandbox_id,
        )

    async def pause_sandbox(
        self, sandbox_id: str, *, memory: bool = True, strict: bool = False, request_timeout: Optional[float] = None,
    ) -> bool:
        """``POST /sandboxes/{id}/pause``: True once paused, False if it was paused already."""
        body: Dict[str, Any] = {"memory": bool(memory)}
        if strict:
            body["requireHealthyGuest"] = True
        r = await self._call(
            "POST", f"/sandboxes/{sandbox_id}/pause", json=body, context="sandbox", sandbox_id=sandbox_id,
            request_timeout=request_timeout if request_timeout is not None else PAUSE_RESUME_TIMEOUT, ok=(204, 409),
        )
        if r.status_code == 409:
            body_bytes = await _read_error(r)
            if b"already paused" in body_bytes:
                return False
            raise http_error(409, body_bytes, context="sandbox", sandbox_id=sandbox_id)
        await r.aclose()
        return True

    async def connect_sandbox(
        self, sandbox_id: str, timeout: Optional[int] = None, *, memory: bool = True,
        request_timeout: Optional[float] = None,
    ) -> Tuple[SandboxConnectionInfo, bool]:
        """``POST /sandboxes/{id}/connect``: resumes a paused sandbox (``memory=False``: boots it from
        its disk), extends its timeout to ``timeout`` if longer. (its info, whether it was resumed)."""
        body: Dict[str, Any] = {}
        if timeout is not None:
            body["timeout"] = int(timeout)
        if not memory:
            body["memory"] = False
        r = await self._call(
            "POST", f"/sandboxes/{sandbox_id}/connect", json=body, context="sandbox", sandbox_id=sandbox_id,
            request_timeout=request_timeout if request_timeout is not None else PAUSE_RESUME_TIMEOUT,
        )
        return SandboxConnectionInfo.from_json(r.json()), r.status_code == 201

    async def fork_sandbox(
        self, sandbox_id: str, timeout: Optional[int] = None, count: Optional[int] = None,
        request_timeout: Optional[float] = None,
    ) -> List[Union[SandboxConnectionInfo, SandboxError]]:
        """``POST /sandboxes/{id}/fork``: one entry per child, its connection info or the error that
        kept it from starting (a refused request raises: nothing was forked)."""
        body: Dict[str, Any] = {}
        if timeout is not None:
            body["timeout"] = int(timeout)
        if count is not None:
            if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_FORK_COUNT:
                raise InvalidArgumentError(f"count must be an integer from 1 to {MAX_FORK_COUNT}, not {count!r}")
            body["count"] = count
        r = await self._call(
            "POST", f"/sandboxes/{sandbox_id}/fork", json=body, context="sandbox", sandbox_id=sandbox_id,
            request_timeout=request_timeout if request_timeout is not None else PAUSE_RESUME_TIMEOUT,
        )
        out: List[Union[SandboxConnectionInfo, SandboxError]] = []
        for item in _items(r.json(), "results"):
            sandbox, error = item.get("sandbox"), item.get("error")
            if isinstance(sandbox, dict) and sandbox.get("sandboxID"):
                out.append(SandboxConnectionInfo.from_json(sandbox))
                continue
            error = error if isinstance(error, dict) else {"code": 500, "message": "the child did not start"}
            code = error.get("code") if isinstance(error.get("code"), int) else 500
            out.append(http_error(code, _json.dumps(error).encode(), context="create"))
        return out

    async def create_snapshot(
        self, sandbox_id: str, name: Optional[str] = None, *, memory: bool = True,
        request_timeout: Optional[float] = None,
    ) -> SnapshotInfo:
        """``POST /sandboxes/{id}/snapshots``: snapshot a running sandbox (it runs on)."""
        body: Dict[str, Any] = {}
        if name:
            body["name"] = str(name)
        if not memory:
            body["memory"] = False
        r = await self._call(
            "POST", f"/sandboxes/{sandbox_id}/snapshots", json=body, context="sandbox", sandbox_id=sandbox_id,
            request_timeout=request_timeout if request_timeout is not None else PAUSE_RESUME_TIMEOUT,
        )
        return SnapshotInfo.from_json(r.json())

    async def list_snapshots(
        self, sandbox_id: Optional[str] = None, name: Optional[str] = None, limit: Optional[int] = None,
        next_token: Optional[str] = None, request_timeout: Optional[float] = None,
    ) -> Tuple[List[SnapshotInfo], Optional[str]]:
        """``GET /snapshots``: one page (newest first) and the token of the next one (None: the last)."""
        params: Dict[str, Any] = {}
        for key, value in (("sandboxID", sandbox_id), ("name", name), ("limit", limit), ("nextToken", next_token)):
            if value is not None and value != "":
                params[key] = value
        r = await self._call("GET", "/snapshots", params=params or None, request_timeout=request_timeout)
        return [SnapshotInfo.from_json(item) for item in _items(r.json(), "snapshots")], r.headers.get("x-next-token")

    async def delete_snapshot(self, snapshot_id: str, request_timeout: Optional[float] = None) -> bool:
        """``DELETE /templates/{id}``: True once deleted, False if there was no such snapshot."""
        path = "/templates/" + urllib.parse.quote(snapshot_id, safe="")
        r = await self._call("DELETE", path, request_timeout=request_timeout, ok=(204, 404))
        await r.aclose()
        return r.status_code == 204

    async def health(self, request_timeout: Optional[float] = None) -> bool:
        try:
            r = await self._call("GET", "/health", request_timeout=request_timeout)
        except SandboxError:
            return False
        await r.aclose()
        return True


# --------------------------------------------------------------------------- envd


def basic_auth(user: Optional[str]) -> Dict[str, str]:
    """The header that chooses the user an agent request runs as (E2B: Basic ``user:``)."""
    if not user:
        return {}
    token = base64.b64encode(f"{user}:".encode()).decode()
    return {"Authorization": f"Basic {token}"}


class ServerStream:
    """The messages of one server-streaming RPC, decoded as they arrive.

    Iterate with ``async for message in stream``; the iteration ends after the end-of-stream
    envelope and raises the mapped error if that envelope carries one. Always ``aclose()``.
    """

    def __init__(self, response: httpx.Response, *, method: str, context: Context, sandbox_id: Optional[str]) -> None:
        self._response = response
        self._method = method
        self._context = context
        self._sandbox_id = sandbox_id
        self._iter: Optional[AsyncIterator[Dict[str, Any]]] = None
        self.closed = False

    def __aiter__(self) -> AsyncIterator[Dict[str, Any]]:
        if self._iter is None:
            self._iter = self._messages()
        return self._iter

    async def __anext__(self) -> Dict[str, Any]:
        return await self.__aiter__().__anext__()

    async def _messages(self) -> AsyncIterator[Dict[str, Any]]:
        decoder = _connect.EnvelopeDecoder()
        url = str(self._response.request.url)
        try:
            async for chunk in self._response.aiter_bytes():
                for flags, payload in decoder.feed(chunk):
                    message = _connect.decode_message(payload, flags)
                    if flags & _connect.FLAG_END_STREAM:
                        err = _connect.end_stream_error(message)
                        if err is not None:
                            raise connect_error(err[0], err[1], context=self._context, sandbox_id=self._sandbox_id)
                        return
                    yield message
            if not self.closed:
                raise StreamError(
                    f"the {self._method} stream from {url} ended without its end-of-stream message "
                    "(the connection was cut: the sandbox may have been killed)"
                )
        except SandboxError:
            raise
        except (httpx.HTTPError, httpx.StreamError, _connect.ProtocolError) as e:
            if self.closed:
                return
            raise transport_error(e, url=url, what=f"{self._method} stream") from None
        finally:
            await self._response.aclose()

    async def aclose(self) -> None:
        """Stop receiving: closes the connection (the remote process is not affected)."""
        if not self.closed:
            self.closed = True
            await self._response.aclose()


FileData = Union[str, bytes, bytearray, memoryview, IO[Any]]


class EnvdClient:
    """The guest agent's API (envd protocol), through the backend's proxy or direct."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        config: ConnectionConfig,
        sandbox_id: str,
        access_token: Optional[str] = None,
        default_user: Optional[str] = None,
    ) -> None:
        self._client = client
        self._config = config
        self.sandbox_id = sandbox_id
        self.default_user = default_user
        if config.envd_url:
            self.base_url = config.envd_url
            self._headers: Dict[str, str] = {}
        else:
            self.base_url = config.api_url
            self._headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(ENVD_PORT)}
        if access_token:
            self._headers["X-Access-Token"] = access_token

    def headers(self, user: Optional[str] = None) -> Dict[str, str]:
        return {**self._headers, **basic_auth(user if user is not None else self.default_user)}

    def _user(self, user: Optional[str]) -> Optional[str]:
        return user if user is not None else self.default_user

    async def unary(
        self,
        method: str,
        message: Mapping[str, Any],
        *,
        user: Optional[str] = None,
        request_timeout: Optional[float] = None,
        context: Context = "envd",
        idempotent: bool = False,
    ) -> Dict[str, Any]:
        """One unary RPC, e.g. ``unary("filesystem.Filesystem/Stat", {"path": "/"})``."""
        seconds = self._config.timeout(request_timeout)
        headers = {
            **self.headers(user),
            "Content-Type": _connect.UNARY_CONTENT_TYPE,
            "Connect-Protocol-Version": _connect.PROTOCOL_VERSION,
            **_connect.timeout_header(seconds),
        }
        url = f"{self.base_url}/{method}"
        request = self._client.build_request(
            "POST", url, json=dict(message), headers=headers, timeout=_timeout(seconds)
        )
        response = await send(self._client, request, config=self._config, idempotent=idempotent, what=method)
        body = await _read_error(response) if response.status_code != 200 else await response.aread()
        if response.status_code != 200:
            raise http_error(response.status_code, body, context=context, sandbox_id=self.sandbox_id, url=url)
        try:
            value = response.json() if body else {}
        except ValueError:
            raise StreamError(f"{method}: the agent answered with invalid JSON: {body[:200]!r}") from None
        return value if isinstance(value, dict) else {}

    async def server_stream(
        self,
        method: str,
        message: Mapping[str, Any],
        *,
        user: Optional[str] = None,
        timeout: Optional[float] = None,
        request_timeout: Optional[float] = None,
        context: Context = "envd",
        extra_headers: Optional[Mapping[str, str]] = None,
    ) -> ServerStream:
        """Open a server-streaming RPC; returns once the agent answered with its headers.

        ``timeout`` bounds the whole stream (sent to the agent as ``Connect-Timeout-Ms``;
        None or 0: no limit); ``request_timeout`` bounds connecting and the first answer.
        """
        seconds = self._config.timeout(request_timeout)
        headers = {
            **self.headers(user),
            "Content-Type": _connect.STREAM_CONTENT_TYPE,
            "Connect-Protocol-Version": _connect.PROTOCOL_VERSION,
            **_connect.timeout_header(timeout),
            # Ask the agent for a keepalive message now and then, so that idle streams (a quiet
            # command, a watch) are not cut by proxies in between.
            "Keepalive-Ping-Interval": str(KEEPALIVE_INTERVAL_S),
            **(extra_headers or {}),
        }
        url = f"{self.base_url}/{method}"
        request = self._client.build_request(
            "POST",
            url,
            content=_connect.encode_envelope(dict(message)),
            headers=headers,
            timeout=_timeout(seconds, read=None),
        )
        try:
            response = await asyncio.wait_for(
                send(self._client, request, config=self._config, stream=True, what=method), seconds
            )
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"{method}: the agent did not answer within {seconds}s; pass a larger request_timeout"
            ) from None
        if response.status_code != 200:
            body = await _read_error(response)
            raise http_error(response.status_code, body, context=context, sandbox_id=self.sandbox_id, url=url)
        return ServerStream(response, method=method, context=context, sandbox_id=self.sandbox_id)

    async def client_stream(
        self,
        method: str,
        messages: AsyncIterable[Mapping[str, Any]],
        *,
        user: Optional[str] = None,
        request_timeout: Optional[float] = None,
        context: Context = "envd",
    ) -> Dict[str, Any]:
        """A client-streaming RPC: the messages are sent as they are produced (chunked)."""
        seconds = self._config.timeout(request_timeout)
        headers = {
            **self.headers(user),
            "Content-Type": _connect.STREAM_CONTENT_TYPE,
            "Connect-Protocol-Version": _connect.PROTOCOL_VERSION,
        }

        async def body() -> AsyncIterator[bytes]:
            async for m in messages:
                yield _connect.encode_envelope(dict(m))

        url = f"{self.base_url}/{method}"
        # The body is produced by the caller at its own pace: no read/write deadline.
        request = self._client.build_request(
            "POST", url, content=body(), headers=headers, timeout=_timeout(seconds, read=None)
        )
        response = await send(self._client, request, config=self._config, stream=True, what=method)
        raw = await _read_error(response) if response.status_code != 200 else await response.aread()
        if response.status_code != 200:
            raise http_error(response.status_code, raw, context=context, sandbox_id=self.sandbox_id, url=url)
        result: Dict[str, Any] = {}
        decoder = _connect.EnvelopeDecoder()
        for flags, payload in decoder.feed(raw):
            msg = _connect.decode_message(payload, flags)
            if flags & _connect.FLAG_END_STREAM:
                err = _connect.end_stream_error(msg)
                if err is not None:
                    raise connect_error(err[0], err[1], context=context, sandbox_id=self.sandbox_id)
            else:
                result = msg
        return result

    async def download(
        self, path: str, *, user: Optional[str] = None, request_timeout: Optional[float] = None
    ) -> httpx.Response:
        """``GET /files``: a streaming response whose status was checked. Close it."""
        seconds = self._config.timeout(request_timeout)
        params = {"path": path}
        u = self._user(user)
        if u:
            params["username"] = u
        url = f"{self.base_url}/files"
        request = self._client.build_request(
            "GET", url, params=params, headers=self.headers(user), timeout=_timeout(seconds)
        )
        response = await send(self._client, request, config=self._config, idempotent=True, stream=True, what="download")
        if response.status_code != 200:
            body = await _read_error(response)
            raise http_error(response.status_code, body, context="files", sandbox_id=self.sandbox_id, url=url)
        return response

    async def upload(
        self,
        files: Sequence[Tuple[str, FileData]],
        *,
        user: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> List[Dict[str, Any]]:
        """``POST /files`` (multipart): each part is named ``file`` with the target path as filename."""
        seconds = self._config.timeout(request_timeout)
        params: Dict[str, str] = {}
        u = self._user(user)
        if u:
            params["username"] = u
        if len(files) == 1:
            params["path"] = files[0][0]
        parts = []
        for path, data in files:
            if isinstance(data, str):
                data = data.encode()
            elif isinstance(data, (bytearray, memoryview)):
                data = bytes(data)
            elif isinstance(data, io.TextIOBase):
                data = data.read().encode()
            parts.append(("file", (path, data, "application/octet-stream")))
        url = f"{self.base_url}/files"
        request = self._client.build_request(
            "POST", url, params=params, files=parts, headers=self.headers(user), timeout=_timeout(seconds)
        )
        response = await send(self._client, request, config=self._config, what="upload")
        body = await _read_error(response) if response.status_code != 200 else await response.aread()
        if response.status_code != 200:
            raise http_error(response.status_code, body, context="files", sandbox_id=self.sandbox_id, url=url)
        try:
            value = response.json() if body else []
        except ValueError:
            value = []
        return value if isinstance(value, list) else [value]

    async def health(self, request_timeout: Optional[float] = None) -> bool:
        """Whether the agent answers ``GET /health``."""
        seconds = self._config.timeout(request_timeout)
        url = f"{self.base_url}/health"
        request = self._client.build_request("GET", url, headers=self.headers(), timeout=_timeout(seconds))
        try:
            response = await send(self._client, request, config=self._config.with_(retries=0), what="health check")
        except SandboxError:
            return False
        await response.aclose()
        return response.status_code in (200, 204)
