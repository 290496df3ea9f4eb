"""Typed errors of the SDK.

Every error the SDK raises derives from :class:`SandboxError`. Where a Python built-in
exception means the same thing, the SDK error derives from it too, so ``except
TimeoutError`` or ``except FileNotFoundError`` work without importing anything from here:

==============================  ==================================================
error                           when
==============================  ==================================================
:class:`BackendUnreachableError`  the backend address does not answer (wrong address,
                                server not started); also a :class:`ConnectionError`
:class:`AuthenticationError`    the backend rejected the API key or the sandbox access
                                token (HTTP 401/403)
:class:`SandboxNotFoundError`   the sandbox does not exist (killed, or its timeout passed)
:class:`TemplateNotFoundError`  the template named in ``create`` does not exist
:class:`PathNotFoundError`      a file or directory inside the sandbox does not exist;
                                also a :class:`FileNotFoundError`
:class:`ProcessNotFoundError`   no process with that pid / tag in the sandbox
:class:`InvalidArgumentError`   a request the backend or the agent refused as malformed
                                (HTTP 400); also a :class:`ValueError`
:class:`ConflictError`          the request conflicts with the sandbox's state (409)
:class:`RateLimitError`         a limit was reached (HTTP 429: too many sandboxes/requests)
:class:`InsufficientCapacityError`  the host has no memory left for another sandbox (HTTP 503)
:class:`NotEnoughSpaceError`    the sandbox's disk is full (HTTP 507, ``resource_exhausted``)
:class:`TimeoutError`           a request or a command did not finish in time; also the
                                built-in :class:`TimeoutError`
:class:`CommandExitError`       a command exited with a non-zero code (carries
                                ``exit_code``, ``stdout``, ``stderr``)
:class:`CurrentWorkingDirectoryDoesntExistException`  a process was started with a ``cwd``
                                that does not exist; also an :class:`InvalidArgumentError`
:class:`CodeInterpreterNotAvailableError`  ``run_code`` on a sandbox whose template has no code
                                interpreter (nothing answers on its port 49999)
==============================  ==================================================

Grouped the way TrEnv-X's SDK groups them, so code written for it keeps its ``except``
clauses: :class:`ProcessException` is the base of process errors
(:class:`ProcessNotFoundError`, :class:`CommandExitError`,
:class:`CurrentWorkingDirectoryDoesntExistException`), :class:`FilesystemException` of file
errors (:class:`PathNotFoundError`), :class:`TerminalException` of terminal errors, and
:class:`RpcException` is :class:`RpcError` (an error answer from the guest agent).

E2B's exception names (``SandboxException``, ``TimeoutException``, ``NotFoundException``,
``CommandExitException``, ...) are aliases of these classes.
"""

from __future__ import annotations

import builtins
from typing import Any, Optional


class SandboxError(Exception):
    """Base class of every error raised by the SDK.

    Attributes: ``message`` (what happened and what to do), ``status_code`` (the HTTP status
    when the error came from an HTTP answer, else None) and ``code`` (the Connect error code
    such as ``"not_found"`` or the backend's numeric code, when there was one).

    Example::

        try:
            sandbox.commands.run("exit 3")
        except SandboxError as e:
            print(type(e).__name__, e)
    """

    def __init__(
        self,
        message: str = "",
        *,
        status_code: Optional[int] = None,
        code: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code

    def __str__(self) -> str:  # keep the message readable even for multi-base classes
        return self.message


class BackendUnreachableError(SandboxError, builtins.ConnectionError):
    """The backend did not accept a connection (wrong address or the server is not running)."""


class AuthenticationError(SandboxError):
    """The backend rejected the API key, or the sandbox rejected the access token."""


class NotFoundError(SandboxError):
    """Something the request names does not exist."""


class SandboxNotFoundError(NotFoundError):
    """The sandbox does not exist: it was killed, or its timeout passed."""


class TemplateNotFoundError(NotFoundError):
    """The template named in ``create`` is not built on the backend."""


class ProcessException(SandboxError):
    """Base class of errors about a process in the sandbox (TrEnv-X's SDK name)."""


class FilesystemException(SandboxError):
    """Base class of errors about files in the sandbox (TrEnv-X's SDK name)."""


class TerminalException(SandboxError):
    """Base class of errors about a terminal (pty) in the sandbox (TrEnv-X's SDK name)."""


class PathNotFoundError(NotFoundError, FilesystemException, builtins.FileNotFoundError):
    """A file or directory inside the sandbox does not exist."""


class ProcessNotFoundError(NotFoundError, ProcessException):
    """No process with that pid (or tag) runs in the sandbox."""


class AlreadyExistsError(SandboxError, builtins.FileExistsError):
    """The path (or other object) already exists."""


class PermissionDeniedError(SandboxError, builtins.PermissionError):
    """The sandbox user may not do this (for example write outside its home as ``user``)."""


class InvalidArgumentError(SandboxError, builtins.ValueError):
    """The request was refused as malformed (HTTP 400 / ``invalid_argument``)."""


class ConflictError(SandboxError):
    """The request conflicts with the current state (HTTP 409)."""


class LimitError(SandboxError):
    """Base class of errors raised because a limit or a resource was exhausted."""


class RateLimitError(LimitError):
    """Too many sandboxes or requests (HTTP 429)."""


class InsufficientCapacityError(LimitError):
    """The host has not enough free memory for another sandbox (HTTP 503)."""


class NotEnoughSpaceError(LimitError):
    """The sandbox's disk is full (HTTP 507 or ``resource_exhausted``)."""


class TimeoutError(SandboxError, builtins.TimeoutError):  # noqa: A001 - deliberate
    """A request or a command did not finish in time."""


class RpcError(SandboxError):
    """The guest agent answered an RPC with an error not covered by a more specific class."""


class StreamError(SandboxError):
    """A streamed answer (process output, directory watch) broke off before its end."""


class CurrentWorkingDirectoryDoesntExistException(ProcessException, InvalidArgumentError):
    """A process was started with a ``cwd`` that does not exist (or is not a directory).

    Also an :class:`InvalidArgumentError` (and a :class:`ValueError`), which is what the SDK
    raised for it before, so existing ``except`` clauses still catch it.

    Example::

        try:
            await sandbox.process.start("ls", cwd="/nope")
        except CurrentWorkingDirectoryDoesntExistException as e:
            print(e)
    """


class CodeInterpreterNotAvailableError(SandboxError):
    """Nothing answers on the code interpreter's port (49999) of the sandbox: its template has no
    code interpreter (create the sandbox from template ``code-interpreter``), or its interpreter
    server stopped.

    Example::

        try:
            sandbox.run_code("1 + 1")
        except CodeInterpreterNotAvailableError as e:
            print(e)  # ... create it from template 'code-interpreter'
    """


class CommandExitError(ProcessException):
    """A command exited with a non-zero exit code.

    Carries the command's ``exit_code``, ``stdout``, ``stderr`` and ``error`` (the agent's
    description of how it ended, e.g. ``"signal: killed"``).

    Example::

        try:
            sandbox.commands.run("ls /nope")
        except CommandExitError as e:
            print(e.exit_code, e.stderr)
    """

    def __init__(
        self,
        exit_code: int,
        stdout: str = "",
        stderr: str = "",
        error: Optional[str] = None,
        cmd: Optional[str] = None,
    ) -> None:
        what = f"command {cmd!r}" if cmd else "command"
        tail = stderr.strip()[-2000:]
        msg = f"{what} exited with code {exit_code}"
        if error:
            msg += f" ({error})"
        msg += f"; stderr:\n{tail}" if tail else "; it wrote nothing to stderr"
        super().__init__(msg, code=exit_code)
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        self.error = error
        self.cmd = cmd


# E2B's names for the same classes.
SandboxException = SandboxError
TimeoutException = TimeoutError
NotFoundException = NotFoundError
AuthenticationException = AuthenticationError
InvalidArgumentException = InvalidArgumentError
NotEnoughSpaceException = NotEnoughSpaceError
RateLimitException = RateLimitError
CommandExitException = CommandExitError
FileNotFoundException = PathNotFoundError
TemplateException = TemplateNotFoundError
RpcException = RpcError

__all__ = [
    "SandboxError",
    "BackendUnreachableError",
    "AuthenticationError",
    "NotFoundError",
    "SandboxNotFoundError",
    "TemplateNotFoundError",
    "PathNotFoundError",
    "ProcessNotFoundError",
    "AlreadyExistsError",
    "PermissionDeniedError",
    "InvalidArgumentError",
    "ConflictError",
    "LimitError",
    "RateLimitError",
    "InsufficientCapacityError",
    "NotEnoughSpaceError",
    "TimeoutError",
    "RpcError",
    "StreamError",
    "CommandExitError",
    "ProcessException",
    "FilesystemException",
    "TerminalException",
    "CurrentWorkingDirectoryDoesntExistException",
    "CodeInterpreterNotAvailableError",
    "SandboxException",
    "TimeoutException",
    "NotFoundException",
    "AuthenticationException",
    "InvalidArgumentException",
    "NotEnoughSpaceException",
    "RateLimitException",
    "CommandExitException",
    "FileNotFoundException",
    "TemplateException",
    "RpcException",
]
