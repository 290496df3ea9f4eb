"""``sandbox_sdk.code_interpreter``: TrEnv-X's code-interpreter sandbox (asynchronous).

:class:`CodeInterpreter` is a :class:`sandbox_sdk.Sandbox` of the ``default-code-interpreter``
template (an alias of ``code-interpreter``) with a ``notebook``: cells run in Jupyter-like kernels
(contexts) that keep their variables between cells. The names and arguments are those of
TrEnv-X's SDK (``notebook.exec_cell``, ``create_kernel``, ``restart_kernel``,
``shutdown_kernel``, ``list_kernels``); underneath it is the same code interpreter as E2B's
``run_code`` (:class:`sandbox_sdk.e2b.AsyncSandbox.run_code`), reached through the backend.

Example::

    import asyncio
    from sandbox_sdk.code_interpreter import CodeInterpreter

    async def main():
        sandbox = await CodeInterpreter.create()
        execution = await sandbox.notebook.exec_cell("x = 41\\nx + 1", on_stdout=print)
        print(execution.text)  # 42
        await sandbox.close()

    asyncio.run(main())
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from ._code_interpreter import (
    Chart,
    Context,
    Execution,
    ExecutionError,
    Logs,
    OutputMessage,
    Result,
)
from ._code_interpreter.client import context_id_of
from .exceptions import CodeInterpreterNotAvailableError, InvalidArgumentError, SandboxError
from .sandbox.main import TIMEOUT, Sandbox
from .sandbox.process import EnvVars, ProcessMessage

#: The template :meth:`CodeInterpreter.create` starts when none is given (TrEnv-X's name).
DEFAULT_TEMPLATE = "default-code-interpreter"

#: TrEnv-X's name of :class:`ExecutionError` (``name``, ``value``, ``traceback``, ``traceback_raw``).
Error = ExecutionError
#: TrEnv-X's base of the notebook's errors: every error of the SDK is one.
KernelException = SandboxError

#: Jupyter kernel names TrEnv-X's ``create_kernel(kernel_name=...)`` took, as the interpreter's languages.
KERNEL_LANGUAGES: Dict[str, str] = {
    "python3": "python", "python": "python", "ir": "r", "r": "r", "javascript": "javascript", "deno": "javascript",
    "typescript": "typescript", "java": "java", "bash": "bash",
}


def _language_of(kernel_name: Optional[str]) -> Optional[str]:
    if kernel_name is None:
        return None
    if not isinstance(kernel_name, str) or not kernel_name.strip():
        raise InvalidArgumentError(f"kernel_name must be a kernel's name such as 'python3', not {kernel_name!r}")
    return KERNEL_LANGUAGES.get(kernel_name.strip().lower(), kernel_name.strip())


def _no_limit(timeout: Optional[float]) -> float:
    """TrEnv-X's timeouts: None waits forever; the code interpreter's client says that with 0."""
    return 0 if timeout is None else timeout


def _as_process_message(handler: Optional[Callable[[ProcessMessage], Any]]) -> Optional[Callable[[OutputMessage], Any]]:
    """A callback of TrEnv-X's (it takes a :class:`ProcessMessage`) as one of the interpreter's."""
    if handler is None:
        return None

    def call(message: OutputMessage) -> Any:
        return handler(ProcessMessage(line=message.line, error=message.error, timestamp=message.timestamp_ns))

    return call


class JupyterExtension:
    """The ``notebook`` of a :class:`CodeInterpreter`: cells and kernels (TrEnv-X's API).

    A kernel is one of the code interpreter's contexts; its id is the context's id.
    """

    def __init__(self, sandbox: "CodeInterpreter") -> None:
        self._sandbox = sandbox
        self._default_kernel_id: Optional[str] = None

    async def exec_cell(
        self,
        code: str,
        kernel_id: Optional[str] = None,
        on_stdout: Optional[Callable[[ProcessMessage], Any]] = None,
        on_stderr: Optional[Callable[[ProcessMessage], Any]] = None,
        on_result: Optional[Callable[[Result], Any]] = None,
        timeout: Optional[float] = TIMEOUT,
        *,
        on_error: Optional[Callable[[ExecutionError], Any]] = None,
        envs: Optional[EnvVars] = None,
        request_timeout: Optional[float] = None,
    ) -> Execution:
        """Run ``code`` as a cell of the kernel ``kernel_id`` (default: the default Python kernel)
        and return its :class:`Execution` (``results``, ``logs``, ``error``, ``text``).

        ``on_stdout``/``on_stderr`` get :class:`ProcessMessage` objects as the cell prints,
        ``on_result`` each :class:`Result` (figures, the cell's value), ``on_error`` the exception
        it raised (which is also ``execution.error``; it does not raise here). ``timeout``: seconds
        the cell may run (None: no limit); past it the cell is interrupted and
        :class:`~sandbox_sdk.exceptions.TimeoutError` raised.

        Example::

            execution = await sandbox.notebook.exec_cell("print('hi')\\n1 + 1", on_stdout=lambda m: print(m.line))
            assert execution.text == "2"
        """
        return await self._sandbox.async_sandbox.run_code(
            code, context=kernel_id, on_stdout=_as_process_message(on_stdout),
            on_stderr=_as_process_message(on_stderr), on_result=on_result, on_error=on_error, envs=envs,
            timeout=_no_limit(timeout), request_timeout=request_timeout)

    @property
    def default_kernel_id(self) -> str:
        """The id of the default Python kernel (the one ``exec_cell`` uses without ``kernel_id``),
        found when the sandbox was created (``await notebook.find_default_kernel()`` looks again)."""
        if not self._default_kernel_id:
            raise KernelException(
                "the default kernel's id is not known: the code interpreter listed no Python context when the "
                "sandbox was created or connected to; await sandbox.notebook.find_default_kernel(), or pass a "
                "kernel_id from create_kernel()/list_kernels()")
        return self._default_kernel_id

    async def find_default_kernel(self, timeout: Optional[float] = TIMEOUT) -> Optional[str]:
        """Look up the default Python kernel's id (the first Python context the interpreter lists)."""
        contexts = await self._sandbox.async_sandbox.list_code_contexts(request_timeout=_no_limit(timeout))
        python = [c for c in contexts if c.language.lower() in ("python", "python3")]
        self._default_kernel_id = python[0].id if python else None
        return self._default_kernel_id

    async def _kernel(self, kernel_id: Optional[str], timeout: Optional[float]) -> str:
        found = context_id_of(kernel_id, "kernel_id")
        if found is not None:
            return found
        if not self._default_kernel_id:
            await self.find_default_kernel(timeout)
        return self.default_kernel_id

    async def create_kernel(
        self,
        cwd: str = "/home/user",
        kernel_name: Optional[str] = None,
        timeout: Optional[float] = TIMEOUT,
    ) -> str:
        """Start a new kernel (an independent context with its own variables) working in ``cwd``;
        ``kernel_name`` picks its language (``"python3"`` by default; ``"ir"``, ``"javascript"``,
        ``"bash"``... as the interpreter has them). Returns its id, for ``exec_cell(kernel_id=...)``.

        Example::

            kernel_id = await sandbox.notebook.create_kernel(cwd="/tmp")
            await sandbox.notebook.exec_cell("import os; os.getcwd()", kernel_id=kernel_id)
        """
        context = await self._sandbox.async_sandbox.create_code_context(
            cwd=cwd, language=_language_of(kernel_name), request_timeout=_no_limit(timeout))
        return context.id

    async def restart_kernel(self, kernel_id: Optional[str] = None, timeout: Optional[float] = TIMEOUT) -> None:
        """Restart a kernel (default: the default one): its variables and imports are cleared.

        Example::

            await sandbox.notebook.restart_kernel()
        """
        target = await self._kernel(kernel_id, timeout)
        await self._sandbox.async_sandbox.restart_code_context(target, request_timeout=_no_limit(timeout))

    async def shutdown_kernel(self, kernel_id: Optional[str] = None, timeout: Optional[float] = TIMEOUT) -> None:
        """Shut a kernel down (default: the default one): its process ends, its id is gone.

        Example::

            await sandbox.notebook.shutdown_kernel(kernel_id)
        """
        target = await self._kernel(kernel_id, timeout)
        await self._sandbox.async_sandbox.remove_code_context(target, request_timeout=_no_limit(timeout))
        if target == self._default_kernel_id:
            self._default_kernel_id = None

    async def list_kernels(self, timeout: Optional[float] = TIMEOUT) -> List[str]:
        """The ids of the interpreter's kernels (the default ones too).

        Example::

            print(await sandbox.notebook.list_kernels())
        """
        contexts = await self._sandbox.async_sandbox.list_code_contexts(request_timeout=_no_limit(timeout))
        return [c.id for c in contexts]

    async def close(self) -> None:
        """Nothing to release: the notebook uses its sandbox's connections (TrEnv-X closed websockets here)."""


class CodeInterpreter(Sandbox):
    """A TrEnv-X sandbox with a code interpreter: ``sandbox.notebook`` runs cells in kernels.

    Create it with ``await CodeInterpreter.create()`` (template ``default-code-interpreter``) or
    attach with ``await CodeInterpreter.connect(sandbox_id)``; everything of :class:`Sandbox`
    (``process``, ``filesystem``, ``close``...) works too.
    """

    template: Optional[str] = DEFAULT_TEMPLATE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.notebook = JupyterExtension(self)

    @classmethod
    async def create(  # type: ignore[override]
        cls,
        template: Optional[str] = None,
        cwd: Optional[str] = None,
        env_vars: Optional[EnvVars] = None,
        timeout: Optional[float] = TIMEOUT,
        on_stdout: Optional[Callable[[ProcessMessage], Any]] = None,
        on_stderr: Optional[Callable[[ProcessMessage], Any]] = None,
        on_exit: Optional[Callable[..., Any]] = None,
        **kwargs: Any,
    ) -> "CodeInterpreter":
        """Start a sandbox from ``template`` (default ``default-code-interpreter``) and look up its
        default kernel. Takes :meth:`Sandbox.create`'s arguments (``target_addr``, ``metadata``,
        ``sandbox_timeout``...). A template without a code interpreter raises
        :class:`~sandbox_sdk.exceptions.CodeInterpreterNotAvailableError` (the sandbox is killed).

        Example::

            sandbox = await CodeInterpreter.create(target_addr="127.0.0.1", sandbox_timeout=600)
        """
        sandbox = await super().create(template, cwd, env_vars, timeout, on_stdout, on_stderr, on_exit, **kwargs)
        assert isinstance(sandbox, CodeInterpreter)
        try:
            await sandbox.notebook.find_default_kernel(timeout)
        except BaseException:
            await sandbox.close()
            raise
        return sandbox

    async def close(self) -> None:
        """Kill the sandbox and release its connections (idempotent)."""
        await self.notebook.close()
        await super().close()


__all__ = [
    "CodeInterpreter",
    "JupyterExtension",
    "DEFAULT_TEMPLATE",
    "Execution",
    "Result",
    "Logs",
    "Chart",
    "Context",
    "Error",
    "ExecutionError",
    "OutputMessage",
    "ProcessMessage",
    "KernelException",
    "CodeInterpreterNotAvailableError",
]
