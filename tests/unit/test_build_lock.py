"""Two builds of one template at once: one builds, the other waits for it (saying whom it waits
for) and reuses its build when the inputs are the same, or builds after it when they differ; a
builder that died holding the lock blocks no one. The expensive stages are faked
(tests/unit/build_lock_fakes.py); each build is a process of its own, as two template-manager runs
or a server and a test session are. tests/e2e/test_build_lock.py does it with real builds.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_asyncio

from .build_lock_fakes import builder
from trenvx.filelock import AsyncFileLock, lock_holder
from trenvx.template.store import TemplateStore

REPO = Path(__file__).resolve().parents[2]
NAME = "lockt"
BOUND_S = 60.0


@dataclass
class Run:
    proc: asyncio.subprocess.Process
    log: Path

    async def result(self) -> dict[str, Any]:
        out, err = await asyncio.wait_for(self.proc.communicate(), BOUND_S)
        assert self.proc.returncode == 0, err.decode()
        return json.loads(out)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


class Builds:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data_root = tmp / "data"
        self.journal = tmp / "journal"
        self.gate = tmp / "gate"
        self.n = 0
        self.runs: list[Run] = []

    async def start(self, **spec: Any) -> Run:
        self.n += 1
        log = self.tmp / f"build{self.n}.log"
        full = {"data_root": str(self.data_root), "name": NAME, "journal": str(self.journal), "gate": str(self.gate),
                "log": str(log), **spec}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.unit.build_lock_fakes", json.dumps(full), cwd=REPO,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        run = Run(proc, log)
        self.runs.append(run)
        return run

    async def kill_left(self) -> None:
        """A failed test leaves builds waiting at the gate: end them."""
        for run in self.runs:
            if run.proc.returncode is None:
                run.proc.kill()
                await run.proc.wait()

    def journal_lines(self) -> list[str]:
        return self.journal.read_text().splitlines() if self.journal.exists() else []

    def spec(self, **spec: Any) -> dict[str, Any]:
        return {"data_root": str(self.data_root), "name": NAME, "journal": str(self.journal), "gate": str(self.gate),
                **spec}

    def staging(self) -> list[str]:
        return sorted(p.name for p in (self.data_root / "templates" / NAME).glob(".*.partial"))


async def until(cond: Any, what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture
async def builds(tmp_path: Path) -> AsyncIterator[Builds]:
    b = Builds(tmp_path)
    try:
        yield b
    finally:
        await b.kill_left()


async def first_holds_second_waits(builds: Builds, first: dict[str, Any], second: dict[str, Any]) -> tuple[Run, Run]:
    """Start a build and hold it in its middle; start another; see it wait; let both finish."""
    a = await builds.start(**first)
    await until(lambda: len(builds.journal_lines()) == 1, "the first build's start")
    b = await builds.start(**second)
    waiting = f"waiting for the build of {NAME} by pid {a.proc.pid}"
    await until(lambda: waiting in b.log_text(), f"{waiting!r} in the second build's log")
    assert len(builds.journal_lines()) == 1, "the second build started while the first held the lock"
    builds.gate.touch()
    return a, b


async def test_the_same_inputs_build_once(builds: Builds) -> None:
    a, b = await first_holds_second_waits(builds, {}, {})
    ra, rb = await a.result(), await b.result()
    assert (ra["skipped"], rb["skipped"]) == (False, True)
    assert rb["build_id"] == ra["build_id"]
    assert builds.journal_lines() == [f"start {a.proc.pid} {ra['build_id']}", f"end {a.proc.pid} {ra['build_id']}"]
    store = TemplateStore(builder(builds.spec()).data_root)
    assert store.current(NAME).build_id == ra["build_id"] and builds.staging() == []


async def test_forced_builds_at_once_build_once(builds: Builds) -> None:
    """``force`` asks for a build made after the request: the one it waited for is."""
    a, b = await first_holds_second_waits(builds, {"force": True}, {"force": True})
    ra, rb = await a.result(), await b.result()
    assert (ra["skipped"], rb["skipped"], rb["build_id"]) == (False, True, ra["build_id"])
    # Forced again with nothing running: it builds anew (a distinct build id in the same second too).
    rc = await (await builds.start(force=True)).result()
    assert not rc["skipped"] and rc["build_id"] != ra["build_id"]


async def test_different_inputs_build_one_after_the_other(builds: Builds) -> None:
    a, b = await first_holds_second_waits(builds, {"variant": "one"}, {"variant": "two"})
    ra, rb = await a.result(), await b.result()
    assert (ra["skipped"], rb["skipped"]) == (False, False) and ra["build_id"] != rb["build_id"]
    assert [line.split()[:2] for line in builds.journal_lines()] == [
        ["start", str(a.proc.pid)], ["end", str(a.proc.pid)], ["start", str(b.proc.pid)], ["end", str(b.proc.pid)]]
    store = TemplateStore(builder(builds.spec()).data_root)
    assert store.current(NAME).build_id == rb["build_id"]  # the last published is current
    assert [p.name for p in store.builds(NAME)] == sorted([ra["build_id"], rb["build_id"]])


async def test_a_killed_builder_blocks_no_one(builds: Builds) -> None:
    a = await builds.start()
    await until(lambda: len(builds.journal_lines()) == 1, "the first build's start")
    stale = builds.staging()
    assert len(stale) == 1
    os.kill(a.proc.pid, signal.SIGKILL)  # dies holding the lock, its staging directory left behind
    await a.proc.wait()
    builds.gate.touch()
    rb = await (await builds.start()).result()
    assert not rb["skipped"]
    assert builds.staging() == []  # the dead builder's staging directory was removed
    assert lock_holder(builds.data_root / "templates" / NAME / ".build.lock") is not None


async def test_two_builds_in_one_process_build_once(builds: Builds) -> None:
    """A server building a template for its API while something else in it builds the same one."""
    builds.gate.touch()
    one, two = builder(builds.spec()), builder(builds.spec())
    r1, r2 = await asyncio.gather(one.build(NAME), two.build(NAME))
    assert sorted([r1.skipped, r2.skipped]) == [False, True] and r1.build.build_id == r2.build.build_id
    assert len([line for line in builds.journal_lines() if line.startswith("start")]) == 1


async def test_the_lock_records_its_holder_and_tells_the_waiter(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.lock"
    told: list[int | None] = []
    async with AsyncFileLock(path) as first:
        assert lock_holder(path) == os.getpid() and not first.waited
        second = AsyncFileLock(path, poll_s=0.01, on_wait=told.append)
        entered = asyncio.Event()

        async def take() -> None:
            async with second:
                entered.set()

        task = asyncio.create_task(take())
        await until(lambda: told, "the waiter to be told")
        assert told == [os.getpid()] and not entered.is_set()
    await asyncio.wait_for(task, BOUND_S)
    assert second.waited and told == [os.getpid()]  # told once
