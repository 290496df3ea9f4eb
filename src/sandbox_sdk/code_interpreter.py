"""``sandbox_sdk.code_interpreter``: TrEnv-X's code-interpreter sandbox (not available yet).

Code written for TrEnv-X's SDK imports ``CodeInterpreter`` from here. The name is importable
so that such code loads, but the code interpreter itself (running code cells through a
Jupyter kernel in the sandbox) arrives with trenvx's code-interpreter issue (15). Until then,
creating or using a :class:`CodeInterpreter` raises :class:`CodeInterpreterNotAvailableError`
(a :class:`NotImplementedError` and a :class:`~sandbox_sdk.exceptions.SandboxError`); use
:class:`sandbox_sdk.Sandbox` and run code with ``sandbox.process.start_and_wait("python3 ...")``
meanwhile.
"""

from __future__ import annotations

from typing import Any, NoReturn

from .exceptions import SandboxError

MESSAGE = (
    "sandbox_sdk.code_interpreter.CodeInterpreter is not available yet: the code interpreter "
    "arrives with trenvx's code-interpreter issue (15). Meanwhile use sandbox_sdk.Sandbox "
    "(for example `await sandbox.process.start_and_wait(\"python3 -c '...'\")`)."
)


class CodeInterpreterNotAvailableError(SandboxError, NotImplementedError):
    """The code interpreter is not implemented yet (see :data:`MESSAGE`)."""


def _unavailable() -> NoReturn:
    raise CodeInterpreterNotAvailableError(MESSAGE)


class CodeInterpreter:
    """Placeholder for TrEnv-X's ``CodeInterpreter``: every way of getting one raises
    :class:`CodeInterpreterNotAvailableError` with :data:`MESSAGE`.

    Example::

        from sandbox_sdk.code_interpreter import CodeInterpreter
        try:
            ci = await CodeInterpreter.create()
        except NotImplementedError as e:
            print(e)  # use sandbox_sdk.Sandbox until the code interpreter arrives
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _unavailable()

    @classmethod
    def create(cls, *args: Any, **kwargs: Any) -> NoReturn:
        _unavailable()

    @classmethod
    def connect(cls, *args: Any, **kwargs: Any) -> NoReturn:
        _unavailable()

    @classmethod
    def connect_direct(cls, *args: Any, **kwargs: Any) -> NoReturn:
        _unavailable()


__all__ = ["CodeInterpreter", "CodeInterpreterNotAvailableError", "MESSAGE"]
