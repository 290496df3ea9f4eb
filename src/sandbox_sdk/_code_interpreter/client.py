"""The code interpreter's HTTP API, reached through the backend's proxy, and the ``run_code`` family
of methods every E2B-style :class:`~sandbox_sdk.e2b.AsyncSandbox` has.

Sandboxes made from the ``code-interpreter`` template (aliases ``code-interpreter-v1``,
``default-code-interpreter``) run a server on port :data:`INTERPRETER_PORT` speaking E2B's
code-interpreter protocol. Requests go to the backend with the headers ``E2b-Sandbox-Id`` and
``E2b-Sandbox-Port: 49999`` (and the sandbox's access token, and its traffic token when its ports
are private), which the backend's proxy forwards into the sandbox:

* ``POST /execute`` ``{code, context_id, language, env_vars}``: the cell's output as NDJSON
  (:mod:`.models`), streamed as it runs;
* ``POST /contexts`` ``{cwd, language}``, ``GET /contexts``, ``DELETE /contexts/{id}``,
  ``POST /contexts/{id}/restart``.

An execution's ``timeout`` bounds the whole request; when it passes (or a callback raises, or the
caller is cancelled) the connection is closed, and the server interrupts the cell when its client
goes away. Failures become the SDK's typed errors: a sandbox whose template has no interpreter is
a :class:`~sandbox_sdk.exceptions.CodeInterpreterNotAvailableError` naming the template to use.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Union

import httpx

from .._config import ConnectionConfig
from .._errors import _body_message, http_error
from .._http import _read_error, send
from ..exceptions import (
    AuthenticationError,
    CodeInterpreterNotAvailableError,
    InvalidArgumentError,
    NotFoundError,
    SandboxError,
    SandboxNotFoundError,
    StreamError,
    TimeoutError,
)
from ..models import SandboxConnectionInfo
from .models import Context, Execution, ExecutionError, OutputMessage, Result, RunCodeLanguage, apply_line

log = logging.getLogger("sandbox_sdk")

#: The port the code interpreter listens on inside the sandbox (E2B's).
INTERPRETER_PORT = 49999
#: The template whose sandboxes have a code interpreter.
CODE_INTERPRETER_TEMPLATE = "code-interpreter"
#: Seconds one execution may run when ``timeout`` is not given (E2B's default); 0 means no limit.
DEFAULT_EXECUTION_TIMEOUT = 300.0

#: A callback: called with each piece of output as it arrives; may be a coroutine function.
OutputHandler = Callable[[Any], Union[Any, Awaitable[Any]]]


@dataclass
class Handlers:
    """The callbacks of one execution (any of them None)."""

    on_stdout: Optional[OutputHandler] = None
    on_stderr: Optional[OutputHandler] = None
    on_result: Optional[OutputHandler] = None
    on_error: Optional[OutputHandler] = None

    def for_kind(self, kind: Optional[str]) -> Optional[OutputHandler]:
        if kind is None:
            return None
        handler: Optional[OutputHandler] = getattr(self, f"on_{kind}")
        return handler


async def _call(handler: Optional[OutputHandler], value: Any) -> None:
    if handler is None:
        return
    outcome = handler(value)
    if inspect.isawaitable(outcome):
        await outcome


def context_id_of(context: Union[Context, str, None], what: str = "context") -> Optional[str]:
    """The id of ``context`` (a :class:`Context` or an id)."""
    if context is None or isinstance(context, str):
        if isinstance(context, str) and not context.strip():
            raise InvalidArgumentError(f"{what} is an empty string; pass a Context or a context id")
        return context
    if isinstance(context, Context):
        return context.id
    raise InvalidArgumentError(f"{what} must be a Context (from create_code_context) or its id, not {context!r}")


def execution_timeout(timeout: Optional[float]) -> Optional[float]:
    """Seconds an execution may run: ``timeout``, the default when None, no limit (None) when 0."""
    if timeout is None:
        return DEFAULT_EXECUTION_TIMEOUT
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
        raise InvalidArgumentError(f"timeout must be a number of seconds (0: no limit), not {timeout!r}")
    return None if timeout == 0 else float(timeout)


class InterpreterClient:
    """The code interpreter of one sandbox, through the backend's proxy."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        config: ConnectionConfig,
        info: SandboxConnectionInfo,
        *,
        is_running: Optional[Callable[[], Awaitable[bool]]] = None,
    ) -> None:
        self._client = client
        self._config = config
        self._info = info
        self._is_running = is_running

    @property
    def sandbox_id(self) -> str:
        return self._info.sandbox_id

    @property
    def base_url(self) -> str:
        return self._config.api_url

    def headers(self) -> Dict[str, str]:
        """The proxy's routing headers and the sandbox's tokens."""
        headers = {"E2b-Sandbox-Id": self.sandbox_id, "E2b-Sandbox-Port": str(INTERPRETER_PORT)}
        if self._info.envd_access_token:
            headers["X-Access-Token"] = self._info.envd_access_token
        if self._info.traffic_access_token:
            headers["E2B-Traffic-Access-Token"] = self._info.traffic_access_token
        return headers

    def _require_proxy(self, what: str) -> None:
        if self._config.envd_url:
            raise SandboxError(
                f"{what} needs the backend's proxy to reach the sandbox's code interpreter (port {INTERPRETER_PORT}); "
                "this sandbox object talks to an agent directly (connect_direct). Connect through the backend "
                "with Sandbox.connect(sandbox_id)"
            )

    def error(self, status: int, body: bytes, *, context_id: Optional[str] = None,
              language: Optional[str] = None) -> SandboxError:
        """The typed error for an error answer of the proxy or the code interpreter."""
        return interpreter_error(status, body, sandbox_id=self.sandbox_id, template_id=self._info.template_id,
                                 context_id=context_id, language=language)

    # -- executions

    async def execute(
        self,
        code: str,
        *,
        language: Optional[str] = None,
        context_id: Optional[str] = None,
        envs: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
        request_timeout: Optional[float] = None,
        handlers: Optional[Handlers] = None,
    ) -> Execution:
        """Run ``code``; each line of output is folded into the execution and handed to its callback
        as it arrives. ``timeout`` (seconds, 0: none) bounds the whole execution; ``request_timeout``
        bounds connecting."""
        self._require_proxy("run_code")
        if not isinstance(code, str):
            raise InvalidArgumentError(f"code must be a string, not {type(code).__name__}")
        if envs is not None and not isinstance(envs, Mapping):
            raise InvalidArgumentError(f"envs must be a dict of strings, not {envs!r}")
        limit = execution_timeout(timeout)
        connect = self._config.timeout(request_timeout)
        handlers = handlers or Handlers()
        body = {"code": code, "context_id": context_id, "language": language,
                "env_vars": {str(k): str(v) for k, v in envs.items()} if envs else None}
        url = f"{self.base_url}/execute"
        # Only connecting has its own limit: the answer (headers, then lines) may take as long as
        # the cell runs, which `limit` bounds as a whole.
        request = self._client.build_request(
            "POST", url, json=body, headers=self.headers(),
            timeout=httpx.Timeout(None, connect=min(connect or 10.0, 10.0), pool=connect))
        execution = Execution()
        response: Optional[httpx.Response] = None
        try:
            async with asyncio.timeout(limit):
                response = await send(self._client, request, config=self._config, stream=True, what="run_code")
                if response.status_code != 200:
                    raise self.error(response.status_code, await _read_error(response),
                                     context_id=context_id, language=language)
                try:
                    async for line in response.aiter_lines():
                        kind, value = apply_line(execution, line)
                        if kind is not None:
                            await _call(handlers.for_kind(kind), value)
                except httpx.HTTPError as e:
                    raise await self._cut(e, "run_code") from None
        except TimeoutError:
            raise
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"the code ran past its timeout of {limit:g} s in sandbox {self.sandbox_id} and was stopped "
                "(its context is still there, with what the code did until then); pass a larger timeout= "
                "(seconds, 0: no limit)"
            ) from None
        finally:
            if response is not None:
                await response.aclose()
        return execution

    async def _cut(self, e: Exception, what: str) -> SandboxError:
        """The error for a stream that broke off: the sandbox is gone, or the connection broke."""
        alive: Optional[bool] = None
        if self._is_running is not None:
            try:
                alive = await self._is_running()
            except Exception:  # noqa: BLE001 - unknown: report the broken stream
                alive = None
        if alive is False:
            return SandboxNotFoundError(
                f"sandbox {self.sandbox_id} stopped while the code ran (it was killed, its timeout passed or its "
                f"VM died): {type(e).__name__}. Extend a sandbox's life with set_timeout(), or create a new one"
            )
        return StreamError(
            f"the connection to the code interpreter of sandbox {self.sandbox_id} broke during {what} "
            f"({type(e).__name__}: {e}); the interpreter may have crashed (its context restarts with "
            "restart_code_context)"
        )

    # -- contexts

    async def _call(
        self, method: str, path: str, *, json: Any = None, request_timeout: Optional[float] = None,
        context_id: Optional[str] = None, language: Optional[str] = None, what: str,
    ) -> httpx.Response:
        self._require_proxy(what)
        seconds = self._config.timeout(request_timeout)
        url = f"{self.base_url}{path}"
        request = self._client.build_request(
            method, url, json=json, headers=self.headers(),
            timeout=httpx.Timeout(seconds, connect=min(seconds or 10.0, 10.0)))
        response = await send(self._client, request, config=self._config,
                              idempotent=method in ("GET", "DELETE"), what=what)
        body = await _read_error(response) if response.status_code >= 300 else await response.aread()
        if response.status_code >= 300:
            raise self.error(response.status_code, body, context_id=context_id, language=language)
        return response

    async def create_context(self, cwd: Optional[str] = None, language: Optional[str] = None,
                             request_timeout: Optional[float] = None) -> Context:
        body: Dict[str, Any] = {}
        if language:
            body["language"] = language
        if cwd:
            body["cwd"] = cwd
        r = await self._call("POST", "/contexts", json=body, request_timeout=request_timeout, language=language,
                             what="create_code_context")
        return Context.from_json(_json_of(r, "create_code_context"))

    async def list_contexts(self, request_timeout: Optional[float] = None) -> List[Context]:
        r = await self._call("GET", "/contexts", request_timeout=request_timeout, what="list_code_contexts")
        value = _json_of(r, "list_code_contexts")
        if not isinstance(value, list):
            raise StreamError(f"the code interpreter listed its contexts as {str(value)[:200]!r}, not a list")
        return [Context.from_json(item) for item in value]

    async def remove_context(self, context_id: str, request_timeout: Optional[float] = None) -> None:
        await self._call("DELETE", f"/contexts/{_quote(context_id)}", request_timeout=request_timeout,
                         context_id=context_id, what="remove_code_context")

    async def restart_context(self, context_id: str, request_timeout: Optional[float] = None) -> None:
        await self._call("POST", f"/contexts/{_quote(context_id)}/restart", request_timeout=request_timeout,
                         context_id=context_id, what="restart_code_context")


def _quote(context_id: str) -> str:
    import urllib.parse

    return urllib.parse.quote(context_id, safe="")


def _json_of(response: httpx.Response, what: str) -> Any:
    try:
        return response.json()
    except ValueError:
        raise StreamError(f"{what}: the code interpreter answered with invalid JSON: {response.content[:200]!r}") from None


def interpreter_error(
    status: int,
    body: bytes,
    *,
    sandbox_id: str,
    template_id: str = "",
    context_id: Optional[str] = None,
    language: Optional[str] = None,
) -> SandboxError:
    """The typed error for an error answer to a code-interpreter request (from the backend's proxy or
    from the interpreter), saying what to do."""
    code, message = _body_message(body)
    detail = message or f"HTTP {status}"
    low = detail.lower()
    sbx = f"sandbox {sandbox_id}"
    if status == 502 and "not found" in low:
        return SandboxNotFoundError(
            f"{sbx} was not found ({detail}): it was killed or its timeout passed. Create a new one with "
            "Sandbox.create(), or list the running ones with Sandbox.list()", status_code=status, code=code)
    if status == 502 and "paused" in low:
        return SandboxError(
            f"{sbx} is paused ({detail}); resume it with sandbox.connect() (sandbox-cli: `sandbox resume ID`)",
            status_code=status, code=code)
    if status == 502 and "port is not open" in low:
        template = f" ({template_id!r})" if template_id else ""
        return CodeInterpreterNotAvailableError(
            f"this sandbox's template{template} has no code interpreter; create it from template "
            f"'{CODE_INTERPRETER_TEMPLATE}' (Sandbox.create('{CODE_INTERPRETER_TEMPLATE}')). Nothing answers on "
            f"port {INTERPRETER_PORT} of {sbx}: {detail}", status_code=status, code=code)
    if status == 502:
        return SandboxError(f"the backend could not reach the code interpreter of {sbx}: {detail}",
                            status_code=status, code=code)
    if status == 404 and context_id is not None:
        return NotFoundError(
            f"code context {context_id!r} was not found in {sbx} ({detail}): it was removed or never existed "
            "there; list_code_contexts() lists the contexts, create_code_context() makes one",
            status_code=status, code=code)
    if status == 400:
        what = f" (language {language!r})" if language else ""
        return InvalidArgumentError(f"the code interpreter of {sbx} refused the request{what}: {detail}",
                                    status_code=status, code=code)
    if status == 403 and "traffic access token" in low:
        return AuthenticationError(
            f"{detail}: {sbx}'s ports are private. Its traffic_access_token (from create) is sent automatically "
            "by the sandbox object that created or connected to it", status_code=status, code=code)
    if status in (401, 403):
        return AuthenticationError(
            f"the code interpreter of {sbx} rejected the request ({detail}): its access token is given by the "
            "backend when the sandbox is created; reconnect with Sandbox.connect(sandbox_id)",
            status_code=status, code=code)
    if status == 500:
        return SandboxError(f"the code interpreter of {sbx} failed: {detail}", status_code=status, code=code)
    return http_error(status, body, context="envd", sandbox_id=sandbox_id)


# --------------------------------------------------------------------------- the sandbox's methods


class AsyncCodeRunner:
    """``run_code`` and code contexts: the methods of E2B's ``e2b_code_interpreter.AsyncSandbox``,
    on every :class:`~sandbox_sdk.e2b.AsyncSandbox` (the class mixes this in).

    They need a sandbox whose template has a code interpreter (``code-interpreter``); on any other
    they raise :class:`~sandbox_sdk.exceptions.CodeInterpreterNotAvailableError` naming it.
    """

    # Provided by AsyncSandbox.
    _client: httpx.AsyncClient
    _config: ConnectionConfig
    _info: SandboxConnectionInfo
    is_running: Callable[..., Awaitable[bool]]
    _interpreter_client: Optional[InterpreterClient] = None

    @property
    def _interpreter(self) -> InterpreterClient:
        if self._interpreter_client is None:
            self._interpreter_client = InterpreterClient(self._client, self._config, self._info,
                                                         is_running=self.is_running)
        return self._interpreter_client

    async def run_code(
        self,
        code: str,
        language: Optional[RunCodeLanguage] = None,
        context: Union[Context, str, None] = None,
        on_stdout: Optional[Callable[[OutputMessage], Any]] = None,
        on_stderr: Optional[Callable[[OutputMessage], Any]] = None,
        on_result: Optional[Callable[[Result], Any]] = None,
        on_error: Optional[Callable[[ExecutionError], Any]] = None,
        envs: Optional[Dict[str, str]] = None,
        timeout: Optional[float] = None,
        request_timeout: Optional[float] = None,
    ) -> Execution:
        """Run ``code`` in the sandbox's code interpreter and return what it produced.

        Variables, imports and functions stay for the next call in the same context. ``language``
        picks that language's default context (Python when neither it nor ``context`` is given);
        ``context`` (from :meth:`create_code_context`) runs it there instead (not both).
        Callbacks (plain functions or coroutine functions) get each piece as it arrives:
        ``on_stdout``/``on_stderr`` an :class:`OutputMessage`, ``on_result`` a :class:`Result`,
        ``on_error`` the :class:`ExecutionError`; a callback that raises stops the execution.
        An exception in the code does not raise: it is ``execution.error``. ``envs``: environment
        variables for this execution. ``timeout``: seconds the execution may run (default 300,
        0: no limit); past it the code is interrupted and :class:`TimeoutError` raised.
        ``request_timeout``: seconds to connect.

        Example::

            execution = await sandbox.run_code("import math\\nmath.pi", on_stdout=print)
            print(execution.text)  # 3.141592653589793
        """
        if language is not None and context is not None:
            raise InvalidArgumentError("pass language or context, not both: a context has its own language")
        if language is not None and (not isinstance(language, str) or not language.strip()):
            raise InvalidArgumentError(f"language must be a language name such as 'python', not {language!r}")
        return await self._interpreter.execute(
            code, language=language, context_id=context_id_of(context), envs=envs, timeout=timeout,
            request_timeout=request_timeout,
            handlers=Handlers(on_stdout=on_stdout, on_stderr=on_stderr, on_result=on_result, on_error=on_error),
        )

    async def create_code_context(
        self,
        cwd: Optional[str] = None,
        language: Optional[RunCodeLanguage] = None,
        request_timeout: Optional[float] = None,
    ) -> Context:
        """A new context (its own kernel and variables) for ``language`` (default Python), working in
        ``cwd`` (default ``/home/user``). Run code in it with ``run_code(code, context=ctx)``.

        Example::

            ctx = await sandbox.create_code_context(cwd="/tmp")
            await sandbox.run_code("import os; os.getcwd()", context=ctx)
        """
        return await self._interpreter.create_context(cwd, language, request_timeout)

    async def list_code_contexts(self, request_timeout: Optional[float] = None) -> List[Context]:
        """The contexts of the sandbox's code interpreter (the default ones too).

        Example::

            for ctx in await sandbox.list_code_contexts():
                print(ctx.id, ctx.language, ctx.cwd)
        """
        return await self._interpreter.list_contexts(request_timeout)

    async def remove_code_context(self, context: Union[Context, str], request_timeout: Optional[float] = None) -> None:
        """Remove a context (a :class:`Context` or its id): its kernel ends, its variables are gone.

        Example::

            await sandbox.remove_code_context(ctx)
        """
        context_id = context_id_of(context)
        if context_id is None:
            raise InvalidArgumentError("pass the context to remove (a Context or its id)")
        await self._interpreter.remove_context(context_id, request_timeout)

    async def restart_code_context(self, context: Union[Context, str], request_timeout: Optional[float] = None) -> None:
        """Restart a context's kernel (a :class:`Context` or its id): its variables and imports are
        cleared, it keeps its id, language and working directory.

        Example::

            await sandbox.restart_code_context(ctx)
        """
        context_id = context_id_of(context)
        if context_id is None:
            raise InvalidArgumentError("pass the context to restart (a Context or its id)")
        await self._interpreter.restart_context(context_id, request_timeout)
