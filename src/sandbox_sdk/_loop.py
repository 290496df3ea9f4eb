"""The private event loop behind the synchronous API.

The synchronous classes are a facade over the asynchronous core: each call submits the
core's coroutine to one event loop running in a daemon thread and waits for its result.
Callbacks of the synchronous API never run on that thread (they run in the caller's thread
or a per-command thread), so a callback may call the synchronous API again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from typing import Any, AsyncIterator, Awaitable, Coroutine, Iterator, Optional, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_runner: Optional["LoopThread"] = None


class LoopThread:
    """An asyncio event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._main, name="sandbox-sdk-loop", daemon=True)
        self.thread.start()
        self._ready.wait()
        self.pid = os.getpid()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for it; Ctrl-C cancels it."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError(
                "the synchronous sandbox API was called from its own event loop thread; "
                "use AsyncSandbox inside async code"
            )
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            if not future.done():
                future.cancel()
                try:
                    future.result(timeout=5)
                except BaseException:
                    pass
            raise

    def submit(self, coro: Coroutine[Any, Any, T]) -> "concurrent.futures.Future[T]":
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def iterate(self, aiter: AsyncIterator[T], close: Optional[Any] = None) -> Iterator[T]:
        """A blocking iterator over an async iterator living on the loop."""

        async def next_item() -> Any:
            try:
                return (True, await aiter.__anext__())
            except StopAsyncIteration:
                return (False, None)

        try:
            while True:
                ok, item = self.run(next_item())
                if not ok:
                    return
                yield item
        finally:
            if close is not None:
                self.run(close())


def runner() -> LoopThread:
    """The process-wide loop thread (recreated after a fork)."""
    global _runner
    with _lock:
        if _runner is None or _runner.pid != os.getpid() or not _runner.thread.is_alive():
            _runner = LoopThread()
        return _runner


def run(awaitable: Awaitable[T]) -> T:
    async def wrap() -> T:
        return await awaitable

    return runner().run(wrap())
