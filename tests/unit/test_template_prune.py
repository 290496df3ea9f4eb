"""A template's older builds go once a new one is published, unless something stands on them
(TemplateStore.prune, run by the builder after each publish): builds piled up before (here, ten
2.2 GB builds of code-interpreter in one day). Kept: the current build and the newest others up to
``keep_builds``, a build a live sandbox was restored from (its ``.users`` entry), one under a disk
of this data_root's sandboxes, one a snapshot requires. Real files and qemu-img overlays, no VMs."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import pytest

from trenvx.config import Config
from trenvx.layout import DataRoot
from trenvx.sandbox import snapshots as snaps
from trenvx.template.build_users import USERS
from trenvx.template.store import MANIFEST, ROOTFS, SnapshotOrigin, TemplateBuild, TemplateManifest, TemplateStore

from .server_fakes import make_template


def _builds(root: Path, ids: list[str]) -> dict[str, Path]:
    """Builds ``ids`` of template ``tpl`` (oldest first), the last one current."""
    first = make_template(root, "tpl")  # a build with a real manifest, copied under each id
    manifest = TemplateManifest.model_validate_json((first / MANIFEST).read_text())
    out = {}
    for build_id in ids:
        d = root / "templates" / "tpl" / build_id
        shutil.copytree(first, d)
        (d / MANIFEST).write_text(manifest.model_copy(update={"build_id": build_id}).model_dump_json())
        out[build_id] = d
    shutil.rmtree(first)
    link = root / "templates" / "tpl" / "current"
    link.unlink()
    link.symlink_to(ids[-1])
    return out


def test_older_builds_go_unless_something_stands_on_them(tmp_path: Path) -> None:
    if not shutil.which("qemu-img"):
        pytest.skip("qemu-img is not installed (scripts/start.sh setup installs qemu-utils)")
    b = _builds(tmp_path, ["20260101T000000-a", "20260102T000000-b", "20260103T000000-c", "20260104T000000-d",
                           "20260105T000000-e", "20260106T000000-f", "20260107T000000-g"])
    a, used, stale, under_disk, required, previous, current = b.values()
    store = TemplateStore(DataRoot(tmp_path))
    # a sandbox that lives (its directory exists), restored from `used`, perhaps by another server
    alive = tmp_path / "elsewhere" / "sbx1"
    alive.mkdir(parents=True)
    snaps.add_user(TemplateBuild(used, store.current("tpl").manifest), "sbx1", alive)
    # a sandbox that ended: its entry stays behind, and counts for nothing
    snaps.add_user(TemplateBuild(stale, store.current("tpl").manifest), "sbx2", tmp_path / "ended")
    # a disk of this data_root's sandboxes stands on `under_disk` (paused, say, from before users were recorded)
    disk = tmp_path / "sandboxes" / "sbx3" / "disk.qcow2"
    disk.parent.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(under_disk / ROOTFS), "-F", "raw", str(disk)],
                   check=True, timeout=60)
    # a snapshot requires `required`
    snap = tmp_path / "templates" / "snap1" / "s1"
    snap.mkdir(parents=True)
    origin = SnapshotOrigin(source_sandbox="sbx4", source_template="tpl", source_build=str(required.resolve()),
                            requires=[str(required.resolve())])
    (snap / MANIFEST).write_text(store.current("tpl").manifest.model_copy(
        update={"name": "snap1", "build_id": "s1", "created_at": dt.datetime.now(dt.UTC).isoformat(),
                "snapshot": origin}).model_dump_json())

    removed = store.prune("tpl", keep=2)

    assert sorted(removed) == [a.name, stale.name]
    for kept in (used, under_disk, required, previous, current):
        assert (kept / MANIFEST).exists(), kept.name
    assert not a.exists() and not stale.exists()
    assert snap.exists()  # a snapshot's build is not the template's to prune
    assert store.current("tpl").path.resolve() == current.resolve()
    # once the sandbox ends, its build goes with the next prune; keep=1 keeps only the current one
    shutil.rmtree(alive)
    assert store.prune("tpl", keep=1) == [used.name, previous.name]


def test_a_restore_records_its_user_in_a_template_build(tmp_path: Path) -> None:
    b = _builds(tmp_path, ["20260101T000000-a"])
    build = TemplateStore(DataRoot(tmp_path)).current("tpl")
    snaps.add_user(build, "sbx", tmp_path / "sandboxes" / "sbx")
    assert (b["20260101T000000-a"] / USERS / "sbx").read_text() == str(tmp_path / "sandboxes" / "sbx")


def test_a_restore_that_records_itself_while_the_build_is_judged_keeps_it(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The race: prune finds no user, then a restore records itself before the build is removed.
    The build is renamed before removal and asked again: the restore's entry keeps it."""
    import trenvx.template.store as store_module
    from trenvx.template.build_users import has_users

    b = _builds(tmp_path, ["20260101T000000-a", "20260102T000000-b", "20260103T000000-c"])
    old = b["20260101T000000-a"]
    alive = tmp_path / "sbx"
    alive.mkdir()
    asked: list[Path] = []

    def first_no_then_a_restore(build_dir: Path) -> bool:
        asked.append(build_dir)
        if len(asked) == 1:  # judged unused; a restore records itself right after
            snaps.add_user(TemplateBuild(old, TemplateStore(DataRoot(tmp_path)).current("tpl").manifest), "sbx", alive)
            return False
        return has_users(build_dir)

    monkeypatch.setattr(store_module, "has_users", first_no_then_a_restore)
    assert TemplateStore(DataRoot(tmp_path)).prune("tpl", keep=2) == []
    assert (old / MANIFEST).exists() and (old / USERS / "sbx").exists()
    assert not list(old.parent.glob(".*.pruning"))
    assert asked[1].name.endswith(".pruning")  # asked again once renamed


def test_a_build_being_removed_takes_no_user(tmp_path: Path) -> None:
    from trenvx.template.build_users import BuildGone, add_user

    b = _builds(tmp_path, ["20260101T000000-a"])
    build = b["20260101T000000-a"]
    (build / MANIFEST).rename(build / "manifest.json.away")  # as when prune renamed the directory under it
    with pytest.raises(BuildGone, match="being removed"):
        add_user(build, "sbx", tmp_path)


def test_doubt_counts_as_a_user(tmp_path: Path) -> None:
    from trenvx.template.build_users import has_users

    build = tmp_path / "b"
    build.mkdir()
    assert not has_users(build)  # no .users: nobody
    (build / USERS).write_text("not a directory")  # cannot be listed
    assert has_users(build)
    (build / USERS).unlink()
    (build / USERS).mkdir()
    (build / USERS / "half-written").write_text("")  # an entry without its path yet
    assert has_users(build) and (build / USERS / "half-written").exists()


def test_what_a_cut_short_prune_left_goes_with_the_next(tmp_path: Path) -> None:
    b = _builds(tmp_path, ["20260101T000000-a", "20260102T000000-b"])
    left = tmp_path / "templates" / "tpl" / ".20251231T000000-z.pruning"
    shutil.copytree(b["20260101T000000-a"], left)
    assert TemplateStore(DataRoot(tmp_path)).prune("tpl", keep=2) == []
    assert not left.exists() and all(p.exists() for p in b.values())


def test_the_entries_of_ended_users_do_not_pile_up(tmp_path: Path) -> None:
    from trenvx.template.build_users import SWEEP_EVERY, add_user

    build = tmp_path / "build"
    build.mkdir()
    (build / MANIFEST).write_text("{}")
    alive = tmp_path / "alive"
    alive.mkdir()
    add_user(build, "live", alive)
    for i in range(3 * SWEEP_EVERY):  # sandboxes that came and went
        add_user(build, f"ended-{i}", tmp_path / f"gone-{i}")
    entries = {p.name for p in (build / USERS).iterdir()}
    assert "live" in entries and len(entries) <= SWEEP_EVERY, len(entries)


def test_keep_builds_is_at_least_one() -> None:
    with pytest.raises(ValueError, match="keep_builds"):
        Config(data_root="/tmp/x", template_manager={"keep_builds": 0})
    assert Config(data_root="/tmp/x").template_manager.keep_builds == 2
