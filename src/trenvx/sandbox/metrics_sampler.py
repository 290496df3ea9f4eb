"""MetricsSampler: CPU, memory and disk use of every running sandbox over time (E2B's sandbox metrics).

Each running sandbox is sampled every ``interval_s`` (5 s, as E2B does) through its guest
agent's ``GET /metrics``; the last ``keep`` samples of each are kept in a ring (30 minutes at
5 s), which ``GET /sandboxes/{id}/metrics`` reads. What it costs and how that stays bounded:

- **One small request per sample**, answered by the agent from ``/proc`` and ``statvfs`` (no
  process is started in the guest). Measured under TCG: ~6 ms of the VMM's host CPU per sample
  (p50 latency 6-7 ms), so ~0.13 % of a core per sandbox at 5 s, and at most ~2.5 % of a core
  for the whole host at the budget below; the agent's pages it touches are touched once.
- **A budget**: at most ``max_per_s`` samples a second over all sandboxes (a tick every
  second takes the most overdue ones), so a host with many sandboxes samples each less often
  (every ``n / max_per_s`` seconds) instead of spending more; at most ``max_inflight`` requests
  are in flight at once, each cut off after ``timeout_s``.
- **Never on the event loop's time**: samples are tasks awaiting the agent; the loop only
  parses a few hundred bytes of JSON per sample (the agent client caps the body).
- **Paused sandboxes are not sampled** (their vCPUs are stopped; their ring is kept and sampling
  resumes with them). Sandboxes that end are forgotten, ring and all, at the next tick.

CPU use is computed here between two samples of the guest's raw ``/proc/stat`` counters
(``cpu_ticks_total``/``cpu_ticks_idle``), so other callers of the agent's ``/metrics`` (each
of which moves the window of its own ``cpu_used_pct``) do not disturb it; the first sample of a
sandbox, or one from an agent without the counters, uses the agent's ``cpu_used_pct``.

The guest is not trusted: a sample whose figures are not non-negative numbers of a sane size
is dropped, CPU use is clamped to 0-100 %, ``cpuCount`` is the template's vCPU count (not the
guest's word), and the time of a sample is the host's clock. A guest can only misreport its
own figures, which only its own sandbox's users read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

INTERVAL_S = 5.0
"""How often each sandbox is sampled (E2B samples every 5 s), when the budget allows."""
KEEP = 360
"""Samples kept per sandbox: 30 minutes at 5 s (~110 KiB of host memory per sandbox)."""
MAX_PER_S = 4.0
"""Samples a second over all sandboxes; more sandboxes than ``MAX_PER_S * INTERVAL_S`` stretch
the interval instead of the cost."""
MAX_INFLIGHT = 8
TIMEOUT_S = 5.0
"""A sample the agent has not answered by then is dropped (a busy TCG guest answers in ms)."""
TICK_S = 1.0
MAX_BACKOFF = 12
"""A sandbox whose agent keeps failing is asked at most every ``MAX_BACKOFF`` intervals."""
MAX_FIGURE = 1 << 62
"""Larger byte counts than this are not a guest's memory or disk."""


@dataclass(frozen=True, slots=True)
class MetricSample:
    """One sample of a sandbox, in E2B's units (bytes, percent)."""

    t: float
    """When it was taken: seconds since the epoch, the host's clock."""
    cpu_count: int
    cpu_used_pct: float
    """CPU use over all vCPUs since the previous sample, 0-100."""
    mem_used: int
    mem_total: int
    mem_cache: int
    disk_used: int
    disk_total: int


class Sampled(Protocol):
    """What the sampler needs of a sandbox (:class:`~trenvx.sandbox.manager.Sandbox` has it)."""

    @property
    def id(self) -> str: ...

    @property
    def paused(self) -> bool: ...

    @property
    def ending(self) -> bool: ...

    @property
    def agent(self) -> Any:
        """An object with ``async metrics() -> dict`` (the guest agent's ``/metrics``)."""


class BadSample(ValueError):
    """The agent's answer is not a usable sample."""


def _figure(raw: dict[str, Any], key: str, *, required: bool = True) -> int:
    v = raw.get(key)
    if v is None and not required:
        return 0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= MAX_FIGURE:
        raise BadSample(f"{key}: {v!r:.40} is not a non-negative number")
    return int(v)


def parse_sample(raw: Any, t: float, cpu_count: int,
                 previous_ticks: tuple[int, int] | None) -> tuple[MetricSample, tuple[int, int] | None]:
    """A sample from the agent's ``/metrics`` answer ``raw``, taken at ``t``; also the CPU
    counters (total, idle) to compute the next sample's CPU use from (None: the agent has none).

    Raises :class:`BadSample` for an answer that is not a JSON object of sane figures.
    """
    if not isinstance(raw, dict):
        raise BadSample(f"expected a JSON object, got {type(raw).__name__}")
    ticks: tuple[int, int] | None = None
    if "cpu_ticks_total" in raw and "cpu_ticks_idle" in raw:
        ticks = (_figure(raw, "cpu_ticks_total"), _figure(raw, "cpu_ticks_idle"))
    pct: float | None = None
    if ticks is not None and previous_ticks is not None:
        d_total, d_idle = ticks[0] - previous_ticks[0], ticks[1] - previous_ticks[1]
        if d_total > 0 and 0 <= d_idle <= d_total:
            pct = 100.0 * (d_total - d_idle) / d_total
        elif d_total == 0:
            pct = 0.0  # no guest time passed (e.g. paused in between)
    if pct is None:
        reported = raw.get("cpu_used_pct", 0.0)
        if isinstance(reported, bool) or not isinstance(reported, (int, float)) or not math.isfinite(reported):
            raise BadSample(f"cpu_used_pct: {reported!r:.40} is not a number")
        pct = float(reported)
    sample = MetricSample(
        t=t, cpu_count=cpu_count, cpu_used_pct=round(min(100.0, max(0.0, pct)), 2),
        mem_used=_figure(raw, "mem_used"), mem_total=_figure(raw, "mem_total"),
        mem_cache=_figure(raw, "mem_cache", required=False),
        disk_used=_figure(raw, "disk_used", required=False), disk_total=_figure(raw, "disk_total", required=False),
    )
    return sample, ticks


@dataclass
class _Series:
    """The ring of one sandbox and what its next sample needs."""

    samples: deque[MetricSample]
    next_due: float
    ticks: tuple[int, int] | None = None
    inflight: asyncio.Task[MetricSample | None] | None = None
    failures: int = 0
    """Failed samples in a row: each doubles the wait before the next (up to ``MAX_BACKOFF``)."""


class MetricsSampler:
    """Samples the sandboxes that ``sandboxes()`` lists (running and paused, as the manager's
    ``list``); ``cpu_count(sb)`` is a sandbox's vCPU count. :meth:`start` / :meth:`stop`."""

    def __init__(
        self,
        sandboxes: Callable[[], Iterable[Sampled]],
        cpu_count: Callable[[Any], int],
        *,
        interval_s: float = INTERVAL_S,
        keep: int = KEEP,
        max_per_s: float = MAX_PER_S,
        max_inflight: int = MAX_INFLIGHT,
        timeout_s: float = TIMEOUT_S,
        tick_s: float = TICK_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_s <= 0 or keep < 1 or max_per_s <= 0 or max_inflight < 1 or timeout_s <= 0 or tick_s <= 0:
            raise ValueError("interval_s, keep, max_per_s, max_inflight, timeout_s and tick_s must be positive")
        self._list = sandboxes
        self._cpu_count = cpu_count
        self.interval_s = interval_s
        self.keep = keep
        self.max_per_s = max_per_s
        self.timeout_s = timeout_s
        self.tick_s = tick_s
        self._clock = clock
        self._series: dict[str, _Series] = {}
        self._slots = asyncio.Semaphore(max_inflight)
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.failures = 0
        """Samples that failed (agent error, timeout, bad answer) since start: for tests and logs."""

    # -- reading ------------------------------------------------------------------------------

    def samples(self, sandbox_id: str, start: float | None = None, end: float | None = None) -> list[MetricSample]:
        """The samples of a sandbox taken within [start, end] (seconds since the epoch), oldest first."""
        series = self._series.get(sandbox_id)
        if series is None:
            return []
        return [s for s in series.samples if (start is None or s.t >= start) and (end is None or s.t <= end)]

    def latest(self, sandbox_id: str) -> MetricSample | None:
        series = self._series.get(sandbox_id)
        return series.samples[-1] if series is not None and series.samples else None

    def interval_for(self, running: int) -> float:
        """Seconds between two samples of one sandbox when ``running`` sandboxes are sampled."""
        return max(self.interval_s, running / self.max_per_s)

    # -- sampling -----------------------------------------------------------------------------

    async def sample_now(self, sb: Sampled) -> MetricSample | None:
        """Sample ``sb`` at once (joining a sample already in flight); None if it is paused or
        ending or its agent did not answer in time."""
        if sb.paused or sb.ending:
            return None
        now = time.monotonic()
        series = self._series_of(sb.id, now)
        task = series.inflight
        if task is None:
            series.next_due = now + self.interval_s
            task = self._launch(sb, series)
        return await asyncio.shield(task)

    def _series_of(self, sandbox_id: str, now: float) -> _Series:
        series = self._series.get(sandbox_id)
        if series is None:
            series = self._series[sandbox_id] = _Series(deque(maxlen=self.keep), next_due=now)
        return series

    def _launch(self, sb: Sampled, series: _Series) -> asyncio.Task[MetricSample | None]:
        task = asyncio.get_running_loop().create_task(self._sample(sb, series), name=f"metrics-{sb.id}")
        series.inflight = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _sample(self, sb: Sampled, series: _Series) -> MetricSample | None:
        try:
            async with self._slots:
                try:
                    raw = await asyncio.wait_for(sb.agent.metrics(), self.timeout_s)
                    sample, ticks = parse_sample(raw, self._clock(), self._cpu_count(sb), series.ticks)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - an agent that fails, hangs or lies: no sample
                    self.failures += 1
                    series.failures += 1
                    series.next_due = time.monotonic() + self.interval_s * min(2 ** series.failures, MAX_BACKOFF)
                    log.debug("no metrics sample of sandbox %s: %s: %s", sb.id, type(e).__name__, e)
                    return None
            series.failures = 0
            if self._series.get(sb.id) is not series or sb.paused:
                return None  # ended (or paused) while we asked: its numbers are not kept
            series.samples.append(sample)
            series.ticks = ticks
            return sample
        finally:
            if series.inflight is asyncio.current_task():
                series.inflight = None

    def tick(self) -> list[str]:
        """One pass: forget sandboxes no longer listed, start the samples that are due (within
        the budget); the ids of the sandboxes whose sample started."""
        now = time.monotonic()
        listed = {sb.id: sb for sb in self._list()}
        for gone in [i for i in self._series if i not in listed]:
            series = self._series.pop(gone)
            if series.inflight is not None:
                series.inflight.cancel()
        running = [sb for sb in listed.values() if not sb.paused and not sb.ending]
        interval = self.interval_for(len(running))
        due: list[tuple[float, Sampled, _Series]] = []
        for sb in running:
            series = self._series_of(sb.id, now)
            if series.inflight is None and series.next_due <= now:
                due.append((series.next_due, sb, series))
        due.sort(key=lambda x: x[0])
        budget = max(1, math.floor(self.max_per_s * self.tick_s))
        started = []
        for _, sb, series in due[:budget]:
            series.next_due = now + interval
            self._launch(sb, series)
            started.append(sb.id)
        return started

    async def run_once(self) -> list[str]:
        """:meth:`tick`, then wait for the samples it started (tests, and callers that want fresh figures)."""
        started = self.tick()
        tasks = [t for i in started if (series := self._series.get(i)) and (t := series.inflight) is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        return started

    async def _run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - sampling must never stop for one bad pass
                log.exception("metrics sampling pass failed")
            await asyncio.sleep(self.tick_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="trenvx-metrics-sampler")

    async def stop(self) -> None:
        """Stop sampling; samples in flight are cancelled. The rings are kept (for reading)."""
        tasks = [t for t in (self._task, *self._tasks) if t is not None]
        self._task = None
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


__all__ = ["BadSample", "MetricSample", "MetricsSampler", "Sampled", "parse_sample"]
