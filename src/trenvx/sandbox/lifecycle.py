"""Timeouts and the reaper.

Every sandbox has a deadline (``end_at``, seconds since the epoch). The E2B semantics:

- create with ``timeout``: the deadline is ``now + timeout``;
- ``set_timeout(t)`` (POST /sandboxes/{id}/timeout): the deadline becomes ``now + t``, shorter or
  longer than before;
- ``refresh(d)`` (POST /sandboxes/{id}/refreshes) and ``connect(t)``: the deadline moves to
  ``now + d`` only if that is later (a refresh never shortens a sandbox's life).

The :class:`Reaper` wakes every ``interval`` seconds, hands the ids whose deadline has passed to
an ``expire`` callback (the manager kills them), and never dies of an error in one of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

log = logging.getLogger(__name__)


class InvalidTimeout(ValueError):
    pass


def check_timeout(seconds: float, max_s: int, what: str = "timeout") -> float:
    """``seconds`` if it is a valid timeout, else :class:`InvalidTimeout` naming the limits."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds != seconds:
        raise InvalidTimeout(f"{what} must be a number of seconds")
    if seconds < 1 or seconds > max_s:
        raise InvalidTimeout(f"{what} must be between 1 and {max_s} seconds (got {seconds:g})")
    return float(seconds)


def deadline_after(seconds: float, now: float | None = None) -> float:
    return (time.time() if now is None else now) + seconds


def extended_deadline(current: float, seconds: float, now: float | None = None) -> float:
    """The later of ``current`` and ``now + seconds`` (refresh/connect never shorten)."""
    return max(current, deadline_after(seconds, now))


class Reaper:
    """Periodically expires what is due. ``due(now)`` lists ids; ``expire(id)`` ends one."""

    def __init__(
        self,
        interval_s: float,
        due: Callable[[float], Iterable[str]],
        expire: Callable[[str], Awaitable[None]],
        housekeeping: Callable[[float], None] | None = None,
    ) -> None:
        self.interval_s = interval_s
        self._due = due
        self._expire = expire
        self._housekeeping = housekeeping
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[str] = set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="trenvx-reaper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def tick(self, now: float | None = None) -> list[str]:
        """One pass: expire everything due now; returns the ids expired in this pass."""
        now = time.time() if now is None else now
        ids = [i for i in self._due(now) if i not in self._inflight]
        if ids:
            self._inflight.update(ids)
            try:
                results = await asyncio.gather(*(self._expire(i) for i in ids), return_exceptions=True)
            finally:
                self._inflight.difference_update(ids)
            for i, r in zip(ids, results):
                if isinstance(r, BaseException) and not isinstance(r, KeyError):
                    log.error("reaper: ending sandbox %s failed: %r", i, r)
        if self._housekeeping is not None:
            try:
                self._housekeeping(now)
            except Exception:  # noqa: BLE001 - housekeeping must not stop the reaper
                log.exception("reaper housekeeping failed")
        return ids

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("reaper pass failed")
