"""Which sandbox this is: noticing a restore from a snapshot, so that kernels get fresh random state.

Every sandbox restored from one template snapshot starts with the kernels' memory of that
snapshot, so their random generators are in the same state: ``random.random()`` would give
the same numbers in all of them. The guest agent's ``/init`` gives each restored sandbox its
own ``/etc/machine-id`` (a tiny file in memory), so the interpreter reads it before every
execution and compares it with what it saw the time before; when it differs, every running
kernel is marked to be reseeded, which each does (under its own lock) before its next cell
runs (:func:`reseed_if_identity_changed`). A kernel can only run code through an execution,
so reseeding it before its next one is as good as reseeding it at once, and a kernel busy
with a long cell is not waited for.

Not carried over: the environment that ``/init`` sets for processes started after it. The
kernels were started before the snapshot, so they keep the environment they were started
with; ``env_vars`` of ``/execute`` is the way to pass values to a cell. Python's hash seed
(``PYTHONHASHSEED``) is fixed per process and stays shared too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

DEFAULT_MACHINE_ID = Path("/etc/machine-id")


class IdentityWatch:
    """Reads the machine id and says whether it changed since the last look."""

    def __init__(self, path: Path = DEFAULT_MACHINE_ID) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen = self.read()

    def read(self) -> str | None:
        try:
            return self.path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return None

    def changed(self) -> bool:
        """True once per change of the machine id (the first look after it changed)."""
        current = self.read()
        with self._lock:
            if current == self._seen:
                return False
            self._seen = current
            return True


class Reseedable(Protocol):
    def request_reseed(self) -> None: ...


def reseed_if_identity_changed(watch: IdentityWatch, kernels: Iterable[Reseedable]) -> bool:
    """Before an execution: when the sandbox's identity changed since the previous one (it was
    restored from a snapshot, or forked), mark every running kernel to reseed its random state
    before its next cell. Returns whether it did."""
    if not watch.changed():
        return False
    for kernel in kernels:
        kernel.request_reseed()
    return True
