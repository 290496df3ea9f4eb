"""Timeouts and the reaper.

Every sandbox has a deadline (``end_at``, seconds since the epoch). The E2B semantics:

- create with ``timeout``: the deadline is ``now + timeout``;
- ``set_timeout(t)`` (POST /sandboxes/{id}/timeout): the deadline becomes ``now + t``, shorter or
  longer than before;
- ``refresh(d)`` (POST /sandboxes/{id}/refreshes) and ``connect(t)``: the deadline moves to
  ``now + d`` only if that is later (a refresh never shortens a sandbox's life).

What a deadline does is the sandbox's :class:`LifecyclePolicy` (E2B's ``lifecycle``: create's
``autoPause``, ``autoPauseMemory``, ``autoResume``): by default the sandbox is killed; with
``auto_pause`` it is paused to disk instead (with its memory unless ``auto_pause_memory`` is
False), and with ``auto_resume`` traffic that reaches it while paused resumes it. An auto-paused
sandbox gets its create's timeout again when it resumes.

The :class:`Reaper` wakes every ``interval`` seconds, hands the ids whose deadline has passed to
an ``expire`` callback (the manager kills or pauses them, and kills paused sandboxes kept past
``paused_retention_s``), and never dies of an error in one of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

log = logging.getLogger(__name__)


class InvalidTimeout(ValueError):
    pass


@dataclass(frozen=True)
class LifecyclePolicy:
    """What happens to a sandbox at its timeout, and to traffic that reaches it while it is paused.

    Kept in the sandbox's record (a JSON column of the state store): it holds across any number
    of pause/resume cycles and server restarts."""

    auto_pause: bool = False
    """At its timeout the sandbox is paused to disk (E2B's ``on_timeout: "pause"``), not killed."""
    auto_pause_memory: bool = True
    """The auto-pause keeps its memory (processes resume); False: only its filesystem (a resume boots)."""
    auto_resume: bool = False
    """Traffic through the proxy to the sandbox while paused (by its timeout or a pause call) resumes
    it (E2B's ``auto_resume``, which E2B's API takes apart from ``autoPause``). Not a sandbox paused
    without its memory: that one boots, so traffic does not wake it; ``connect`` does."""
    timeout_s: float = 0.0
    """The create's timeout: what an auto-paused sandbox gets again when it resumes (0: unknown)."""

    @property
    def on_timeout(self) -> Literal["kill", "pause"]:
        return "pause" if self.auto_pause else "kill"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any] | None) -> "LifecyclePolicy":
        """From a record; an empty one (rows of before lifecycles) is the default: kill at timeout."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (value or {}).items() if k in names})


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
