"""The asynchronous core: :class:`AsyncSandbox` and its ``commands``, ``files`` and ``pty``.

Everything else in the SDK is built on these classes: the synchronous :class:`Sandbox`
runs them on a private event loop thread, and TrEnv-X's ``sandbox_sdk.Sandbox`` wraps them
with its own method names.
"""

from __future__ import annotations

import asyncio
import codecs
import datetime
import inspect
import logging
import os
import time
from typing import (
    IO,
    Any,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Dict,
    Iterable,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Union,
    overload,
)

import httpx

from .._code_interpreter import AsyncCodeRunner
from .._config import (
    DEFAULT_COMMAND_TIMEOUT,
    DEFAULT_SANDBOX_TIMEOUT,
    ENV_DOMAIN,
    ConnectionConfig,
)
from .._dual import dual_method
from .._http import ApiClient, EnvdClient, ServerStream, make_client
from .._lifecycle import SandboxLifecycle
from ..exceptions import (
    AlreadyExistsError,
    CommandExitError,
    InvalidArgumentError,
    NotFoundError,
    PathNotFoundError,
    SandboxError,
    StreamError,
    TimeoutError,
)
from ..models import (
    CommandResult,
    EntryInfo,
    FilesystemEvent,
    ProcessEvent,
    ProcessInfo,
    PtySize,
    SandboxConnectionInfo,
    SandboxInfo,
    SandboxMetrics,
    SandboxNetworkOpts,
    SandboxNetworkUpdate,
    SnapshotInfo,
    TemplateInfo,
    WriteEntry,
    WriteInfo,
)
from ._snapshots import AsyncSnapshotPaginator

log = logging.getLogger("sandbox_sdk")


SnapshotMode = Literal["full", "filesystem"]
"""What a pause keeps: ``full`` (memory and filesystem: processes resume) or ``filesystem`` (a resume boots)."""
OnResume = Literal["restore", "reboot"]
"""How a paused sandbox comes back: ``restore`` its memory, or ``reboot`` from its disk."""


def pause_memory(mode: Optional[str], keep_memory: Optional[bool]) -> bool:
    """Whether a pause keeps the memory: ``mode`` (or E2B's deprecated ``keep_memory``)."""
    if mode is not None and keep_memory is not None:
        raise InvalidArgumentError("pass either mode or the deprecated keep_memory, not both")
    if mode is None:
        return keep_memory is not False
    if mode not in ("full", "filesystem"):
        raise InvalidArgumentError(f"mode must be 'full' or 'filesystem', not {mode!r}")
    return mode == "full"


def resume_memory(on_resume: Optional[str]) -> bool:
    if on_resume is None or on_resume == "restore":
        return True
    if on_resume == "reboot":
        return False
    raise InvalidArgumentError(f"on_resume must be 'restore' or 'reboot', not {on_resume!r}")


def _unix(t: Optional[datetime.datetime]) -> Optional[int]:
    """Unix seconds of ``t`` (a naive datetime is local time, as ``datetime.timestamp`` reads it)."""
    return int(t.timestamp()) if t is not None else None

OutputHandler = Callable[[Any], Union[Any, Awaitable[Any]]]
#: Internal event listener: ``listener(kind, value)`` with kind in stdout/stderr/pty/end.
Listener = Callable[[str, Any], None]

_SHELL = "/bin/bash"


async def _invoke(handler: Optional[Callable[..., Any]], *args: Any) -> None:
    if handler is None:
        return
    result = handler(*args)
    if inspect.isawaitable(result):
        await result


def _process_selector(pid: Union[int, str]) -> Dict[str, Any]:
    if isinstance(pid, str) and not pid.isdigit():
        return {"tag": pid}
    return {"pid": int(pid)}


def _b64(data: Union[str, bytes]) -> str:
    import base64

    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(bytes(data)).decode()


# --------------------------------------------------------------------------- commands


class AsyncCommandHandle:
    """A running command (or PTY). Output is received in the background as it arrives.

    Example::

        handle = await sandbox.commands.run("sleep 1; echo done", background=True)
        result = await handle.wait()
        print(result.stdout)
    """

    def __init__(
        self,
        pid: int,
        stream: ServerStream,
        *,
        kill: Callable[[], Awaitable[bool]],
        send_stdin: Optional[Callable[[Union[str, bytes]], Awaitable[None]]] = None,
        close_stdin: Optional[Callable[[], Awaitable[None]]] = None,
        on_stdout: Optional[OutputHandler] = None,
        on_stderr: Optional[OutputHandler] = None,
        on_pty: Optional[OutputHandler] = None,
        listener: Optional[Listener] = None,
        timeout: Optional[float] = None,
        cmd: Optional[str] = None,
        started: Optional[float] = None,
    ) -> None:
        self._pid = pid
        #: ``time.monotonic()`` before the start request: the agent's own deadline (the same
        #: ``timeout``, sent as Connect-Timeout-Ms) began after it.
        self._started = started
        self._stream = stream
        self._kill = kill
        self._send_stdin = send_stdin
        self._close_stdin = close_stdin
        self._on_stdout = on_stdout
        self._on_stderr = on_stderr
        self._on_pty = on_pty
        self._listener = listener
        self._timeout = timeout
        self._cmd = cmd
        self._stdout_parts: List[str] = []
        self._stderr_parts: List[str] = []
        self._out_dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._err_dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._result: Optional[CommandResult] = None
        self._error: Optional[BaseException] = None
        self._disconnected = False
        self._task = asyncio.ensure_future(self._pump())

    # -- state

    @property
    def pid(self) -> int:
        """The command's process id inside the sandbox."""
        return self._pid

    @property
    def stdout(self) -> str:
        """All stdout received so far."""
        return "".join(self._stdout_parts)

    @property
    def stderr(self) -> str:
        """All stderr received so far."""
        return "".join(self._stderr_parts)

    @property
    def exit_code(self) -> Optional[int]:
        """The exit code once the command ended, else None."""
        return self._result.exit_code if self._result else None

    @property
    def error(self) -> Optional[str]:
        """The agent's description of an abnormal end (e.g. ``"signal: killed"``), if any."""
        return self._result.error if self._result else None

    @property
    def finished(self) -> bool:
        return self._task.done()

    # -- pump

    def _emit(self, kind: str, value: Any) -> None:
        if self._listener is not None:
            self._listener(kind, value)

    async def _data(self, kind: str, raw: bytes, final: bool = False) -> None:
        if kind == "pty":
            self._emit("pty", raw)
            await _invoke(self._on_pty, raw)
            return
        dec = self._out_dec if kind == "stdout" else self._err_dec
        text = dec.decode(raw, final=final)
        if not text:
            return
        (self._stdout_parts if kind == "stdout" else self._stderr_parts).append(text)
        self._emit(kind, text)
        await _invoke(self._on_stdout if kind == "stdout" else self._on_stderr, text)

    async def _consume(self) -> None:
        async for message in self._stream:
            event = ProcessEvent.from_json(message)
            if event.stdout is not None:
                await self._data("stdout", event.stdout)
            elif event.stderr is not None:
                await self._data("stderr", event.stderr)
            elif event.pty is not None:
                await self._data("pty", event.pty)
            elif event.end is not None:
                await self._data("stdout", b"", final=True)
                await self._data("stderr", b"", final=True)
                self._result = CommandResult(
                    stdout=self.stdout, stderr=self.stderr, exit_code=event.end.exit_code, error=event.end.error
                )
                if self._killed_by_agent_deadline(event.end.exited):
                    self._error = self._timeout_error()

    def _killed_by_agent_deadline(self, exited: bool) -> bool:
        """Did the agent kill the command at its deadline? It enforces the same ``timeout`` and
        started counting first, so its kill (an end by signal) can arrive before our own timer."""
        if not self._timeout or self._started is None or exited:
            return False
        return time.monotonic() - self._started >= self._timeout

    def _timeout_error(self) -> TimeoutError:
        what = f"command {self._cmd!r}" if self._cmd else f"process {self._pid}"
        return TimeoutError(
            f"{what} did not finish within {self._timeout:g}s and was killed; pass a larger "
            "timeout (timeout=0 means no limit)"
        )

    async def _pump(self) -> None:
        try:
            if self._timeout:
                try:
                    await asyncio.wait_for(self._consume(), self._timeout)
                except asyncio.TimeoutError:
                    self._error = self._timeout_error()
                    try:
                        await self._kill()
                    except Exception:  # best effort
                        pass
            else:
                await self._consume()
        except asyncio.CancelledError:
            if not self._disconnected:
                raise
        except BaseException as e:  # noqa: BLE001 - surfaced by wait()
            if not self._disconnected:
                self._error = e
        finally:
            await self._stream.aclose()
            self._emit("end", None)

    # -- API

    async def wait(self) -> CommandResult:
        """Wait for the command to end and return its result.

        Raises :class:`CommandExitError` when the exit code is not 0, :class:`TimeoutError`
        when the command's timeout passed.
        """
        try:
            await asyncio.shield(self._task)
        except asyncio.CancelledError:
            if not self._disconnected:
                raise
        if self._error is not None:
            raise self._error
        if self._result is None:
            if self._disconnected:
                raise SandboxError(f"disconnected from process {self._pid}; reconnect with commands.connect(pid)")
            raise StreamError(f"process {self._pid}'s output stream ended without its end event")
        if self._result.exit_code != 0:
            raise CommandExitError(
                exit_code=self._result.exit_code,
                stdout=self._result.stdout,
                stderr=self._result.stderr,
                error=self._result.error,
                cmd=self._cmd,
            )
        return self._result

    async def kill(self) -> bool:
        """Kill the command (SIGKILL). Returns False if it had already ended."""
        return await self._kill()

    async def send_stdin(self, data: Union[str, bytes]) -> None:
        """Write to the command's stdin (it must have been started with ``stdin=True``)."""
        if self._send_stdin is None:
            raise SandboxError("this handle cannot send input")
        await self._send_stdin(data)

    async def close_stdin(self) -> None:
        """Close the command's stdin (the command reads EOF)."""
        if self._close_stdin is None:
            raise SandboxError("this handle cannot close stdin")
        await self._close_stdin()

    async def disconnect(self) -> None:
        """Stop receiving output; the command keeps running (see ``commands.connect``)."""
        self._disconnected = True
        await self._stream.aclose()
        self._task.cancel()
        try:
            await self._task
        except BaseException:
            pass


class AsyncCommands:
    """Run and manage processes in the sandbox (``sandbox.commands``)."""

    def __init__(self, envd: EnvdClient) -> None:
        self._envd = envd

    async def list(self, request_timeout: Optional[float] = None) -> List[ProcessInfo]:
        """The processes started through the agent that are still running.

        Example::

            for p in await sandbox.commands.list():
                print(p.pid, p.cmd, p.args)
        """
        res = await self._envd.unary(
            "process.Process/List", {}, request_timeout=request_timeout, context="process", idempotent=True
        )
        return [ProcessInfo.from_json(p) for p in res.get("processes") or []]

    async def kill(self, pid: Union[int, str], request_timeout: Optional[float] = None) -> bool:
        """Kill a process (SIGKILL) by pid (or tag). Returns False if there was no such process.

        Example::

            await sandbox.commands.kill(handle.pid)
        """
        try:
            await self._envd.unary(
                "process.Process/SendSignal",
                {"process": _process_selector(pid), "signal": "SIGNAL_SIGKILL"},
                request_timeout=request_timeout,
                context="process",
            )
            return True
        except NotFoundError:
            return False

    async def send_signal(
        self, pid: Union[int, str], signal: str = "SIGNAL_SIGTERM", request_timeout: Optional[float] = None
    ) -> None:
        """Send ``SIGNAL_SIGTERM`` or ``SIGNAL_SIGKILL`` to a process."""
        await self._envd.unary(
            "process.Process/SendSignal",
            {"process": _process_selector(pid), "signal": signal},
            request_timeout=request_timeout,
            context="process",
        )

    async def send_stdin(
        self, pid: Union[int, str], data: Union[str, bytes], request_timeout: Optional[float] = None
    ) -> None:
        """Write ``data`` to the stdin of process ``pid``.

        Example::

            h = await sandbox.commands.run("cat", background=True, stdin=True)
            await sandbox.commands.send_stdin(h.pid, "hello\\n")
        """
        await self._envd.unary(
            "process.Process/SendInput",
            {"process": _process_selector(pid), "input": {"stdin": _b64(data)}},
            request_timeout=request_timeout,
            context="process",
        )

    async def close_stdin(self, pid: Union[int, str], request_timeout: Optional[float] = None) -> None:
        """Close the stdin of process ``pid`` (it reads EOF)."""
        await self._envd.unary(
            "process.Process/CloseStdin",
            {"process": _process_selector(pid)},
            request_timeout=request_timeout,
            context="process",
        )

    async def stream_stdin(
        self,
        pid: Union[int, str],
        chunks: Union[AsyncIterable[Union[str, bytes]], Iterable[Union[str, bytes]]],
        *,
        pty: bool = False,
        request_timeout: Optional[float] = None,
    ) -> None:
        """Send many pieces of input in order over one client-streaming request.

        Example::

            await sandbox.commands.stream_stdin(h.pid, [b"a\\n", b"b\\n"])
        """

        async def messages() -> AsyncIterator[Dict[str, Any]]:
            yield {"start": {"process": _process_selector(pid)}}
            key = "pty" if pty else "stdin"
            if isinstance(chunks, AsyncIterable):
                async for c in chunks:
                    yield {"data": {"input": {key: _b64(c)}}}
            else:
                for c in chunks:
                    yield {"data": {"input": {key: _b64(c)}}}

        await self._envd.client_stream(
            "process.Process/StreamInput", messages(), request_timeout=request_timeout, context="process"
        )

    async def _start(
        self,
        *,
        cmd: str,
        args: Sequence[str],
        envs: Optional[Mapping[str, str]],
        cwd: Optional[str],
        user: Optional[str],
        stdin: bool,
        pty: Optional[PtySize],
        tag: Optional[str],
        timeout: Optional[float],
        request_timeout: Optional[float],
        on_stdout: Optional[OutputHandler] = None,
        on_stderr: Optional[OutputHandler] = None,
        on_pty: Optional[OutputHandler] = None,
        listener: Optional[Listener] = None,
        display: Optional[str] = None,
    ) -> AsyncCommandHandle:
        process: Dict[str, Any] = {"cmd": cmd, "args": list(args)}
        if envs:
            process["envs"] = {str(k): str(v) for k, v in envs.items()}
        if cwd:
            process["cwd"] = cwd
        request: Dict[str, Any] = {"process": process}
        if pty is not None:
            request["pty"] = {"size": {"cols": int(pty.cols), "rows": int(pty.rows)}}
        if tag:
            request["tag"] = tag
        if stdin:
            request["stdin"] = True
        timeout = timeout or None
        started = time.monotonic()
        stream = await self._envd.server_stream(
            "process.Process/Start",
            request,
            user=user,
            timeout=timeout,
            request_timeout=request_timeout,
            context="process",
        )
        return await self._handle(
            stream,
            request_timeout=request_timeout,
            timeout=timeout,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            on_pty=on_pty,
            listener=listener,
            cmd=display,
            pty=pty is not None,
            started=started,
        )

    async def _handle(
        self,
        stream: ServerStream,
        *,
        request_timeout: Optional[float],
        timeout: Optional[float],
        on_stdout: Optional[OutputHandler],
        on_stderr: Optional[OutputHandler],
        on_pty: Optional[OutputHandler],
        listener: Optional[Listener],
        cmd: Optional[str],
        pty: bool = False,
        started: Optional[float] = None,
    ) -> AsyncCommandHandle:
        seconds = self._envd._config.timeout(request_timeout)
        try:
            while True:
                first = await asyncio.wait_for(stream.__anext__(), seconds)
                event = ProcessEvent.from_json(first)
                if event.pid is not None:
                    break
                if not event.keepalive:
                    raise StreamError(f"expected the process start event first, got {first!r}")
        except StopAsyncIteration:
            await stream.aclose()
            raise StreamError("the process stream ended before the process started") from None
        except asyncio.TimeoutError:
            await stream.aclose()
            raise TimeoutError(f"the process did not start within {seconds}s; pass a larger request_timeout") from None
        except BaseException:
            await stream.aclose()
            raise
        pid = event.pid

        async def kill() -> bool:
            return await self.kill(pid)

        async def send(data: Union[str, bytes]) -> None:
            if pty:
                await self._send_pty(pid, data)
            else:
                await self.send_stdin(pid, data)

        async def close() -> None:
            await self.close_stdin(pid)

        return AsyncCommandHandle(
            pid,
            stream,
            kill=kill,
            send_stdin=send,
            close_stdin=close,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            on_pty=on_pty,
            listener=listener,
            timeout=timeout,
            cmd=cmd,
            started=started,
        )

    async def _send_pty(
        self, pid: Union[int, str], data: Union[str, bytes], request_timeout: Optional[float] = None
    ) -> None:
        await self._envd.unary(
            "process.Process/SendInput",
            {"process": _process_selector(pid), "input": {"pty": _b64(data)}},
            request_timeout=request_timeout,
            context="process",
        )

    @overload
    async def run(
        self,
        cmd: str,
        background: Literal[False] = False,
        envs: Optional[Mapping[str, str]] = None,
        user: Optional[str] = None,
        cwd: Optional[str] = None,
        on_stdout: Optional[OutputHandler] = None,
        on_stderr: Optional[OutputHandler] = None,
        stdin: bool = False,
        timeout: Optional[float] = DEFAULT_COMMAND_TIMEOUT,
        request_timeout: Optional[float] = None,
        tag: Optional[str] = None,
    ) -> CommandResult: ...

    @overload
    async def run(
        self,
        cmd: str,
        background: Literal[True],
        envs: Optional[Mapping[str, str]] = None,
        user: Optional[str] = None,
        cwd: Optional[str] = None,
        on_stdout: Optional[OutputHandler] = None,
        on_stderr: Optional[OutputHandler] = None,
        stdin: bool = False,
        timeout: Optional[float] = DEFAULT_COMMAND_TIMEOUT,
        request_timeout: Optional[float] = None,
        tag: Optional[str] = None,
    ) -> AsyncCommandHandle: ...

    async def run(
        self,
        cmd: str,
        background: bool = False,
        envs: Optional[Mapping[str, str]] = None,
        user: Optional[str] = None,
        cwd: Optional[str] = None,
        on_stdout: Optional[OutputHandler] = None,
        on_stderr: Optional[OutputHandler] = None,
        stdin: bool = False,
        timeout: Optional[float] = DEFAULT_COMMAND_TIMEOUT,
        request_timeout: Optional[float] = None,
        tag: Optional[str] = None,
    ) -> Union[CommandResult, AsyncCommandHandle]:
        """Run ``cmd`` with ``/bin/bash -l -c`` and wait for it (or return a handle).

        ``on_stdout``/``on_stderr`` (plain or async functions) receive output as it arrives.
        ``timeout`` limits the whole command (seconds, 0 = no limit): when it passes the
        command is killed and :class:`TimeoutError` raised. A non-zero exit raises
        :class:`CommandExitError`. With ``background=True`` a handle is returned at once.

        Example::

            r = await sandbox.commands.run("echo hi; echo oops >&2", on_stdout=print)
            assert r.stdout == "hi\\n" and r.stderr == "oops\\n"
        """
        handle = await self._start(
            cmd=_SHELL,
            args=["-l", "-c", cmd],
            envs=envs,
            cwd=cwd,
            user=user,
            stdin=stdin,
            pty=None,
            tag=tag,
            timeout=timeout,
            request_timeout=request_timeout,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            display=cmd,
        )
        if background:
            return handle
        return await handle.wait()

    async def connect(
        self,
        pid: Union[int, str],
        timeout: Optional[float] = DEFAULT_COMMAND_TIMEOUT,
        request_timeout: Optional[float] = None,
        on_stdout: Optional[OutputHandler] = None,
        on_stderr: Optional[OutputHandler] = None,
    ) -> AsyncCommandHandle:
        """Attach to a running process and receive its further output.

        Example::

            h = await sandbox.commands.connect(pid)
            result = await h.wait()
        """
        return await self._connect(
            pid, timeout=timeout, request_timeout=request_timeout, on_stdout=on_stdout, on_stderr=on_stderr
        )

    async def _connect(
        self,
        pid: Union[int, str],
        *,
        timeout: Optional[float],
        request_timeout: Optional[float],
        on_stdout: Optional[OutputHandler] = None,
        on_stderr: Optional[OutputHandler] = None,
        on_pty: Optional[OutputHandler] = None,
        listener: Optional[Listener] = None,
    ) -> AsyncCommandHandle:
        timeout = timeout or None
        stream = await self._envd.server_stream(
            "process.Process/Connect",
            {"process": _process_selector(pid)},
            timeout=timeout,
            request_timeout=request_timeout,
            context="process",
        )
        return await self._handle(
            stream,
            request_timeout=request_timeout,
            timeout=timeout,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            on_pty=on_pty,
            listener=listener,
            cmd=None,
        )


class AsyncPty:
    """Pseudo-terminals in the sandbox (``sandbox.pty``): an interactive login shell."""

    def __init__(self, commands: AsyncCommands, envd: EnvdClient) -> None:
        self._commands = commands
        self._envd = envd

    async def create(
        self,
        size: Optional[PtySize] = None,
        on_data: Optional[OutputHandler] = None,
        user: Optional[str] = None,
        cwd: Optional[str] = None,
        envs: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = DEFAULT_COMMAND_TIMEOUT,
        request_timeout: Optional[float] = None,
        _listener: Optional[Listener] = None,
    ) -> AsyncCommandHandle:
        """Start ``bash -i -l`` on a new terminal; ``on_data`` receives its output bytes.

        Example::

            term = await sandbox.pty.create(PtySize(24, 80), on_data=lambda b: print(b.decode()))
            await sandbox.pty.send_stdin(term.pid, b"echo hi\\nexit\\n")
            await term.wait()
        """
        env = {**(envs or {}), "TERM": "xterm-256color"}
        size = size or PtySize()
        return await self._commands._start(
            cmd=_SHELL,
            args=["-i", "-l"],
            envs=env,
            cwd=cwd,
            user=user,
            stdin=False,
            pty=size,
            tag=None,
            timeout=timeout,
            request_timeout=request_timeout,
            on_pty=on_data,
            listener=_listener,
            display="pty",
        )

    async def send_stdin(self, pid: int, data: Union[str, bytes], request_timeout: Optional[float] = None) -> None:
        """Type ``data`` into the terminal of ``pid``."""
        await self._commands._send_pty(pid, data, request_timeout)

    async def resize(self, pid: int, size: PtySize, request_timeout: Optional[float] = None) -> None:
        """Change the terminal's size (rows, cols)."""
        await self._envd.unary(
            "process.Process/Update",
            {"process": {"pid": int(pid)}, "pty": {"size": {"cols": int(size.cols), "rows": int(size.rows)}}},
            request_timeout=request_timeout,
            context="process",
        )

    async def kill(self, pid: int, request_timeout: Optional[float] = None) -> bool:
        """Kill the terminal's shell (SIGKILL). Returns False if it had already ended."""
        return await self._commands.kill(pid, request_timeout)


# --------------------------------------------------------------------------- files


class AsyncWatchHandle:
    """A running directory watch; ``await handle.stop()`` ends it."""

    def __init__(
        self,
        stream: ServerStream,
        on_event: Optional[OutputHandler],
        on_exit: Optional[Callable[[Optional[BaseException]], Any]],
        timeout: Optional[float],
    ) -> None:
        self._stream = stream
        self._on_event = on_event
        self._on_exit = on_exit
        self._timeout = timeout
        self._stopped = False
        self.error: Optional[BaseException] = None
        self._task = asyncio.ensure_future(self._pump())

    async def _consume(self) -> None:
        async for message in self._stream:
            fs = message.get("filesystem")
            if fs is not None:
                await _invoke(self._on_event, FilesystemEvent.from_json(fs))

    async def _pump(self) -> None:
        err: Optional[BaseException] = None
        try:
            if self._timeout:
                await asyncio.wait_for(self._consume(), self._timeout)
            else:
                await self._consume()
        except asyncio.TimeoutError:
            pass  # the watch's own time limit: a normal end
        except asyncio.CancelledError:
            if not self._stopped:
                raise
        except BaseException as e:  # noqa: BLE001
            if not self._stopped:
                err = e
        finally:
            await self._stream.aclose()
        self.error = err
        await _invoke(self._on_exit, err)

    async def stop(self) -> None:
        """Stop watching."""
        self._stopped = True
        await self._stream.aclose()
        self._task.cancel()
        try:
            await self._task
        except BaseException:
            pass


def _chunked(data: Union[str, bytes]) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


class AsyncFilesystem:
    """Files and directories in the sandbox (``sandbox.files``)."""

    def __init__(self, envd: EnvdClient) -> None:
        self._envd = envd

    @overload
    async def read(
        self,
        path: str,
        format: Literal["text"] = "text",
        user: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> str: ...

    @overload
    async def read(
        self, path: str, format: Literal["bytes"], user: Optional[str] = None, request_timeout: Optional[float] = None
    ) -> bytearray: ...

    @overload
    async def read(
        self, path: str, format: Literal["stream"], user: Optional[str] = None, request_timeout: Optional[float] = None
    ) -> AsyncIterator[bytes]: ...

    async def read(
        self,
        path: str,
        format: Literal["text", "bytes", "stream"] = "text",
        user: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> Union[str, bytearray, AsyncIterator[bytes]]:
        """Read a file as ``"text"`` (str), ``"bytes"`` (bytearray) or ``"stream"``.

        ``"stream"`` returns an async iterator of chunks as they arrive (nothing is held in
        memory); iterate it to the end or the connection stays open until it is collected.

        Example::

            text = await sandbox.files.read("/etc/hostname")
            async for chunk in await sandbox.files.read("/big.bin", format="stream"):
                sink.write(chunk)
        """
        if format not in ("text", "bytes", "stream"):
            raise InvalidArgumentError(f"format must be 'text', 'bytes' or 'stream', not {format!r}")
        response = await self._envd.download(path, user=user, request_timeout=request_timeout)
        if format == "stream":
            return _iter_response(response)
        try:
            data = await response.aread()
        except httpx.HTTPError as e:
            from .._errors import transport_error

            raise transport_error(e, url=str(response.request.url), what="download") from None
        finally:
            await response.aclose()
        if format == "bytes":
            return bytearray(data)
        return data.decode("utf-8", errors="replace")

    async def download_to(
        self,
        path: str,
        local_path: Union[str, "os.PathLike[str]"],
        user: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> int:
        """Stream a file of the sandbox to a local file; returns the number of bytes written.

        Example::

            n = await sandbox.files.download_to("/data/big.bin", "big.bin")
        """
        response = await self._envd.download(path, user=user, request_timeout=request_timeout)
        total = 0
        tmp = f"{os.fspath(local_path)}.part"
        try:
            with open(tmp, "wb") as out:
                async for chunk in response.aiter_bytes(1 << 20):
                    out.write(chunk)
                    total += len(chunk)
            os.replace(tmp, local_path)
        except httpx.HTTPError as e:
            from .._errors import transport_error

            raise transport_error(e, url=str(response.request.url), what="download") from None
        finally:
            await response.aclose()
            if os.path.exists(tmp):
                os.unlink(tmp)
        return total

    async def write(
        self,
        path: str,
        data: Union[str, bytes, IO[Any]],
        user: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> WriteInfo:
        """Write ``data`` (str, bytes or a binary file object, streamed) to ``path``.

        Missing parent directories are created; an existing file is overwritten.

        Example::

            await sandbox.files.write("/tmp/a.txt", "hello")
            with open("big.bin", "rb") as f:
                await sandbox.files.write("/tmp/big.bin", f)
        """
        infos = await self.write_files([{"path": path, "data": data}], user=user, request_timeout=request_timeout)
        if not infos:
            return WriteInfo(name=os.path.basename(path), type=None, path=path)
        return infos[0]

    async def write_files(
        self,
        files: Sequence[Union[WriteEntry, Mapping[str, Any]]],
        user: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> List[WriteInfo]:
        """Write several files in one request.

        Example::

            await sandbox.files.write_files([{"path": "/tmp/a", "data": "A"}, {"path": "/tmp/b", "data": b"B"}])
        """
        if not files:
            return []
        parts = []
        for f in files:
            path = f["path"] if isinstance(f, Mapping) else f.path
            data = f["data"] if isinstance(f, Mapping) else f.data
            parts.append((path, data))
        result = await self._envd.upload(parts, user=user, request_timeout=request_timeout)
        return [WriteInfo.from_json(item) for item in result if isinstance(item, dict)]

    async def list(
        self,
        path: str,
        depth: Optional[int] = 1,
        user: Optional[str] = None,
        request_timeout: Optional[float] = None,
    ) -> List[EntryInfo]:
        """The entries of a directory, ``depth`` levels deep (1: only its direct children).

        Example::

            for e in await sandbox.files.list("/home/user", depth=2):
                print(e.type, e.path, e.size)
        """
        if depth is not None and depth < 1:
            raise InvalidArgumentError("depth must be at least 1")
        msg: Dict[str, Any] = {"path": path}
        if depth is not None:
            msg["depth"] = int(depth)
        res = await self._envd.unary(
            "filesystem.Filesystem/ListDir",
            msg,
            user=user,
            request_timeout=request_timeout,
            context="files",
            idempotent=True,
        )
        return [EntryInfo.from_json(e) for e in res.get("entries") or []]

    async def exists(self, path: str, user: Optional[str] = None, request_timeout: Optional[float] = None) -> bool:
        """Whether a file or directory exists at ``path``.

        Example::

            if not await sandbox.files.exists("/tmp/x"):
                await sandbox.files.make_dir("/tmp/x")
        """
        try:
            await self.get_info(path, user=user, request_timeout=request_timeout)
            return True
        except PathNotFoundError:
            return False

    async def get_info(
        self, path: str, user: Optional[str] = None, request_timeout: Optional[float] = None
    ) -> EntryInfo:
        """Name, type, size, mode, owner, modification time of ``path``.

        Example::

            info = await sandbox.files.get_info("/etc/passwd")
            print(info.size, info.permissions)
        """
        res = await self._envd.unary(
            "filesystem.Filesystem/Stat",
            {"path": path},
            user=user,
            request_timeout=request_timeout,
            context="files",
            idempotent=True,
        )
        return EntryInfo.from_json(res.get("entry") or {})

    async def remove(self, path: str, user: Optional[str] = None, request_timeout: Optional[float] = None) -> None:
        """Remove a file or a directory (recursively).

        Example::

            await sandbox.files.remove("/tmp/x")
        """
        await self._envd.unary(
            "filesystem.Filesystem/Remove", {"path": path}, user=user, request_timeout=request_timeout, context="files"
        )

    async def rename(
        self, old_path: str, new_path: str, user: Optional[str] = None, request_timeout: Optional[float] = None
    ) -> EntryInfo:
        """Move ``old_path`` to ``new_path``; returns the entry at its new place.

        Example::

            await sandbox.files.rename("/tmp/a", "/tmp/b")
        """
        res = await self._envd.unary(
            "filesystem.Filesystem/Move",
            {"source": old_path, "destination": new_path},
            user=user,
            request_timeout=request_timeout,
            context="files",
        )
        return EntryInfo.from_json(res.get("entry") or {})

    async def make_dir(self, path: str, user: Optional[str] = None, request_timeout: Optional[float] = None) -> bool:
        """Create a directory and its parents. Returns False if it already existed.

        Example::

            created = await sandbox.files.make_dir("/tmp/a/b/c")
        """
        try:
            await self._envd.unary(
                "filesystem.Filesystem/MakeDir",
                {"path": path},
                user=user,
                request_timeout=request_timeout,
                context="files",
            )
            return True
        except AlreadyExistsError:
            return False

    async def watch_dir(
        self,
        path: str,
        on_event: Optional[OutputHandler] = None,
        on_exit: Optional[Callable[[Optional[BaseException]], Any]] = None,
        user: Optional[str] = None,
        request_timeout: Optional[float] = None,
        timeout: Optional[float] = DEFAULT_COMMAND_TIMEOUT,
        recursive: bool = False,
    ) -> AsyncWatchHandle:
        """Watch a directory; ``on_event(FilesystemEvent)`` is called for each change.

        Returns once the watch is active. ``timeout`` bounds the watch (seconds, 0 = none).

        Example::

            w = await sandbox.files.watch_dir("/tmp", on_event=print)
            await sandbox.files.write("/tmp/new", "x")
            await w.stop()
        """
        stream = await self._envd.server_stream(
            "filesystem.Filesystem/WatchDir",
            {"path": path, "recursive": bool(recursive)},
            user=user,
            timeout=timeout or None,
            request_timeout=request_timeout,
            context="files",
        )
        seconds = self._envd._config.timeout(request_timeout)
        try:
            while True:
                first = await asyncio.wait_for(stream.__anext__(), seconds)
                if "start" in first:
                    break
                if "filesystem" in first:  # no start event: deliver it
                    await _invoke(on_event, FilesystemEvent.from_json(first["filesystem"]))
                    break
        except StopAsyncIteration:
            await stream.aclose()
            raise StreamError(f"the watch on {path} ended before it started") from None
        except asyncio.TimeoutError:
            await stream.aclose()
            raise TimeoutError(f"the watch on {path} did not start within {seconds}s") from None
        except BaseException:
            await stream.aclose()
            raise
        return AsyncWatchHandle(stream, on_event, on_exit, timeout or None)


async def _iter_response(response: httpx.Response) -> AsyncIterator[bytes]:
    from .._errors import transport_error

    try:
        async for chunk in response.aiter_bytes():
            yield chunk
    except httpx.HTTPError as e:
        raise transport_error(e, url=str(response.request.url), what="download") from None
    finally:
        await response.aclose()


# --------------------------------------------------------------------------- sandbox


class AsyncSandbox(AsyncCodeRunner):
    """An E2B-style sandbox, asynchronous.

    Example::

        async with await AsyncSandbox.create() as sandbox:
            r = await sandbox.commands.run("echo hello")
            print(r.stdout)

    Sandboxes of the ``code-interpreter`` template also run code in a Jupyter-like interpreter:
    ``await sandbox.run_code("1 + 1")`` and the code contexts (see :class:`AsyncCodeRunner`).

    Connection keywords accepted by ``create``/``connect``/``list``/``kill``: ``api_key``
    (else ``TRENVX_API_KEY``/``E2B_API_KEY``), ``api_url``, ``target_addr`` and ``port``
    (else ``SANDBOX_BACKEND_ADDR``, 127.0.0.1, port 5000), ``request_timeout`` (seconds per
    request, default 30), ``headers``, ``transport`` (an httpx transport).
    """

    #: The user commands and file operations run as unless ``user=`` is given. None: the
    #: template's default user (``user`` in the shipped templates), as E2B's SDK leaves it to envd.
    default_user: Optional[str] = None

    def __init__(
        self,
        info: SandboxConnectionInfo,
        config: ConnectionConfig,
        client: Optional[httpx.AsyncClient] = None,
        *,
        user: Optional[str] = None,
    ) -> None:
        self._info = info
        self._config = config
        self._client = client or make_client(config)
        self._api = ApiClient(self._client, config)
        self._envd = EnvdClient(
            self._client,
            config,
            info.sandbox_id,
            access_token=info.envd_access_token,
            default_user=user if user is not None else self.default_user,
        )
        self.commands = AsyncCommands(self._envd)
        self.files = AsyncFilesystem(self._envd)
        self.pty = AsyncPty(self.commands, self._envd)
        self._closed = False

    # -- identity

    @property
    def sandbox_id(self) -> str:
        """The sandbox's id."""
        return self._info.sandbox_id

    @property
    def template_id(self) -> str:
        return self._info.template_id

    @property
    def sandbox_domain(self) -> str:
        return self._info.domain or os.environ.get(ENV_DOMAIN) or "localhost"

    @property
    def envd_version(self) -> Optional[str]:
        return self._info.envd_version

    @property
    def envd_access_token(self) -> Optional[str]:
        return self._info.envd_access_token

    @property
    def traffic_access_token(self) -> Optional[str]:
        """Set when the sandbox was created with ``network={"allow_public_traffic": False}``: requests
        to its ports (``get_host(port)``) must carry it in the ``e2b-traffic-access-token`` header."""
        return self._info.traffic_access_token

    @property
    def envd_api_url(self) -> str:
        """Where requests to the agent go (the backend, which proxies them, or the direct URL)."""
        return self._envd.base_url

    @property
    def connection_config(self) -> ConnectionConfig:
        return self._config

    def get_host(self, port: int) -> str:
        """The host name under which ``port`` of the sandbox is exposed: ``{port}-{id}.{domain}``.

        Example::

            url = f"http://{sandbox.get_host(8000)}"
        """
        return f"{int(port)}-{self.sandbox_id}.{self.sandbox_domain}"

    # -- construction

    @classmethod
    async def create(
        cls,
        template: Optional[str] = None,
        timeout: Optional[int] = DEFAULT_SANDBOX_TIMEOUT,
        metadata: Optional[Mapping[str, str]] = None,
        envs: Optional[Mapping[str, str]] = None,
        secure: Optional[bool] = None,
        allow_internet_access: Optional[bool] = None,
        *,
        network: Optional[SandboxNetworkOpts] = None,
        lifecycle: Optional[SandboxLifecycle] = None,
        user: Optional[str] = None,
        **connection: Any,
    ) -> "AsyncSandbox":
        """Start a new sandbox from ``template`` (the backend's default when None).

        ``timeout`` is the sandbox's lifetime in seconds (extend it with ``set_timeout``);
        ``metadata`` is stored with it (filter ``list`` on it); ``envs`` are set for every
        command. ``allow_internet_access=False``: no egress at all (the same as
        ``network={"deny_out": [ALL_TRAFFIC]}``); ``network``: E2B's egress rules and public
        access (see :class:`~sandbox_sdk.models.SandboxNetworkOpts`). ``lifecycle``: what its
        timeout does, E2B's shape (``{"on_timeout": "pause", "auto_resume": True}``: paused to disk
        instead of killed, and resumed by a request to it through the backend; see
        :class:`~sandbox_sdk._lifecycle.SandboxLifecycle`). ``secure`` is accepted for
        E2B compatibility: trenvx sandboxes always require their access token.

        Example::

            sandbox = await AsyncSandbox.create("default-sandbox", timeout=600, metadata={"run": "42"})
            offline = await AsyncSandbox.create(allow_internet_access=False)
            pypi_only = await AsyncSandbox.create(network={"allow_out": ["pypi.org", "*.pythonhosted.org"],
                                                           "deny_out": [ALL_TRAFFIC]})
            sleeper = await AsyncSandbox.create(lifecycle={"on_timeout": "pause", "auto_resume": True})
        """
        config = ConnectionConfig.resolve(**connection)
        client = make_client(config)
        try:
            info = await ApiClient(client, config).create_sandbox(
                template, timeout, metadata, envs, request_timeout=connection.get("request_timeout"),
                allow_internet_access=allow_internet_access, network=network, lifecycle=lifecycle,
            )
        except BaseException:
            await client.aclose()
            raise
        return cls(info, config, client, user=user)

    @dual_method
    async def connect(
        cls, sandbox_id: str, timeout: Optional[int] = None, *, on_resume: OnResume = "restore",
        user: Optional[str] = None, **connection: Any,
    ) -> "AsyncSandbox":
        """Connect to a sandbox by id, resuming it if it is paused (raises :class:`SandboxNotFoundError`).

        ``timeout``: it lives at least that many more seconds (never shortened); ``on_resume="reboot"``:
        a paused sandbox boots from its disk instead of resuming its memory (its processes are gone).
        On an instance: ``await sandbox.connect()`` resumes it.

        Example::

            await sandbox.pause()
            same = await AsyncSandbox.connect(sandbox.sandbox_id)
        """
        memory = resume_memory(on_resume)
        config = ConnectionConfig.resolve(**connection)
        client = make_client(config)
        try:
            info, _ = await ApiClient(client, config).connect_sandbox(
                sandbox_id, timeout, memory=memory, request_timeout=connection.get("request_timeout"))
        except BaseException:
            await client.aclose()
            raise
        info.sandbox_id = info.sandbox_id or sandbox_id
        return cls(info, config, client, user=user)

    @connect.instance
    async def _connect(self, timeout: Optional[int] = None, *, on_resume: OnResume = "restore",
                       request_timeout: Optional[float] = None) -> "AsyncSandbox":
        """Resume this sandbox if it is paused and make it live at least ``timeout`` more seconds.

        Example::

            await sandbox.pause()
            await sandbox.connect()
            print((await sandbox.commands.run("cat /home/user/notes.txt")).stdout)
        """
        self._require_backend("connect")
        await self._api.connect_sandbox(self.sandbox_id, timeout, memory=resume_memory(on_resume),
                                        request_timeout=request_timeout)
        return self  # same id, same tokens

    @dual_method
    async def pause(cls, sandbox_id: str, keep_memory: Optional[bool] = None, *, mode: Optional[SnapshotMode] = None,
                    strict: bool = False, **connection: Any) -> bool:
        """Pause a sandbox to disk: ``await AsyncSandbox.pause(id)`` or ``await sandbox.pause()``.

        Its state is stored and its VM ends (its memory goes back to the host; its timeout stops).
        ``mode="filesystem"`` keeps only its files (synced first): a resume boots it, its processes
        are gone. ``strict=True``: refuse (:class:`InsufficientCapacityError`, 503) when its agent
        does not answer, instead of pausing it anyway. True once paused, False if it was already.
        Resume it with :meth:`connect`.
        """
        memory = pause_memory(mode, keep_memory)
        config = ConnectionConfig.resolve(**connection)
        async with make_client(config) as client:
            return await ApiClient(client, config).pause_sandbox(
                sandbox_id, memory=memory, strict=strict, request_timeout=connection.get("request_timeout"))

    @pause.instance
    async def _pause(self, keep_memory: Optional[bool] = None, *, mode: Optional[SnapshotMode] = None,
                     strict: bool = False, request_timeout: Optional[float] = None) -> bool:
        """Pause this sandbox to disk (see the class-level form); resume it with :meth:`connect`.

        Example::

            await sandbox.files.write("/home/user/notes.txt", "kept")
            await sandbox.pause()
            await sandbox.connect()
        """
        self._require_backend("pause")
        return await self._api.pause_sandbox(self.sandbox_id, memory=pause_memory(mode, keep_memory), strict=strict,
                                             request_timeout=request_timeout)

    @dual_method
    async def fork(cls, sandbox_id: str, timeout: Optional[int] = None, count: Optional[int] = None,
                   **connection: Any) -> List[Union["AsyncSandbox", SandboxError]]:
        """Fork a running sandbox: ``await AsyncSandbox.fork(id, count=2)`` or ``await sandbox.fork(count=2)``.

        The sandbox is snapshotted once (it stops for a moment and runs on with its id and timeout)
        and ``count`` (1-100, default 1) new sandboxes start from the snapshot, each with the
        source's files, memory and processes, and its own id, tokens, hostname, machine id and
        entropy. One entry per child: a sandbox, or the error that kept it from starting.
        ``timeout``: the children's lifetime in seconds.

        Example::

            left, right = await sandbox.fork(count=2)
            await left.commands.run("echo only-left > /tmp/side")
        """
        config = ConnectionConfig.resolve(**connection)
        async with make_client(config) as client:
            results = await ApiClient(client, config).fork_sandbox(
                sandbox_id, timeout, count, request_timeout=connection.get("request_timeout"))
        return [r if isinstance(r, SandboxError) else cls(r, config, make_client(config)) for r in results]

    @fork.instance
    async def _fork(self, timeout: Optional[int] = None, count: Optional[int] = None,
                    request_timeout: Optional[float] = None) -> List[Union["AsyncSandbox", SandboxError]]:
        """Fork this sandbox (see the class-level form)."""
        self._require_backend("fork")
        results = await self._api.fork_sandbox(self.sandbox_id, timeout, count, request_timeout=request_timeout)
        return [r if isinstance(r, SandboxError) else type(self)(r, self._config, make_client(self._config))
                for r in results]

    @dual_method
    async def create_snapshot(cls, sandbox_id: str, name: Optional[str] = None, *, mode: Optional[SnapshotMode] = None,
                              **connection: Any) -> SnapshotInfo:
        """Snapshot a running sandbox (it runs on): ``await sandbox.create_snapshot()`` or
        ``await AsyncSandbox.create_snapshot(id)``. New sandboxes start from it with
        ``AsyncSandbox.create(info.snapshot_id)``; it outlives its source until
        :meth:`delete_snapshot`. ``name``: publish it under that name (a new build of it if it
        exists). ``mode="filesystem"`` is refused by trenvx (snapshots keep the memory).

        Example::

            info = await sandbox.create_snapshot()
            copy = await AsyncSandbox.create(info.snapshot_id)
        """
        config = ConnectionConfig.resolve(**connection)
        async with make_client(config) as client:
            return await ApiClient(client, config).create_snapshot(
                sandbox_id, name, memory=pause_memory(mode, None), request_timeout=connection.get("request_timeout"))

    @create_snapshot.instance
    async def _create_snapshot(self, name: Optional[str] = None, *, mode: Optional[SnapshotMode] = None,
                               request_timeout: Optional[float] = None) -> SnapshotInfo:
        self._require_backend("create_snapshot")
        return await self._api.create_snapshot(self.sandbox_id, name, memory=pause_memory(mode, None),
                                               request_timeout=request_timeout)

    @dual_method
    def list_snapshots(cls, sandbox_id: Optional[str] = None, limit: Optional[int] = None,
                       next_token: Optional[str] = None, name: Optional[str] = None,
                       **connection: Any) -> AsyncSnapshotPaginator:
        """The backend's snapshots (of ``sandbox_id``, named ``name``), newest first, as a paginator.
        On an instance: its own snapshots.

        Example::

            paginator = AsyncSandbox.list_snapshots()
            while paginator.has_next:
                for snap in await paginator.next_items():
                    print(snap.snapshot_id)
        """
        return AsyncSnapshotPaginator(sandbox_id, limit, next_token, name, **connection)

    @list_snapshots.instance
    def _list_snapshots(self, limit: Optional[int] = None, next_token: Optional[str] = None,
                        name: Optional[str] = None, **connection: Any) -> AsyncSnapshotPaginator:
        self._require_backend("list_snapshots")
        if connection:
            return AsyncSnapshotPaginator(self.sandbox_id, limit, next_token, name, **connection)
        return AsyncSnapshotPaginator(self.sandbox_id, limit, next_token, name, config=self._config)

    @classmethod
    async def delete_snapshot(cls, snapshot_id: str, **connection: Any) -> bool:
        """Delete a snapshot: no sandbox starts from it any more (those started from it run on).
        True once deleted, False if there was no such snapshot.

        Example::

            await AsyncSandbox.delete_snapshot(info.snapshot_id)
        """
        config = ConnectionConfig.resolve(**connection)
        async with make_client(config) as client:
            return await ApiClient(client, config).delete_snapshot(snapshot_id, connection.get("request_timeout"))

    @classmethod
    async def connect_direct(
        cls,
        envd_url: str,
        *,
        sandbox_id: str = "direct",
        access_token: Optional[str] = None,
        user: Optional[str] = None,
        **connection: Any,
    ) -> "AsyncSandbox":
        """Debug mode: talk to a guest agent at ``envd_url`` directly, without a backend.

        Sandbox-level operations (``kill``, ``set_timeout``, ``get_info``) are not available.

        Example::

            sbx = await AsyncSandbox.connect_direct("http://127.0.0.1:49983")
        """
        config = ConnectionConfig.resolve(envd_url=envd_url, **connection)
        info = SandboxConnectionInfo(sandbox_id=sandbox_id, envd_access_token=access_token)
        return cls(info, config, user=user)

    # -- sandbox-level operations (class level with an id, or on the instance)

    @dual_method
    async def kill(cls, sandbox_id: str, **connection: Any) -> bool:
        """Kill a sandbox: ``await AsyncSandbox.kill(id)`` or ``await sandbox.kill()``.

        Returns False if the sandbox did not exist (already killed or timed out).
        """
        config = ConnectionConfig.resolve(**connection)
        async with make_client(config) as client:
            return await ApiClient(client, config).kill_sandbox(sandbox_id, connection.get("request_timeout"))

    @kill.instance
    async def _kill(self, request_timeout: Optional[float] = None) -> bool:
        if self._config.envd_url:
            await self.close()
            return False
        try:
            return await self._api.kill_sandbox(self.sandbox_id, request_timeout)
        finally:
            await self.close()

    @dual_method
    async def set_timeout(cls, sandbox_id: str, timeout: int, **connection: Any) -> None:
        """Set the sandbox to end ``timeout`` seconds from now.

        Example::

            await sandbox.set_timeout(600)
        """
        config = ConnectionConfig.resolve(**connection)
        async with make_client(config) as client:
            await ApiClient(client, config).set_timeout(sandbox_id, timeout, connection.get("request_timeout"))

    @set_timeout.instance
    async def _set_timeout(self, timeout: int, request_timeout: Optional[float] = None) -> None:
        self._require_backend("set_timeout")
        await self._api.set_timeout(self.sandbox_id, timeout, request_timeout)

    @dual_method
    async def update_network(cls, sandbox_id: str, network: SandboxNetworkUpdate, **connection: Any) -> None:
        """Replace the sandbox's egress rules: ``await sandbox.update_network({...})`` or
        ``await AsyncSandbox.update_network(sandbox_id, {...})``. What ``network`` leaves out is
        cleared (``{}`` opens everything again); ``allow_internet_access=False`` blocks all egress
        but what ``allow_out`` names.

        Example::

            await sandbox.update_network({"allow_out": ["api.example.com"], "deny_out": [ALL_TRAFFIC]})
        """
        config = ConnectionConfig.resolve(**connection)
        async with make_client(config) as client:
            await ApiClient(client, config).update_network(sandbox_id, network, connection.get("request_timeout"))

    @update_network.instance
    async def _update_network(self, network: SandboxNetworkUpdate, request_timeout: Optional[float] = None) -> None:
        self._require_backend("update_network")
        await self._api.update_network(self.sandbox_id, network, request_timeout)

    @dual_method
    async def get_info(cls, sandbox_id: str, **connection: Any) -> SandboxInfo:
        """The backend's description of the sandbox (template, metadata, start/end time, state).

        Example::

            info = await sandbox.get_info()
            print(info.end_at)
        """
        config = ConnectionConfig.resolve(**connection)
        async with make_client(config) as client:
            detail = await ApiClient(client, config).get_sandbox(sandbox_id, connection.get("request_timeout"))
        return SandboxInfo.from_json(detail)

    @get_info.instance
    async def _get_info(self, request_timeout: Optional[float] = None) -> SandboxInfo:
        self._require_backend("get_info")
        return SandboxInfo.from_json(await self._api.get_sandbox(self.sandbox_id, request_timeout))

    @dual_method
    async def get_metrics(
        cls, sandbox_id: str, start: Optional[datetime.datetime] = None, end: Optional[datetime.datetime] = None,
        **connection: Any,
    ) -> List[SandboxMetrics]:
        """CPU, memory and disk samples of the sandbox (one every 5 s, the last 30 minutes kept), oldest
        first, optionally only those within [start, end].

        Example::

            for m in await sandbox.get_metrics():
                print(m.timestamp, m.cpu_used_pct, m.mem_used)
        """
        config = ConnectionConfig.resolve(**connection)
        async with make_client(config) as client:
            return await ApiClient(client, config).get_metrics(
                sandbox_id, _unix(start), _unix(end), connection.get("request_timeout"))

    @get_metrics.instance
    async def _get_metrics(self, start: Optional[datetime.datetime] = None, end: Optional[datetime.datetime] = None,
                           request_timeout: Optional[float] = None) -> List[SandboxMetrics]:
        self._require_backend("get_metrics")
        return await self._api.get_metrics(self.sandbox_id, _unix(start), _unix(end), request_timeout)

    @staticmethod
    async def list(
        metadata: Optional[Mapping[str, str]] = None,
        state: Optional[Sequence[str]] = None,
        **connection: Any,
    ) -> List[SandboxInfo]:
        """The backend's sandboxes, optionally only those whose metadata match / in a state.

        Example::

            for s in await AsyncSandbox.list(metadata={"run": "42"}):
                print(s.sandbox_id, s.template_id)
        """
        config = ConnectionConfig.resolve(**connection)
        async with make_client(config) as client:
            return await ApiClient(client, config).list_sandboxes(metadata, state, connection.get("request_timeout"))

    @staticmethod
    async def list_templates(**connection: Any) -> List[TemplateInfo]:
        """The templates built on the backend.

        Example::

            names = [t.template_id for t in await AsyncSandbox.list_templates()]
        """
        config = ConnectionConfig.resolve(**connection)
        async with make_client(config) as client:
            return await ApiClient(client, config).list_templates(connection.get("request_timeout"))

    async def is_running(self, request_timeout: Optional[float] = None) -> bool:
        """Whether the sandbox's agent answers.

        Example::

            assert await sandbox.is_running()
        """
        return await self._envd.health(request_timeout)

    def _require_backend(self, what: str) -> None:
        if self._config.envd_url:
            raise SandboxError(f"{what} needs the backend; this sandbox object talks to an agent directly")

    async def close(self) -> None:
        """Release this object's connections (the sandbox keeps running)."""
        if not self._closed:
            self._closed = True
            await self._client.aclose()

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self.kill()
        finally:
            await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.sandbox_id} template={self.template_id!r}>"
