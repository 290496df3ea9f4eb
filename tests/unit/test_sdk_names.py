"""Names that code written for TrEnv-X's SDK imports from ``sandbox_sdk`` (issue 13, item 2)."""

from __future__ import annotations

import asyncio

import sandbox_sdk
from sandbox_sdk import exceptions


def test_trenvx_exception_names_are_exported() -> None:
    from sandbox_sdk import (  # noqa: F401 - the import itself is the test
        CurrentWorkingDirectoryDoesntExistException,
        FilesystemException,
        ProcessException,
        RpcException,
        TerminalException,
    )

    for name in (
        "CurrentWorkingDirectoryDoesntExistException",
        "TerminalException",
        "ProcessException",
        "FilesystemException",
        "RpcException",
    ):
        assert name in sandbox_sdk.__all__ and name in exceptions.__all__
        assert issubclass(getattr(sandbox_sdk, name), exceptions.SandboxError)


def test_trenvx_exception_hierarchy() -> None:
    e = exceptions
    cwd = e.CurrentWorkingDirectoryDoesntExistException
    # A process error, and still what the SDK raised for a missing cwd before (and a ValueError).
    assert issubclass(cwd, e.ProcessException)
    assert issubclass(cwd, e.InvalidArgumentError) and issubclass(cwd, ValueError)
    assert issubclass(e.ProcessNotFoundError, e.ProcessException)
    assert issubclass(e.ProcessNotFoundError, e.NotFoundError)
    assert issubclass(e.CommandExitError, e.ProcessException)
    assert issubclass(e.PathNotFoundError, e.FilesystemException)
    assert issubclass(e.PathNotFoundError, FileNotFoundError)
    assert issubclass(e.TerminalException, e.SandboxError)
    assert e.RpcException is e.RpcError
    assert not issubclass(e.FilesystemException, e.ProcessException)
    err = cwd("the working directory '/nope' does not exist", code="invalid_argument")
    assert str(err) == "the working directory '/nope' does not exist" and err.code == "invalid_argument"


def test_trenvx_code_interpreter_names() -> None:
    """TrEnv-X's ``CodeInterpreter`` (a Sandbox with a ``notebook``) and the names its code imports;
    ``CodeInterpreterNotAvailableError`` (the old placeholder's error) now means a sandbox without one."""
    from sandbox_sdk.code_interpreter import (
        CodeInterpreter,
        CodeInterpreterNotAvailableError,
        Error,
        Execution,
        KernelException,
        Result,
    )
    from sandbox_sdk.sandbox import Sandbox

    assert sandbox_sdk.code_interpreter.CodeInterpreter is CodeInterpreter
    assert issubclass(CodeInterpreter, Sandbox) and CodeInterpreter.template == "default-code-interpreter"
    assert asyncio.iscoroutinefunction(CodeInterpreter.create)
    assert CodeInterpreterNotAvailableError is exceptions.CodeInterpreterNotAvailableError
    assert issubclass(CodeInterpreterNotAvailableError, exceptions.SandboxError)
    assert "CodeInterpreterNotAvailableError" in sandbox_sdk.__all__
    assert KernelException is exceptions.SandboxError and Error.__name__ == "ExecutionError"
    assert Execution().text is None and Result(text="1", is_main_result=True).formats() == ["text"]
