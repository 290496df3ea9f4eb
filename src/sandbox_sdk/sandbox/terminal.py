"""TrEnv-X's terminal API: ``sandbox.terminal.start(...)`` returns a :class:`Terminal`.

A terminal is a program on a pseudo-terminal in the sandbox: an interactive login shell, or
``cmd`` (the terminal then ends when ``cmd`` ends). What it prints arrives as text, to
``on_data`` as it arrives and into :class:`TerminalOutput`; ``send_data`` types into it,
``resize`` changes its size, ``kill`` ends it. It runs on the agent's pty processes (envd's
``Process.Start`` with a ``pty``), the same as E2B's ``sandbox.pty``.

Errors: a ``cwd`` that does not exist raises :class:`CurrentWorkingDirectoryDoesntExistException`;
an error answered by the sandbox about the terminal raises :class:`TerminalException`. Errors
about reaching the sandbox at all (:class:`TimeoutError`, :class:`BackendUnreachableError`,
:class:`AuthenticationError`, :class:`SandboxNotFoundError`) are raised as they are.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import inspect
import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Union

from ..constants import TIMEOUT
from ..e2b._async import AsyncCommandHandle, AsyncCommands, AsyncPty
from ..exceptions import (
    AuthenticationError,
    BackendUnreachableError,
    CommandExitError,
    CurrentWorkingDirectoryDoesntExistException,
    InvalidArgumentError,
    NotFoundError,
    SandboxError,
    SandboxNotFoundError,
    TerminalException,
    TimeoutError,
)
from ..models import PtySize
from .process import EnvVars, _is_missing_cwd

if TYPE_CHECKING:
    from .main import Sandbox

log = logging.getLogger("sandbox_sdk")

_SHELL = "/bin/bash"
#: A terminal's size is a pair of unsigned shorts (``struct winsize``).
_MAX_SIZE = 65535

#: Raised unchanged: errors about reaching the sandbox rather than about the terminal, and
#: the SDK's own specific errors.
_PASS_THROUGH = (
    TimeoutError,
    BackendUnreachableError,
    AuthenticationError,
    SandboxNotFoundError,
    TerminalException,
    CurrentWorkingDirectoryDoesntExistException,
)


@dataclass
class TerminalOutput:
    """Everything a terminal printed so far, in order, as text (``data``)."""

    data: str = ""

    def _add_data(self, data: str) -> None:
        self.data += data


class TerminalFinished(asyncio.Future):  # type: ignore[type-arg]
    """Resolved with the :class:`TerminalOutput` when the terminal ends.

    A future (``await term.finished``, ``term.finished.done()``) that also answers like the
    ``asyncio.Event`` of TrEnv-X's SDK: ``await term.finished.wait()``, ``term.finished.is_set()``.
    """

    def is_set(self) -> bool:
        return self.done()

    async def wait(self) -> bool:
        """Wait for the end (never raises, unlike ``await term.finished``)."""
        await asyncio.wait([self])
        return True


def _size(cols: int, rows: int) -> PtySize:
    for name, value in (("cols", cols), ("rows", rows)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_SIZE:
            raise InvalidArgumentError(
                f"terminal {name} must be a whole number from 1 to {_MAX_SIZE}, got {value!r}",
                code="invalid_argument",
            )
    return PtySize(rows=rows, cols=cols)


@contextlib.contextmanager
def _terminal_errors(what: str) -> Iterator[None]:
    """Raise an error the sandbox answered about the terminal as :class:`TerminalException`."""
    try:
        yield
    except _PASS_THROUGH:
        raise
    except NotFoundError as e:
        raise TerminalException(
            f"{what}: the terminal is not running any more ({e.message})", status_code=e.status_code, code=e.code
        ) from e
    except SandboxError as e:
        raise TerminalException(f"{what}: {e.message or type(e).__name__}", status_code=e.status_code, code=e.code) from e


async def _call(handler: Callable[..., Any], *args: Any) -> None:
    result = handler(*args)
    if inspect.isawaitable(result):
        await result


def _takes_argument(handler: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)


class Terminal:
    """A terminal session in the sandbox.

    Example::

        term = await sandbox.terminal.start(on_data=print, cols=80, rows=24)
        await term.send_data("echo hi\\n")
        await term.resize(cols=120, rows=40)
        await term.kill()
        print(term.data)
    """

    def __init__(
        self,
        terminal_id: str,
        on_data: Optional[Callable[[str], Any]],
        on_exit: Optional[Callable[..., Any]],
        commands: AsyncCommands,
        pty: AsyncPty,
    ) -> None:
        self._terminal_id = terminal_id
        self._on_data = on_data
        self._on_exit = on_exit
        self._commands = commands
        self._pty = pty
        self._output = TerminalOutput()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._handle: Optional[AsyncCommandHandle] = None
        self._exit_code: Optional[int] = None
        self._finished = TerminalFinished(loop=asyncio.get_running_loop())
        self._watcher: Optional["asyncio.Task[None]"] = None

    # -- receiving

    async def _receive(self, raw: bytes, final: bool = False) -> None:
        text = self._decoder.decode(raw, final=final)
        if not text:
            return
        self._output._add_data(text)
        if self._on_data is None:
            return
        try:
            await _call(self._on_data, text)
        except Exception:  # a failing callback must not stop the terminal's output
            log.exception("on_data of terminal %s raised", self._terminal_id)

    def _attach(self, handle: AsyncCommandHandle) -> None:
        self._handle = handle
        self._watcher = asyncio.ensure_future(self._watch(handle))

    async def _watch(self, handle: AsyncCommandHandle) -> None:
        error: Optional[TerminalException] = None
        try:
            result = await handle.wait()
            self._exit_code = result.exit_code
        except CommandExitError as e:
            self._exit_code = e.exit_code
        except Exception as e:  # noqa: BLE001 - delivered through wait()
            error = TerminalException(
                f"terminal {self._terminal_id}'s output stream broke off before the terminal ended "
                f"({e}); the sandbox may have been killed or reached its timeout"
            )
            error.__cause__ = e
        await self._receive(b"", final=True)
        if self._on_exit is not None:
            try:
                if _takes_argument(self._on_exit):
                    await _call(self._on_exit, self._exit_code)
                else:
                    await _call(self._on_exit)
            except Exception:
                log.exception("on_exit of terminal %s raised", self._terminal_id)
        if error is not None:
            self._finished.set_exception(error)
            self._finished.exception()  # retrieved here: wait() raises it
        else:
            self._finished.set_result(self._output)

    # -- state

    @property
    def terminal_id(self) -> str:
        """The id given to ``start`` (``terminal_id=``), else a random one."""
        return self._terminal_id

    @property
    def id(self) -> str:
        """Same as :attr:`terminal_id`."""
        return self._terminal_id

    @property
    def pid(self) -> Optional[int]:
        """The process id, inside the sandbox, of the terminal's program."""
        return self._handle.pid if self._handle is not None else None

    @property
    def data(self) -> str:
        """Everything the terminal printed so far."""
        return self._output.data

    @property
    def output(self) -> TerminalOutput:
        return self._output

    @property
    def exit_code(self) -> Optional[int]:
        """The program's exit code once the terminal ended (-1 when killed by a signal), else None."""
        return self._exit_code

    @property
    def finished(self) -> TerminalFinished:
        """Resolved with the output when the terminal ends."""
        return self._finished

    # -- API

    async def wait(self, timeout: Optional[float] = None) -> TerminalOutput:
        """Wait for the terminal to end (at most ``timeout`` seconds) and return its output.

        Raises :class:`TimeoutError` if ``timeout`` passes (the terminal keeps running) and
        :class:`TerminalException` if its output stream broke off (e.g. the sandbox was killed).

        Example::

            await term.send_data("exit\\n")
            out = await term.wait(timeout=30)
        """
        try:
            return await asyncio.wait_for(asyncio.shield(self._finished), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"terminal {self._terminal_id} did not end within {timeout}s; it is still running "
                "(end it with terminal.kill())"
            ) from None

    def _require_running(self, what: str) -> int:
        if self._finished.done() or self._handle is None:
            raise TerminalException(
                f"{what}: terminal {self._terminal_id} has ended (exit code {self._exit_code}); "
                "start a new one with sandbox.terminal.start()"
            )
        return self._handle.pid

    async def send_data(self, data: Union[str, bytes], timeout: Optional[float] = TIMEOUT) -> None:
        """Type ``data`` into the terminal (``"\\n"`` is Enter, ``"\\x03"`` is Ctrl+C).

        Example::

            await term.send_data("ls -la\\n")
        """
        what = f"cannot send data to terminal {self._terminal_id}"
        pid = self._require_running(what)
        with _terminal_errors(what):
            await self._commands._send_pty(pid, data, request_timeout=timeout)

    async def resize(self, cols: int, rows: int, timeout: Optional[float] = TIMEOUT) -> None:
        """Change the terminal's size; its program gets SIGWINCH.

        Example::

            await term.resize(cols=120, rows=40)
        """
        size = _size(cols, rows)
        what = f"cannot resize terminal {self._terminal_id}"
        pid = self._require_running(what)
        with _terminal_errors(what):
            await self._pty.resize(pid, size, request_timeout=timeout)

    async def kill(self, timeout: Optional[float] = TIMEOUT) -> None:
        """End the terminal (SIGKILL to its program) and wait until it has ended and ``on_exit``
        ran. Killing a terminal that already ended does nothing.

        Example::

            await term.kill()
        """
        if self._handle is None or self._finished.done():
            return
        with _terminal_errors(f"cannot kill terminal {self._terminal_id}"):
            await self._commands.kill(self._handle.pid, request_timeout=timeout)
        try:
            await asyncio.wait_for(self._finished.wait(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"terminal {self._terminal_id} was killed but its end did not arrive within {timeout}s"
            ) from None

    def __repr__(self) -> str:
        return f"<Terminal {self._terminal_id} pid={self.pid} exit_code={self._exit_code}>"


class TerminalManager:
    """Starts terminals in the sandbox (``sandbox.terminal``)."""

    def __init__(self, sandbox: "Sandbox", commands: AsyncCommands, pty: AsyncPty) -> None:
        self._sandbox = sandbox
        self._commands = commands
        self._pty = pty

    async def start(
        self,
        on_data: Optional[Callable[[str], Any]] = None,
        cols: int = 80,
        rows: int = 24,
        cwd: Optional[str] = "",
        terminal_id: Optional[str] = None,
        on_exit: Optional[Union[Callable[[], Any], Callable[[Optional[int]], Any]]] = None,
        cmd: Optional[str] = None,
        env_vars: Optional[EnvVars] = None,
        timeout: Optional[float] = TIMEOUT,
        *,
        user: Optional[str] = None,
    ) -> Terminal:
        """Start a terminal of ``cols`` x ``rows`` and return at once.

        Without ``cmd`` it runs an interactive login shell (``bash -i -l``); with ``cmd`` it
        runs ``bash -l -c cmd`` and ends when ``cmd`` ends. ``on_data`` (a plain or async
        function) gets the printed text as it arrives; ``on_exit`` is called when the terminal
        ends, with the exit code if it takes an argument. ``cwd`` and ``env_vars`` extend the
        sandbox's defaults; ``terminal_id`` names the terminal (and tags its process);
        ``timeout`` bounds starting it (the terminal itself has no time limit).

        Example::

            term = await sandbox.terminal.start(on_data=lambda d: print(d, end=""), cols=80, rows=24)
            await term.send_data("echo $((6*7))\\n")
        """
        size = _size(cols, rows)
        sbx = self._sandbox
        envs = {**(sbx._env_vars or {}), **(env_vars or {})}
        workdir = cwd or sbx._cwd
        terminal_id = terminal_id or secrets.token_hex(6)
        args = ["-i", "-l"] if cmd is None or not cmd.strip() else ["-l", "-c", cmd]
        terminal = Terminal(terminal_id, on_data, on_exit, self._commands, self._pty)
        with _terminal_errors(f"cannot start terminal {terminal_id}"):
            try:
                handle = await self._commands._start(
                    cmd=_SHELL,
                    args=args,
                    envs=envs,
                    cwd=workdir,
                    user=user,
                    stdin=False,
                    pty=size,
                    tag=terminal_id,
                    timeout=None,
                    request_timeout=timeout,
                    on_pty=terminal._receive,
                    display=cmd or f"terminal {terminal_id}",
                )
            except InvalidArgumentError as e:
                if workdir and _is_missing_cwd(e):
                    raise CurrentWorkingDirectoryDoesntExistException(
                        f"the working directory {workdir!r} of terminal {terminal_id} does not exist in the "
                        f"sandbox (or is not a directory); create it first with sandbox.filesystem.make_dir(): "
                        f"{e.message}",
                        status_code=e.status_code,
                        code=e.code,
                    ) from e
                raise
        terminal._attach(handle)
        return terminal
