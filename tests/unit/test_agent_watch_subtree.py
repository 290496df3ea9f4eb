"""A recursive watch reports what is inside a new directory, once each.

inotify only reports entries of directories it already watches: for ``mkdir -p a/b/c && echo >
a/b/c/f`` the watch on ``a`` is added after ``b`` (usually) exists, so ``a`` is all it says.
envd's fsnotify walks a new directory and reports every entry found as created; the agent does
the same, and drops inotify's own create of an entry the walk already reported (made between the
watch's addition and the listing). The shell commands are repeated to meet the race both ways.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from trenvx.guest.agent.watch import DirWatcher, FsEvent, InotifyWatcher, PollingWatcher

CREATE = "EVENT_TYPE_CREATE"
ROUNDS = 25


def collect(watcher: DirWatcher, wanted: set[FsEvent], timeout: float = 5.0) -> list[FsEvent]:
    """Events until ``wanted`` were all seen, plus what arrives in a short while after (late duplicates)."""
    events: list[FsEvent] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not wanted <= set(events):
        events += watcher.read(0.2)
    events += watcher.read(0.3)
    return events


def creates(events: list[FsEvent]) -> Counter[str]:
    return Counter(name for name, kind in events if kind == CREATE)


def open_kind(kind: str, root: Path) -> DirWatcher:
    return InotifyWatcher(str(root), True) if kind == "inotify" else PollingWatcher(str(root), True, 0.05)


@pytest.mark.parametrize("kind", ["inotify", "polling"])
def test_mkdir_p_then_a_file_reports_every_level_once(tmp_path: Path, kind: str) -> None:
    watcher = open_kind(kind, tmp_path)
    try:
        for i in range(ROUNDS):
            top = f"t{i}"
            subprocess.run(["sh", "-c", f"mkdir -p {top}/b/c && echo hi > {top}/b/c/f"], cwd=tmp_path, check=True)
            paths = [top, f"{top}/b", f"{top}/b/c", f"{top}/b/c/f"]
            events = collect(watcher, {(p, CREATE) for p in paths})
            counts = creates(events)
            assert {p: counts[p] for p in paths} == {p: 1 for p in paths}, f"round {i}: {events}"
    finally:
        watcher.close()


@pytest.mark.parametrize("kind", ["inotify", "polling"])
def test_file_written_into_a_brand_new_directory(tmp_path: Path, kind: str) -> None:
    watcher = open_kind(kind, tmp_path)
    try:
        for i in range(ROUNDS):
            new = tmp_path / f"new{i}"
            new.mkdir()
            (new / "x.txt").write_text("content")
            events = collect(watcher, {(f"new{i}", CREATE), (f"new{i}/x.txt", CREATE)})
            counts = creates(events)
            assert (counts[f"new{i}"], counts[f"new{i}/x.txt"]) == (1, 1), f"round {i}: {events}"
            # Nothing outside what happened is reported.
            assert {name for name, _ in events} <= {f"new{i}", f"new{i}/x.txt"}, events
    finally:
        watcher.close()


class RacingWatcher(InotifyWatcher):
    """Makes a file in ``racy`` right after its watch is added, before the walk lists it: the
    file is then both in the listing and in inotify's queue (the race, made certain)."""

    racy = ""

    def _add(self, path: str) -> None:
        super()._add(path)
        if path == self.racy:
            Path(path, "raced.txt").write_text("x")
            os.mkdir(os.path.join(path, "raced-dir"))
            Path(path, "raced-dir", "inner.txt").write_text("z")  # made before raced-dir's watch


def test_an_entry_both_listed_and_queued_is_reported_once(tmp_path: Path) -> None:
    watcher = RacingWatcher(str(tmp_path), True)
    watcher.racy = str(tmp_path / "d")
    try:
        (tmp_path / "d").mkdir()
        wanted = {("d", CREATE), ("d/raced.txt", CREATE), ("d/raced-dir", CREATE), ("d/raced-dir/inner.txt", CREATE)}
        events = collect(watcher, wanted)
        assert wanted <= set(events), events
        assert creates(events) == Counter({"d": 1, "d/raced.txt": 1, "d/raced-dir": 1, "d/raced-dir/inner.txt": 1}), events
        # The file's write was seen by the watch (it came after the watch): inotify's, kept.
        assert ("d/raced.txt", "EVENT_TYPE_WRITE") in events
        # The raced directory is watched too.
        (tmp_path / "d" / "raced-dir" / "later.txt").write_text("y")
        assert ("d/raced-dir/later.txt", CREATE) in collect(watcher, {("d/raced-dir/later.txt", CREATE)})
    finally:
        watcher.close()


def test_removed_and_made_again_is_reported_again(tmp_path: Path) -> None:
    """A walk's report does not hide a later create of the same name."""
    watcher = InotifyWatcher(str(tmp_path), True)
    try:
        subprocess.run(["sh", "-c", "mkdir -p a/b && echo 1 > a/b/f"], cwd=tmp_path, check=True)
        assert creates(collect(watcher, {("a/b/f", CREATE)}))["a/b/f"] == 1
        (tmp_path / "a" / "b" / "f").unlink()
        (tmp_path / "a" / "b" / "f").write_text("2")
        events = collect(watcher, {("a/b/f", "EVENT_TYPE_REMOVE"), ("a/b/f", CREATE)})
        assert [kind for name, kind in events if name == "a/b/f"][:2] == ["EVENT_TYPE_REMOVE", CREATE], events
    finally:
        watcher.close()


def test_a_tree_moved_in_is_reported_and_watched(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "tree" / "sub").mkdir(parents=True)
    (outside / "tree" / "sub" / "f").write_text("x")
    root = tmp_path / "watched"
    root.mkdir()
    watcher = InotifyWatcher(str(root), True)
    try:
        os.rename(outside / "tree", root / "tree")
        wanted = {("tree", CREATE), ("tree/sub", CREATE), ("tree/sub/f", CREATE)}
        events = collect(watcher, wanted)
        assert creates(events) == Counter({"tree": 1, "tree/sub": 1, "tree/sub/f": 1}), events
        (root / "tree" / "sub" / "g").write_text("y")
        assert ("tree/sub/g", CREATE) in collect(watcher, {("tree/sub/g", CREATE)})
    finally:
        watcher.close()


def test_a_non_recursive_watch_reports_only_the_directory(tmp_path: Path) -> None:
    watcher = InotifyWatcher(str(tmp_path), False)
    try:
        subprocess.run(["sh", "-c", "mkdir -p a/b && echo 1 > a/b/f"], cwd=tmp_path, check=True)
        events = collect(watcher, {("a", CREATE)})
        assert creates(events) == Counter({"a": 1}), events
    finally:
        watcher.close()
