"""TrEnv-X's process API: ``sandbox.process.start(...)`` returns a :class:`Process`.

Output is delivered line by line as :class:`ProcessMessage` objects (``line``, ``error``,
``timestamp``), to the ``on_stdout``/``on_stderr`` callbacks as the lines arrive and into
the process's :class:`ProcessOutput`.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Union

from ..e2b._async import AsyncCommandHandle, AsyncCommands
from ..exceptions import (
    CommandExitError,
    CurrentWorkingDirectoryDoesntExistException,
    InvalidArgumentError,
    TimeoutError,
)

if TYPE_CHECKING:
    from .main import Sandbox

EnvVars = Dict[str, str]


@dataclass
class ProcessMessage:
    """One line of a process's output. ``error`` is True for stderr; ``timestamp`` in ns."""

    line: str
    error: bool = False
    timestamp: int = field(default_factory=time.time_ns)

    def __str__(self) -> str:
        return self.line


class ProcessOutput:
    """Everything a process printed, in order, and how it ended.

    ``stdout``/``stderr`` are the lines joined with ``\\n`` (no trailing newline);
    ``error`` is True once anything was written to stderr; ``exit_code`` is None until the
    process ended.
    """

    delimiter = "\n"

    def __init__(self) -> None:
        self._messages: List[ProcessMessage] = []
        self.error: bool = False
        self.exit_code: Optional[int] = None

    @property
    def messages(self) -> List[ProcessMessage]:
        return self._messages

    @property
    def stdout(self) -> str:
        return self.delimiter.join(m.line for m in self._messages if not m.error)

    @property
    def stderr(self) -> str:
        return self.delimiter.join(m.line for m in self._messages if m.error)

    def _add_stdout(self, message: ProcessMessage) -> None:
        self._messages.append(message)

    def _add_stderr(self, message: ProcessMessage) -> None:
        self.error = True
        self._messages.append(message)

    def __repr__(self) -> str:
        return f"ProcessOutput(exit_code={self.exit_code}, stdout={self.stdout!r}, stderr={self.stderr!r})"


class _LineSplitter:
    """Turns chunks of text into complete lines; the rest is kept until more arrives."""

    def __init__(self) -> None:
        self._buf = ""

    def feed(self, text: str) -> List[str]:
        self._buf += text
        if "\n" not in self._buf:
            return []
        *lines, self._buf = self._buf.split("\n")
        return lines

    def flush(self) -> List[str]:
        if not self._buf:
            return []
        line, self._buf = self._buf, ""
        return [line]


def _is_missing_cwd(error: InvalidArgumentError) -> bool:
    """Whether the agent refused a process start because its cwd does not exist.

    The agent answers ``invalid_argument`` with "cwd '...' does not exist or is not a
    directory" (src/trenvx/guest/agent/process.py).
    """
    text = (error.message or "").lower()
    return "cwd" in text and ("does not exist" in text or "not a directory" in text)


async def _call(handler: Optional[Callable[..., Any]], *args: Any) -> None:
    if handler is None:
        return
    result = handler(*args)
    if inspect.isawaitable(result):
        await result


def _exit_arity(handler: Callable[..., Any]) -> int:
    try:
        params = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):
        return 1
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    return 1 if positional else 0


class Process:
    """A process started in the sandbox.

    Example::

        p = await sandbox.process.start("python3 -c 'print(1)'")
        out = await p.wait()
        print(p.stdout, p.exit_code)
    """

    def __init__(
        self,
        process_id: str,
        output: ProcessOutput,
        on_exit: Optional[Callable[..., Any]],
        commands: AsyncCommands,
    ) -> None:
        self._process_id = process_id
        self._output = output
        self._on_exit = on_exit
        self._commands = commands
        self._handle: Optional[AsyncCommandHandle] = None
        self._finished: "asyncio.Future[ProcessOutput]" = asyncio.get_running_loop().create_future()
        self._watcher: Optional["asyncio.Task[None]"] = None

    def _attach(self, handle: AsyncCommandHandle) -> None:
        self._handle = handle
        self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        assert self._handle is not None
        try:
            try:
                result = await self._handle.wait()
                code = result.exit_code
            except CommandExitError as e:
                code = e.exit_code
            self._output.exit_code = code
            if self._on_exit is not None:
                if _exit_arity(self._on_exit):
                    await _call(self._on_exit, code)
                else:
                    await _call(self._on_exit)
            if not self._finished.done():
                self._finished.set_result(self._output)
        except BaseException as e:  # noqa: BLE001 - delivered through wait()
            if not self._finished.done():
                self._finished.set_exception(e)
                self._finished.exception()  # mark retrieved: wait() re-raises it

    @property
    def process_id(self) -> str:
        """The id given at start (``process_id=``) or the pid as a string."""
        return self._process_id

    @property
    def pid(self) -> Optional[int]:
        return self._handle.pid if self._handle else None

    @property
    def output(self) -> ProcessOutput:
        return self._output

    @property
    def output_messages(self) -> List[ProcessMessage]:
        return self._output.messages

    @property
    def stdout(self) -> str:
        """The stdout lines so far, joined with newlines."""
        return self._output.stdout

    @property
    def stderr(self) -> str:
        """The stderr lines so far, joined with newlines."""
        return self._output.stderr

    @property
    def error(self) -> bool:
        """True once the process wrote to stderr."""
        return self._output.error

    @property
    def exit_code(self) -> Optional[int]:
        """The exit code, None while the process runs."""
        return self._output.exit_code

    @property
    def finished(self) -> "asyncio.Future[ProcessOutput]":
        """A future resolved with the output when the process ends."""
        return self._finished

    async def wait(self, timeout: Optional[float] = None) -> ProcessOutput:
        """Wait for the process to end (at most ``timeout`` seconds) and return its output.

        A non-zero exit code is not an error here: check ``output.exit_code``. Raises
        :class:`TimeoutError` if ``timeout`` passes (the process keeps running).

        Example::

            out = await p.wait(timeout=30)
            if out.exit_code != 0:
                print(out.stderr)
        """
        try:
            return await asyncio.wait_for(asyncio.shield(self._finished), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"process {self._process_id} did not end within {timeout}s; it is still running "
                "(kill it with process.kill())"
            ) from None

    async def send_stdin(self, data: Union[str, bytes], timeout: Optional[float] = None) -> None:
        """Write ``data`` to the process's stdin.

        Example::

            p = await sandbox.process.start("cat")
            await p.send_stdin("hello\\n")
        """
        await self._commands.send_stdin(self._selector, data, request_timeout=timeout)

    async def close_stdin(self, timeout: Optional[float] = None) -> None:
        """Close the process's stdin (it reads EOF)."""
        await self._commands.close_stdin(self._selector, request_timeout=timeout)

    async def kill(self, timeout: Optional[float] = None) -> None:
        """Kill the process (SIGKILL).

        Example::

            await p.kill()
        """
        await self._commands.kill(self._selector, request_timeout=timeout)

    @property
    def _selector(self) -> Union[int, str]:
        if self._handle is not None:
            return self._handle.pid
        return self._process_id

    def __repr__(self) -> str:
        return f"<Process {self._process_id} exit_code={self.exit_code}>"


class ProcessManager:
    """Starts processes in the sandbox (``sandbox.process``)."""

    def __init__(self, sandbox: "Sandbox", commands: AsyncCommands) -> None:
        self._sandbox = sandbox
        self._commands = commands

    async def start(
        self,
        cmd: str,
        on_stdout: Optional[Callable[[ProcessMessage], Any]] = None,
        on_stderr: Optional[Callable[[ProcessMessage], Any]] = None,
        on_exit: Optional[Union[Callable[[int], Any], Callable[[], Any]]] = None,
        env_vars: Optional[EnvVars] = None,
        cwd: str = "",
        process_id: Optional[str] = None,
        timeout: Optional[float] = None,
        *,
        user: Optional[str] = None,
        stdin: bool = True,
    ) -> Process:
        """Start ``cmd`` (run by ``/bin/bash -l -c``) and return at once.

        ``on_stdout``/``on_stderr`` get a :class:`ProcessMessage` per line as it arrives
        (plain or async functions); ``on_exit`` gets the exit code (or no argument).
        ``env_vars`` and ``cwd`` extend/override the sandbox's defaults; ``process_id`` tags
        the process; ``timeout`` bounds starting it (the process itself has no time limit).

        Example::

            p = await sandbox.process.start("echo hi; echo err >&2", on_stdout=print)
            await p.wait()
            assert p.stdout == "hi" and p.stderr == "err"
        """
        sbx = self._sandbox
        on_stdout = on_stdout or sbx._on_stdout
        on_stderr = on_stderr or sbx._on_stderr
        on_exit = on_exit or sbx._on_exit
        envs = {**(sbx._env_vars or {}), **(env_vars or {})}
        output = ProcessOutput()
        out_lines, err_lines = _LineSplitter(), _LineSplitter()

        async def stdout_cb(text: str) -> None:
            for line in out_lines.feed(text):
                msg = ProcessMessage(line, error=False)
                output._add_stdout(msg)
                await _call(on_stdout, msg)

        async def stderr_cb(text: str) -> None:
            for line in err_lines.feed(text):
                msg = ProcessMessage(line, error=True)
                output._add_stderr(msg)
                await _call(on_stderr, msg)

        def listener(kind: str, value: Any) -> None:
            if kind == "end":  # the stream ended: deliver what is left of a last line
                for line in out_lines.flush():
                    output._add_stdout(ProcessMessage(line, error=False))
                    pending.append((on_stdout, output.messages[-1]))
                for line in err_lines.flush():
                    output._add_stderr(ProcessMessage(line, error=True))
                    pending.append((on_stderr, output.messages[-1]))

        pending: List[Any] = []

        async def exit_cb(*args: Any) -> None:
            for handler, msg in pending:
                await _call(handler, msg)
            pending.clear()
            if on_exit is not None:
                if _exit_arity(on_exit):
                    await _call(on_exit, *args)
                else:
                    await _call(on_exit)

        process = Process(process_id or "", output, exit_cb, self._commands)
        workdir = cwd or sbx._cwd
        try:
            handle = await self._commands._start(
                cmd="/bin/bash",
                args=["-l", "-c", cmd],
                envs=envs,
                cwd=workdir,
                user=user,
                stdin=stdin,
                pty=None,
                tag=process_id,
                timeout=None,
                request_timeout=timeout,
                on_stdout=stdout_cb,
                on_stderr=stderr_cb,
                listener=listener,
                display=cmd,
            )
        except InvalidArgumentError as e:
            if workdir and _is_missing_cwd(e):
                raise CurrentWorkingDirectoryDoesntExistException(
                    f"the working directory {workdir!r} does not exist in the sandbox (or is not a "
                    f"directory); create it first with sandbox.filesystem.make_dir(): {e.message}",
                    status_code=e.status_code,
                    code=e.code,
                ) from e
            raise
        if not process_id:
            process._process_id = str(handle.pid)
        process._attach(handle)
        return process

    async def start_and_wait(
        self,
        cmd: str,
        on_stdout: Optional[Callable[[ProcessMessage], Any]] = None,
        on_stderr: Optional[Callable[[ProcessMessage], Any]] = None,
        on_exit: Optional[Union[Callable[[int], Any], Callable[[], Any]]] = None,
        env_vars: Optional[EnvVars] = None,
        cwd: str = "",
        process_id: Optional[str] = None,
        timeout: Optional[float] = None,
        *,
        user: Optional[str] = None,
    ) -> ProcessOutput:
        """Start ``cmd`` and wait for it; ``timeout`` bounds the whole run.

        Example::

            out = await sandbox.process.start_and_wait("ls /")
            print(out.stdout)
        """
        process = await self.start(
            cmd,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            on_exit=on_exit,
            env_vars=env_vars,
            cwd=cwd,
            process_id=process_id,
            timeout=timeout,
            user=user,
            stdin=False,
        )
        try:
            return await process.wait(timeout)
        except TimeoutError:
            await process.kill()
            raise
