"""The server's record of its sandboxes: one SQLite file under ``data_root/run/``.

Every sandbox the server starts is written here before it is handed to a client, with what a
restarted server needs to find it again: the VMM's pid (and that process's start time, so a
recycled pid is never mistaken for it), which VMM it is (QEMU is re-attached through its QMP
socket, Firecracker and Cloud Hypervisor through their API sockets), the host port of its agent
(QEMU), its access token, its build and workdir, its deadline. Ended sandboxes stay for a while so that ``sandbox ls -a`` can show them and a
404 can say why a sandbox is gone: the manager prunes them (:meth:`StateStore.prune_ended`) by age
(``ended_retention_s``) and by number (``ended_retention_max``). An older database is migrated when opened (columns added with defaults for its rows).

Writes are tiny and synchronous (a few hundred microseconds with WAL); the database is owned by
one server at a time (the server holds ``run/server.lock``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 4
"""1: the first schema; 2: column ``vmm_type`` (rows of version 1 are QEMU sandboxes); 3: column
``pause`` (what a pause to disk stored; rows of before were never paused to disk); 4: column
``lifecycle`` (auto-pause and auto-resume; rows of before are killed at their timeout)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id              TEXT PRIMARY KEY,
    template        TEXT NOT NULL,
    build_id        TEXT NOT NULL,
    build_path      TEXT NOT NULL,
    state           TEXT NOT NULL,
    end_reason      TEXT NOT NULL DEFAULT '',
    pid             INTEGER NOT NULL,
    pid_started_at  REAL NOT NULL,
    agent_port      INTEGER NOT NULL,
    access_token    TEXT NOT NULL,
    workdir         TEXT NOT NULL,
    created_at      REAL NOT NULL,
    end_at          REAL NOT NULL,
    ended_at        REAL,
    vcpu            INTEGER NOT NULL,
    mem_mb          INTEGER NOT NULL,
    disk_mb         INTEGER NOT NULL,
    metadata        TEXT NOT NULL,
    env_vars        TEXT NOT NULL,
    start_times     TEXT NOT NULL,
    ports           TEXT NOT NULL DEFAULT '{}',
    vmm_type        TEXT NOT NULL DEFAULT 'qemu',
    pause           TEXT NOT NULL DEFAULT '{}',
    lifecycle       TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS sandboxes_state ON sandboxes(state);
"""

_ADDED_COLUMNS = {
    "vmm_type": "TEXT NOT NULL DEFAULT 'qemu'",
    "pause": "TEXT NOT NULL DEFAULT '{}'",
    "lifecycle": "TEXT NOT NULL DEFAULT '{}'",
}
"""Columns added after version 1, with the definition that fills them in existing rows."""

RUNNING = "running"
PAUSED = "paused"
EXITED = "exited"


@dataclass
class SandboxRecord:
    """One row: everything needed to list a sandbox and to re-attach to its VM after a restart."""

    id: str
    template: str
    build_id: str
    build_path: str
    pid: int
    pid_started_at: float
    agent_port: int
    access_token: str
    workdir: str
    created_at: float
    end_at: float
    vcpu: int
    mem_mb: int
    disk_mb: int
    metadata: dict[str, str] = field(default_factory=dict)
    env_vars: dict[str, str] = field(default_factory=dict)
    start_times: dict[str, float] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)
    state: str = RUNNING
    end_reason: str = ""
    ended_at: float | None = None
    vmm_type: str = "qemu"
    """The VMM running the sandbox (``VmmType`` value: qemu, firecracker, cloud-hypervisor)."""
    pause: dict[str, Any] = field(default_factory=dict)
    """A sandbox paused to disk: what its pause stored (:class:`trenvx.sandbox.suspend.PauseInfo`);
    it has no VMM process then (``pid`` 0). Empty otherwise."""
    lifecycle: dict[str, Any] = field(default_factory=dict)
    """What its timeout does and whether traffic resumes it when paused
    (:class:`trenvx.sandbox.lifecycle.LifecyclePolicy`); empty: the default (killed at its timeout)."""

    _JSON = ("metadata", "env_vars", "start_times", "ports", "pause", "lifecycle")

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        for k in self._JSON:
            row[k] = json.dumps({str(a): b for a, b in row[k].items()})
        return row

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "SandboxRecord":
        d = dict(row)
        for k in cls._JSON:
            d[k] = json.loads(d[k] or "{}")
        d["ports"] = {int(a): int(b) for a, b in d["ports"].items()}
        return cls(**{k: v for k, v in d.items() if k in _FIELDS})


_FIELDS = {f for f in SandboxRecord.__dataclass_fields__ if not f.startswith("_")}


class StateStore:
    """SQLite-backed table of sandboxes. Not thread-safe: use it from the event loop's thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # tokens and env vars live here
        os.close(fd)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"state database {path} has schema version {version}, newer than this trenvx's {SCHEMA_VERSION}; "
                "run the newer trenvx, or stop every sandbox and remove the file"
            )
        self._db.executescript(_SCHEMA)
        self._migrate()
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _migrate(self) -> None:
        """Add the columns an older database lacks (their defaults describe its existing rows)."""
        have = {row["name"] for row in self._db.execute("PRAGMA table_info(sandboxes)")}
        for name, definition in _ADDED_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE sandboxes ADD COLUMN {name} {definition}")

    def close(self) -> None:
        self._db.close()

    def put(self, rec: SandboxRecord) -> None:
        row = rec.to_row()
        cols = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)
        self._db.execute(f"INSERT OR REPLACE INTO sandboxes ({cols}) VALUES ({marks})", row)

    def get(self, sandbox_id: str) -> SandboxRecord | None:
        row = self._db.execute("SELECT * FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
        return SandboxRecord.from_row(row) if row else None

    def running(self) -> list[SandboxRecord]:
        """Sandboxes whose VM should exist (running, or paused in memory by a server of before pauses to disk)."""
        return [r for r in self._select("state != ?", (EXITED,)) if not r.pause]

    def ended(self, since: float | None = None) -> list[SandboxRecord]:
        """Ended sandboxes, oldest first; with ``since``, only those that ended at or after it."""
        if since is None:
            return list(self._select("state = ?", (EXITED,)))
        return list(self._select("state = ? AND ended_at >= ?", (EXITED, since)))

    def all(self) -> list[SandboxRecord]:
        return list(self._select("1", ()))

    def _select(self, where: str, args: tuple[Any, ...]) -> Iterator[SandboxRecord]:
        for row in self._db.execute(f"SELECT * FROM sandboxes WHERE {where} ORDER BY created_at, id", args):
            yield SandboxRecord.from_row(row)

    def set_end_at(self, sandbox_id: str, end_at: float) -> None:
        self._db.execute("UPDATE sandboxes SET end_at = ? WHERE id = ?", (end_at, sandbox_id))

    def set_state(self, sandbox_id: str, state: str) -> None:
        self._db.execute("UPDATE sandboxes SET state = ? WHERE id = ?", (state, sandbox_id))

    def paused(self) -> list[SandboxRecord]:
        """Sandboxes paused to disk (no VMM process: a record and files)."""
        return [r for r in self._select("state = ?", (PAUSED,)) if r.pause]

    def set_ports(self, sandbox_id: str, ports: dict[int, int]) -> None:
        self._db.execute(
            "UPDATE sandboxes SET ports = ? WHERE id = ?",
            (json.dumps({str(k): v for k, v in ports.items()}), sandbox_id),
        )

    def mark_ended(self, sandbox_id: str, reason: str, at: float | None = None) -> None:
        self._db.execute(
            "UPDATE sandboxes SET state = ?, end_reason = ?, ended_at = ?, access_token = '', env_vars = '{}', "
            "pause = '{}' WHERE id = ?",
            (EXITED, reason, at if at is not None else time.time(), sandbox_id),
        )

    def delete(self, sandbox_id: str) -> None:
        self._db.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))

    def prune_ended(self, older_than: float, keep: int | None = None) -> int:
        """Forget ended sandboxes: those that ended before ``older_than`` (or at an unknown time), and
        with ``keep``, all but the ``keep`` that ended last. Returns how many rows were removed."""
        removed = self._db.execute(
            "DELETE FROM sandboxes WHERE state = ? AND (ended_at IS NULL OR ended_at < ?)", (EXITED, older_than),
        ).rowcount
        if keep is not None:
            removed += self._db.execute(
                "DELETE FROM sandboxes WHERE state = ? AND id NOT IN "
                "(SELECT id FROM sandboxes WHERE state = ? ORDER BY ended_at DESC, id DESC LIMIT ?)",
                (EXITED, EXITED, max(0, keep)),
            ).rowcount
        return removed
