"""Small pieces of the backend: state store, admission, timeouts and reaper, auth, error mapping,
proxy target parsing, the server lock."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from trenvx.sandbox.lifecycle import InvalidTimeout, Reaper, check_timeout, extended_deadline
from trenvx.sandbox.limits import Admission, LimitReached, Limits, OutOfMemory
from trenvx.sandbox.manager import SandboxNotFound
from trenvx.sandbox.state import SandboxRecord, StateStore
from trenvx.server.auth import key_matches
from trenvx.server.errors import describe_validation_error, status_for
from trenvx.server.proxy import BadTarget, target_of
from trenvx.server.routes_sandboxes import parse_metadata_query
from trenvx.server.runner import ServerError, acquire_lock
from trenvx.template.store import TemplateNotFound


def rec(i: str, **kw) -> SandboxRecord:
    base = dict(id=i, template="t", build_id="b", build_path="/p", pid=1, pid_started_at=1.0, agent_port=2,
                access_token="tok", workdir="/w", created_at=time.time(), end_at=time.time() + 60, vcpu=1,
                mem_mb=256, disk_mb=10, metadata={"a": "b"}, env_vars={"X": "1"}, start_times={"init": 0.1},
                ports={8000: 4000})
    base.update(kw)
    return SandboxRecord(**base)


def test_state_store_roundtrip_end_and_prune(tmp_path: Path) -> None:
    path = tmp_path / "run" / "state.sqlite"
    s = StateStore(path)
    assert path.stat().st_mode & 0o077 == 0, "tokens live here: owner-only"
    s.put(rec("a"))
    s.put(rec("b"))
    got = s.get("a")
    assert got == rec("a", created_at=got.created_at, end_at=got.end_at)
    s.set_end_at("a", 123.0)
    s.set_ports("a", {1: 2})
    s.set_state("b", "paused")
    assert s.get("a").end_at == 123.0 and s.get("a").ports == {1: 2}
    assert {r.id for r in s.running()} == {"a", "b"}
    s.mark_ended("a", "killed", at=100.0)
    assert [r.id for r in s.running()] == ["b"]
    ended = s.get("a")
    assert ended.state == "exited" and ended.end_reason == "killed" and ended.access_token == "" and ended.env_vars == {}
    assert s.prune_ended(older_than=50.0) == 0
    assert s.prune_ended(older_than=200.0) == 1 and s.get("a") is None
    s.close()
    s2 = StateStore(path)  # reopens with its schema
    assert [r.id for r in s2.all()] == ["b"]
    s2.close()



def test_state_store_prunes_ended_by_age_and_by_count(tmp_path: Path) -> None:
    """Ended rows go once older than the cutoff (or of an unknown end time), and beyond ``keep`` the
    ones that ended first go; running and paused rows are never touched."""
    s = StateStore(tmp_path / "state.sqlite")
    for i in range(6):
        s.put(rec(f"e{i}"))
        s.mark_ended(f"e{i}", "killed", at=1000.0 + i)  # e0 ended first, e5 last
    s.put(rec("run"))
    s.put(rec("paused", state="paused", pause={"kind": "memory", "paused_at": 1.0, "timeout_left": 5.0}))
    s.put(rec("unknown", state="exited"))  # ended, no end time: not kept forever
    assert [r.id for r in s.ended(since=1003.0)] == ["e3", "e4", "e5"], "since: only those ended at or after it"
    assert s.prune_ended(older_than=1001.0) == 2  # e0, and the one of unknown end time
    assert {r.id for r in s.ended()} == {"e1", "e2", "e3", "e4", "e5"}
    assert s.prune_ended(older_than=0.0, keep=3) == 2, "all but the 3 that ended last"
    assert {r.id for r in s.ended()} == {"e3", "e4", "e5"}
    assert s.prune_ended(older_than=0.0, keep=3) == 0
    assert s.prune_ended(older_than=0.0, keep=0) == 3 and s.ended() == []
    assert {r.id for r in s.all()} == {"run", "paused"}
    s.close()


SCHEMA_V1 = """
CREATE TABLE sandboxes (
    id TEXT PRIMARY KEY, template TEXT NOT NULL, build_id TEXT NOT NULL, build_path TEXT NOT NULL,
    state TEXT NOT NULL, end_reason TEXT NOT NULL DEFAULT '', pid INTEGER NOT NULL, pid_started_at REAL NOT NULL,
    agent_port INTEGER NOT NULL, access_token TEXT NOT NULL, workdir TEXT NOT NULL, created_at REAL NOT NULL,
    end_at REAL NOT NULL, ended_at REAL, vcpu INTEGER NOT NULL, mem_mb INTEGER NOT NULL, disk_mb INTEGER NOT NULL,
    metadata TEXT NOT NULL, env_vars TEXT NOT NULL, start_times TEXT NOT NULL, ports TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX sandboxes_state ON sandboxes(state);
INSERT INTO sandboxes VALUES ('old', 't', 'b', '/p', 'running', '', 1, 1.0, 2, 'tok', '/w', 1.0, 2.0, NULL,
                              1, 256, 10, '{}', '{}', '{}', '{}');
PRAGMA user_version=1;
"""


def test_state_store_records_the_vmm_and_migrates_a_version_1_database(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "state.sqlite"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_V1)
    db.close()
    s = StateStore(path)
    assert s.get("old").vmm_type == "qemu", "rows of version 1 are QEMU sandboxes"
    s.put(rec("fc", vmm_type="firecracker"))
    assert s.get("fc").vmm_type == "firecracker" and {r.id for r in s.running()} == {"old", "fc"}
    s.close()
    s = StateStore(path)  # a migrated database reopens as it is
    assert s.get("fc").vmm_type == "firecracker" and s.get("old").vmm_type == "qemu"
    assert s.get("old").pause == {}, "rows of before pauses to disk were never paused to disk"
    # a sandbox paused to disk has no VMM: it is not among those whose VM should exist
    s.put(rec("p", state="paused", pause={"kind": "memory", "paused_at": 1.0, "timeout_left": 5.0}))
    assert {r.id for r in s.running()} == {"old", "fc"} and [r.id for r in s.paused()] == ["p"]
    assert s.get("p").pause["kind"] == "memory"
    s.mark_ended("p", "killed")
    assert s.get("p").pause == {} and s.paused() == []
    assert s.get("old").lifecycle == {}, "rows of before lifecycles are killed at their timeout"
    s.put(rec("l", lifecycle={"auto_pause": True, "auto_resume": True, "timeout_s": 30.0}))
    s.close()
    s = StateStore(path)
    assert s.get("l").lifecycle == {"auto_pause": True, "auto_resume": True, "timeout_s": 30.0}
    s.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 4
    db.execute("PRAGMA user_version=5")
    db.commit()
    db.close()
    with pytest.raises(RuntimeError, match="schema version 5, newer than this trenvx's 4; run the newer trenvx"):
        StateStore(path)


def test_admission_counts_slots_and_memory() -> None:
    free = [2048 << 20]
    a = Admission(Limits(max_sandboxes=3, max_per_template=2, headroom_mb=1024), available=lambda: free[0])
    with a.starting("t", 512):
        with a.starting("t", 512):
            with pytest.raises(LimitReached, match="template 't'"):
                a.check("t", 1)
            with pytest.raises(OutOfMemory, match="only 1024 MiB"):  # 2048 - 2*512 reserved
                a.check("u", 512)
    assert a.total == 0
    a.add_running("t")
    a.add_running("t")
    a.add_running("u")
    with pytest.raises(LimitReached, match="maximum of 3"):
        a.check("v", 1)
    a.remove_running("u")
    a.check("v", 1)
    free[0] = 100 << 20
    with pytest.raises(OutOfMemory, match="memory_headroom_mb"):
        a.check("v", 1)


@given(st.one_of(st.integers(), st.floats(allow_nan=True), st.booleans(), st.text(), st.none()))
def test_check_timeout_accepts_exactly_1_to_max(value) -> None:
    valid = (isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and 1 <= value <= 3600)
    if valid:
        assert check_timeout(value, 3600) == float(value)
    else:
        with pytest.raises(InvalidTimeout):
            check_timeout(value, 3600)  # type: ignore[arg-type]


def test_extended_deadline_never_shortens() -> None:
    assert extended_deadline(1000.0, 10, now=500.0) == 1000.0
    assert extended_deadline(1000.0, 600, now=500.0) == 1100.0


async def test_reaper_expires_due_ids_and_survives_errors() -> None:
    deadlines = {"a": 0.0, "b": 0.0, "c": time.time() + 60}
    expired: list[str] = []

    async def expire(i: str) -> None:
        deadlines.pop(i)
        if i == "b":
            raise RuntimeError("kill failed")
        expired.append(i)

    r = Reaper(0.02, lambda now: [i for i, d in deadlines.items() if d <= now], expire)
    r.start()
    await asyncio.sleep(0.15)
    await r.stop()
    assert expired == ["a"] and set(deadlines) == {"c"}
    assert await r.tick() == []


def test_api_key_comparison() -> None:
    assert key_matches("", None) and key_matches("", "anything")
    assert key_matches("s3cret", "s3cret")
    assert not key_matches("s3cret", None) and not key_matches("s3cret", "s3cre") and not key_matches("s3cret", "")
    assert not key_matches("s3cret", "s3cret\udcff")


def test_error_mapping() -> None:
    assert status_for(SandboxNotFound("x"))[0] == 404
    assert status_for(TemplateNotFound("x"))[0] == 404
    assert status_for(InvalidTimeout("x"))[0] == 400
    assert status_for(LimitReached("x")) == (429, {"Retry-After": "5"})
    assert status_for(OutOfMemory("x"))[0] == 503
    assert status_for(ValueError("x")) is None
    msg = describe_validation_error([{"loc": ("body", "timeout"), "msg": "Input should be a valid integer", "type": "int_type"}])
    assert msg == "body field timeout: Input should be a valid integer"
    assert describe_validation_error([{"loc": ("body", 5), "msg": "x", "type": "json_invalid"}]) == "body: is not valid JSON"


def scope(headers: dict[str, str]) -> dict:
    return {"type": "http", "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}


def test_proxy_target_from_headers_or_host() -> None:
    assert target_of(scope({"E2b-Sandbox-Id": "abc", "E2b-Sandbox-Port": "49983"}), "localhost") == ("abc", 49983)
    assert target_of(scope({"Host": "8000-abc123.localhost:5000"}), "localhost") == ("abc123", 8000)
    assert target_of(scope({"Host": "8000-abc123.example.com"}), "example.com") == ("abc123", 8000)
    assert target_of(scope({"Host": "8000-abc123.other.com"}), "example.com") is None
    assert target_of(scope({"Host": "localhost:5000"}), "localhost") is None
    assert target_of(scope({}), "localhost") is None
    for bad in ({"E2b-Sandbox-Id": "abc"}, {"E2b-Sandbox-Port": "1"},
                {"E2b-Sandbox-Id": "abc", "E2b-Sandbox-Port": "http"},
                {"E2b-Sandbox-Id": "abc", "E2b-Sandbox-Port": "70000"}, {"Host": "99999-abc.localhost"}):
        with pytest.raises(BadTarget):
            target_of(scope(bad), "localhost")


def test_metadata_query_is_e2b_double_encoded() -> None:
    import urllib.parse

    wanted = {"user id": "a&b=c", "k": "v/ü"}
    q = urllib.parse.urlencode({urllib.parse.quote(k): urllib.parse.quote(v) for k, v in wanted.items()})
    assert parse_metadata_query(q) == wanted
    assert parse_metadata_query(None) == {}


def test_second_server_on_a_data_root_is_refused(tmp_path: Path) -> None:
    lock = acquire_lock(tmp_path / "run")
    with pytest.raises(ServerError, match=r"already running on data_root .*\(pid \d+\)|pid \d+"):
        acquire_lock(tmp_path / "run")
    lock.release()
    acquire_lock(tmp_path / "run").release()
