"""``run_code`` and code contexts on the synchronous :class:`~sandbox_sdk.e2b.Sandbox`.

The asynchronous implementation runs on the SDK's private event loop thread (:mod:`sandbox_sdk._loop`).
Callbacks do not run there: each piece of output is passed through a queue to the calling
thread, which calls them as the pieces arrive, so a callback may use the synchronous API again.
A callback that raises (or Ctrl-C) cancels the execution, which closes its request: the server
interrupts the cell.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from .. import _loop
from .client import AsyncCodeRunner, Handlers
from .models import Context, Execution, ExecutionError, OutputMessage, Result, RunCodeLanguage

_END = object()


def _enqueue(events: "queue.SimpleQueue[Tuple[Any, Any]]", kind: str,
             handler: Optional[Callable[[Any], Any]]) -> Optional[Callable[[Any], None]]:
    if handler is None:
        return None
    return lambda value: events.put((kind, value))


class CodeRunner:
    """The synchronous ``run_code`` family (E2B's ``e2b_code_interpreter.Sandbox``), on every
    :class:`~sandbox_sdk.e2b.Sandbox` (the class mixes this in). See :class:`AsyncCodeRunner`."""

    _async: Any  # the AsyncSandbox behind the synchronous one

    @property
    def _code_core(self) -> AsyncCodeRunner:
        core: AsyncCodeRunner = self._async
        return core

    def run_code(
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
        """Run ``code`` in the sandbox's code interpreter; callbacks run in this thread as output
        arrives. See :meth:`AsyncCodeRunner.run_code`.

        Example::

            execution = sandbox.run_code("print('hi')\\n1 + 1", on_stdout=lambda m: print(m.line, end=""))
            assert execution.text == "2"
        """
        callbacks = {"stdout": on_stdout, "stderr": on_stderr, "result": on_result, "error": on_error}
        events: "queue.SimpleQueue[Tuple[Any, Any]]" = queue.SimpleQueue()
        handlers = Handlers(**{f"on_{kind}": _enqueue(events, kind, cb) for kind, cb in callbacks.items()})
        runner = _loop.runner()
        if threading.current_thread() is runner.thread:
            raise RuntimeError("the synchronous run_code was called from the SDK's event loop thread; "
                               "use AsyncSandbox.run_code inside async code")
        future = runner.submit(self._code_core.run_code(
            code, language, context, handlers.on_stdout, handlers.on_stderr, handlers.on_result, handlers.on_error,
            envs, timeout, request_timeout))
        future.add_done_callback(lambda _: events.put((_END, None)))
        try:
            while True:
                kind, value = events.get()
                if kind is _END:
                    break
                handler = callbacks[kind]
                assert handler is not None
                handler(value)
        except BaseException:
            _cancel(future)
            raise
        return future.result()

    def create_code_context(
        self,
        cwd: Optional[str] = None,
        language: Optional[RunCodeLanguage] = None,
        request_timeout: Optional[float] = None,
    ) -> Context:
        """A new context for ``language`` (default Python) working in ``cwd``; see
        :meth:`AsyncCodeRunner.create_code_context`. Example: ``ctx = sandbox.create_code_context(cwd="/tmp")``"""
        return _loop.runner().run(self._code_core.create_code_context(cwd, language, request_timeout))

    def list_code_contexts(self, request_timeout: Optional[float] = None) -> List[Context]:
        """The interpreter's contexts. Example: ``[c.id for c in sandbox.list_code_contexts()]``"""
        return _loop.runner().run(self._code_core.list_code_contexts(request_timeout))

    def remove_code_context(self, context: Union[Context, str], request_timeout: Optional[float] = None) -> None:
        """Remove a context (its kernel ends). Example: ``sandbox.remove_code_context(ctx)``"""
        _loop.runner().run(self._code_core.remove_code_context(context, request_timeout))

    def restart_code_context(self, context: Union[Context, str], request_timeout: Optional[float] = None) -> None:
        """Restart a context's kernel (its variables are cleared). Example: ``sandbox.restart_code_context(ctx)``"""
        _loop.runner().run(self._code_core.restart_code_context(context, request_timeout))


def _cancel(future: "concurrent.futures.Future[Any]") -> None:
    """Cancel the execution: its task on the loop is cancelled, which closes its request."""
    if not future.done():
        future.cancel()
