"""Admission control: may one more sandbox of a template start on this host right now?

Two kinds of refusal, which the HTTP layer maps to different status codes:

- :class:`LimitReached` (429): the configured number of sandboxes per host or per template is
  reached. Retrying later, after sandboxes end, helps.
- :class:`OutOfMemory` (503): starting the sandbox could push the host into swap or the OOM
  killer. A restored sandbox shares its template's memory copy-on-write, so it costs little at
  first. Each starting sandbox reserves 1.5x the measured cost (PSS) of its template's sandboxes
  (its whole ``mem_mb`` until one was measured), and ``memory_headroom_mb`` must stay available
  after that and after what concurrent, not yet finished creates have reserved. The headroom is
  what absorbs sandboxes that grow later.

Slots are reserved before the (asynchronous) restore starts and released when it ends, so a
burst of concurrent creates cannot overshoot the limits.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psutil

MiB = 1 << 20


class AdmissionError(Exception):
    """The sandbox may not start now. The message says which limit and what to do."""


class LimitReached(AdmissionError):
    pass


class OutOfMemory(AdmissionError):
    pass


def available_memory_bytes() -> int:
    """Memory the host can give without swapping (MemAvailable)."""
    return int(psutil.virtual_memory().available)


@dataclass
class Limits:
    max_sandboxes: int
    max_per_template: int
    headroom_mb: int


class Admission:
    """Counts running and starting sandboxes; reserves a slot and memory for each new one."""

    def __init__(self, limits: Limits, available: Callable[[], int] = available_memory_bytes) -> None:
        self.limits = limits
        self._available = available
        self._running: Counter[str] = Counter()
        self._starting: Counter[str] = Counter()
        self._reserved_bytes = 0
        self._cost: dict[str, float] = {}

    @property
    def total(self) -> int:
        return sum(self._running.values()) + sum(self._starting.values())

    def count(self, template: str) -> int:
        return self._running[template] + self._starting[template]

    def check(self, template: str, mem_mb: int) -> None:
        """``mem_mb``: what the sandbox reserves (see :meth:`reserve_mb`)."""
        self._check(template, mem_mb)

    def _check(self, template: str, mem_mb: int) -> None:
        """Raise :class:`LimitReached` or :class:`OutOfMemory` if the sandbox may not start."""
        lim = self.limits
        if self.total >= lim.max_sandboxes:
            raise LimitReached(
                f"this host runs its maximum of {lim.max_sandboxes} sandboxes "
                "(orchestrator.max_sandboxes); kill some or wait for their timeouts"
            )
        if self.count(template) >= lim.max_per_template:
            raise LimitReached(
                f"template {template!r} has its maximum of {lim.max_per_template} sandboxes "
                "(orchestrator.max_sandboxes_per_template); kill some or wait for their timeouts"
            )
        available = self._available() - self._reserved_bytes
        need = mem_mb * MiB + lim.headroom_mb * MiB
        if available < need:
            raise OutOfMemory(
                f"not enough free memory for a sandbox of {template!r}: it may use {mem_mb} MiB and "
                f"{lim.headroom_mb} MiB must stay free (orchestrator.memory_headroom_mb), but only "
                f"{max(available, 0) // MiB} MiB are available; kill sandboxes or free memory"
            )

    def observe_cost(self, template: str, pss_bytes: int) -> None:
        """A measured memory cost (PSS) of one sandbox of ``template``; kept as a moving average."""
        if pss_bytes <= 0:
            return
        old = self._cost.get(template)
        self._cost[template] = float(pss_bytes) if old is None else 0.8 * old + 0.2 * pss_bytes

    def reserve_mb(self, template: str, mem_mb: int) -> int:
        """What a starting sandbox reserves: 1.5x its template's measured cost (at least 64 MiB),
        or its whole guest RAM until a cost was measured. A restored sandbox shares its template's
        pages, so reserving the whole RAM refused bursts that fit easily (100 x 256 MiB > 24 GiB)."""
        cost = self._cost.get(template)
        if cost is None:
            return mem_mb
        return int(min(mem_mb, max(64, 1.5 * cost / MiB)))

    def headroom_mb(self) -> int:
        """Memory a new sandbox may still take, in MiB: what is available, less the reservations of
        sandboxes starting and the configured headroom (what a cluster's placement weighs)."""
        return max(0, (self._available() - self._reserved_bytes - self.limits.headroom_mb * MiB) // MiB)

    def has_memory_for(self, mem_mb: int) -> bool:
        """Whether ``mem_mb`` more can be used while keeping the headroom (for pools: no slot is taken)."""
        return self._available() - self._reserved_bytes - self.limits.headroom_mb * MiB >= mem_mb * MiB

    @contextlib.contextmanager
    def starting(self, template: str, mem_mb: int) -> Iterator[None]:
        """Check, then hold a slot and the memory reservation while the sandbox starts."""
        mem_mb = self.reserve_mb(template, mem_mb)
        self.check(template, mem_mb)
        self._starting[template] += 1
        self._reserved_bytes += mem_mb * MiB
        try:
            yield
        finally:
            self._starting[template] -= 1
            self._reserved_bytes -= mem_mb * MiB

    def add_running(self, template: str) -> None:
        self._running[template] += 1

    def remove_running(self, template: str) -> None:
        if self._running[template] > 0:
            self._running[template] -= 1
