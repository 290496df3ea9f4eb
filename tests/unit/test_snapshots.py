"""Snapshots and forks without VMs: the memory file a checkpoint writes (on synthetic migration
streams), names and tags, which snapshot builds stay on disk (published, used by a sandbox of any
process, required by another snapshot), the qcow2 backing chain a disk stands on, and the HTTP
API (E2B's shapes, refusals that change nothing) over fake VMs whose checkpoint writes stand-in
files. The real thing is tests/e2e/test_fork_snapshot.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from hypothesis import given

from trenvx.layout import DataRoot
from trenvx.sandbox import snapshots as snaps
from trenvx.sandbox.disk import create_overlay
from trenvx.server.app import create_app
from trenvx.template.build_users import USERS
from trenvx.template.store import (
    LAYER, MANIFEST, MEMORY, VMSTATE, SnapshotOrigin, TemplateBuild, TemplateManifest, TemplateNotFound,
    TemplateStore,
)
from trenvx.vmm import qemu_stream as qs
from trenvx.vmm.qemu_checkpoint import Checkpoint
from trenvx.vmm.qemu_img import backing_chain, qcow2_backing
from trenvx.vmm.qemu_stream import merge_into

from .server_fakes import ThreadedServer, UpstreamState, fake_manager, make_config, make_template, upstream_app
from .test_qemu_stream import SETTINGS, Stream, encode, load, streams

P = qs.PAGE_SIZE


# -- the memory file of a checkpoint ---------------------------------------------------------------

@SETTINGS
@given(streams())
def test_the_memory_file_is_the_merge_of_the_stream(tmp_path: Path, case: tuple[Stream, bytes]) -> None:
    """Whatever pages the stream carries (some, all, twice, zero or not): the same memory as
    restoring the stream over the base, a stream without any page of the block, no .part left."""
    s, template = case
    base = tmp_path / "memory"
    base.write_bytes(template)
    original = encode(s)
    mem, others, tail = load(original, template)
    out = io.BytesIO()
    stats = merge_into(io.BytesIO(original), out, base, tmp_path / "merged")
    assert (tmp_path / "merged").read_bytes() == mem
    assert stats.kept(qs.MAIN_BLOCK) == 0
    assert load(out.getvalue(), mem) == (mem, others, tail)
    assert not (tmp_path / "merged.part").exists()


def test_zero_pages_stay_holes_and_unsent_pages_come_from_the_base(tmp_path: Path) -> None:
    from .test_qemu_stream import Rec

    pages = 64
    base = tmp_path / "memory"
    base.write_bytes(b"\x11" * P * pages)
    sent = [Rec(qs.MAIN_BLOCK, i, True, b"\0") for i in range(0, 32)] + [Rec(qs.MAIN_BLOCK, 40, False, b"\x22" * P)]
    stream = encode(Stream([(qs.MAIN_BLOCK, pages)], [sent]))
    merge_into(io.BytesIO(stream), io.BytesIO(), base, tmp_path / "merged")
    data = (tmp_path / "merged").read_bytes()
    assert data[:32 * P] == bytes(32 * P)
    assert data[40 * P:41 * P] == b"\x22" * P
    assert data[32 * P:40 * P] == b"\x11" * 8 * P and data[41 * P:] == b"\x11" * 23 * P
    # the zero pages take no space: fewer blocks than the file's size
    assert os.stat(tmp_path / "merged").st_blocks * 512 < 40 * P


def test_a_stream_of_another_memory_size_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "memory"
    base.write_bytes(bytes(4 * P))
    stream = encode(Stream([(qs.MAIN_BLOCK, 8)], [[]]))
    with pytest.raises(qs.StreamFormatError, match="not of a VM of that memory file"):
        merge_into(io.BytesIO(stream), io.BytesIO(), base, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.part").exists()


# -- names and tags --------------------------------------------------------------------------------

def test_names_tags_and_ids() -> None:
    assert snaps.template_name_of("abc:default") == "abc"
    assert snaps.template_name_of("abc:latest") == "abc" and snaps.template_name_of("abc") == "abc"
    with pytest.raises(snaps.InvalidSnapshotRequest, match="tag 'v2'"):
        snaps.template_name_of("abc:v2")
    assert snaps.parse_snapshot_name("My-Snap") == "my-snap"
    assert snaps.parse_snapshot_name("snap_1:default") == "snap_1"
    for bad, why in (("team/snap", "namespace"), ("snap:v1", "tag"), ("-x", "lowercase"), ("a b", "lowercase"),
                     ("x" * 65, "1-64")):
        with pytest.raises(snaps.InvalidSnapshotRequest, match=why):
            snaps.parse_snapshot_name(bad)
    sid = snaps.new_snapshot_id()
    assert len(sid) == 20 and sid[0].isalpha() and sid == sid.lower()


# -- what stays on disk ----------------------------------------------------------------------------

def _snapshot_build(root: Path, name: str, build_id: str, *, requires: list[str], published: bool,
                    ephemeral: bool = False) -> Path:
    src = TemplateManifest.model_validate_json((root / "templates" / "tpl" / "current" / MANIFEST).read_text())
    d = root / "templates" / name / build_id
    d.mkdir(parents=True)
    for f in (MEMORY, VMSTATE, LAYER):
        (d / f).write_bytes(b"x")
    m = src.model_copy(update=dict(name=name, build_id=build_id, created_at=dt.datetime.now(dt.UTC).isoformat(),
                                   snapshot=SnapshotOrigin(source_sandbox="sbx", source_template="tpl",
                                                           source_build=requires[0], requires=requires,
                                                           ephemeral=ephemeral)))
    (d / MANIFEST).write_text(m.model_dump_json())
    if published:
        (d.parent / "current").symlink_to(build_id)
    return d


def _snapshots_of(root: Path, running: list[TemplateBuild] | None = None) -> snaps.Snapshots:
    store = TemplateStore(DataRoot(root).ensure())
    manager = SimpleNamespace(templates=store, list=lambda: [SimpleNamespace(build=b) for b in running or []],
                              config=SimpleNamespace(template={}))
    return snaps.Snapshots(manager)  # type: ignore[arg-type]


async def test_collect_keeps_what_is_published_used_or_required(tmp_path: Path) -> None:
    tpl = make_template(tmp_path, "tpl")
    tpl_real = str(tpl.resolve())
    published = _snapshot_build(tmp_path, "pub", "b1", requires=[tpl_real], published=True)
    deleted = _snapshot_build(tmp_path, "gone", "b1", requires=[tpl_real], published=False)
    required = _snapshot_build(tmp_path, "base", "b1", requires=[tpl_real], published=False)
    _snapshot_build(tmp_path, "child", "b1", requires=[str(required.resolve()), tpl_real], published=True)
    used_here = _snapshot_build(tmp_path, ".fork-a", "b1", requires=[tpl_real], published=False, ephemeral=True)
    used_there = _snapshot_build(tmp_path, ".fork-b", "b1", requires=[tpl_real], published=False, ephemeral=True)
    stale = _snapshot_build(tmp_path, ".fork-c", "b1", requires=[tpl_real], published=False, ephemeral=True)
    staging = tmp_path / "templates" / "pub" / ".b2.partial"
    staging.mkdir()
    (staging / MANIFEST).write_text(published.joinpath(MANIFEST).read_text())
    # a sandbox of another process, then one that ended (its directory is gone)
    elsewhere = tmp_path / "other-server" / "sandboxes" / "x"
    elsewhere.mkdir(parents=True)
    snaps.add_user(TemplateBuild(used_there, TemplateManifest.model_validate_json((used_there / MANIFEST).read_text())),
                   "x", elsewhere)
    snaps.add_user(TemplateBuild(stale, TemplateManifest.model_validate_json((stale / MANIFEST).read_text())),
                   "y", tmp_path / "no-such-dir")
    snaps.add_user(TemplateBuild(published, TemplateManifest.model_validate_json((published / MANIFEST).read_text())),
                   "ended", tmp_path / "no-such-dir")
    running = [TemplateBuild(used_here, TemplateManifest.model_validate_json((used_here / MANIFEST).read_text()))]

    removed = await _snapshots_of(tmp_path, running).collect()
    assert not (published / USERS / "ended").exists()  # the entries of ended users go

    assert sorted(p.parent.name for p in removed) == [".fork-c", "gone"]
    assert not deleted.parent.exists() and not stale.parent.exists()  # their template directories too
    for kept in (published, required, used_here, used_there, staging, tpl):
        assert kept.exists(), kept
    # the stale user entry is gone with its build; the live one stays
    assert list((used_there / USERS).iterdir())

    # the sandbox elsewhere ends: its snapshot goes at the next sweep
    elsewhere.rmdir()
    assert [p.parent.name for p in await _snapshots_of(tmp_path, running).collect()] == [".fork-b"]


async def test_a_disk_standing_on_a_layer_keeps_its_snapshot(tmp_path: Path) -> None:
    tpl = make_template(tmp_path, "tpl")
    snap = _snapshot_build(tmp_path, ".fork-d", "b1", requires=[str(tpl.resolve())], published=False, ephemeral=True)
    (snap / LAYER).unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(snap / LAYER), "16M"], check=True)
    sandbox = tmp_path / "sandboxes" / "s1"
    sandbox.mkdir(parents=True)
    await create_overlay(snap / LAYER, sandbox / "disk.qcow2", "qcow2")
    assert await _snapshots_of(tmp_path).collect() == []
    (sandbox / "disk.qcow2").unlink()
    assert [p.name for p in await _snapshots_of(tmp_path).collect()] == ["b1"]


def test_a_removed_build_takes_no_user(tmp_path: Path) -> None:
    tpl = make_template(tmp_path, "tpl")
    snap = _snapshot_build(tmp_path, "s", "b1", requires=[str(tpl.resolve())], published=True)
    build = TemplateBuild(snap, TemplateManifest.model_validate_json((snap / MANIFEST).read_text()))
    import shutil

    shutil.rmtree(snap)
    with pytest.raises(snaps.SnapshotNotFound, match="deleted"):
        snaps.add_user(build, "sbx", tmp_path)
    # a template's build records its users too (TemplateStore.prune keeps what they stand on)
    template = TemplateStore(DataRoot(tmp_path)).current("tpl")
    snaps.add_user(template, "sbx", tmp_path)
    assert (template.path / USERS / "sbx").read_text() == str(tmp_path)
    gone = TemplateBuild(tmp_path / "templates" / "tpl" / "pruned", template.manifest)
    with pytest.raises(TemplateNotFound, match="was removed"):
        snaps.add_user(gone, "sbx", tmp_path)


async def test_the_backing_chain_of_a_disk(tmp_path: Path) -> None:
    base = tmp_path / "upper.ext4"
    base.write_bytes(bytes(1 << 20))
    layer = tmp_path / "snap" / "layer.qcow2"
    layer.parent.mkdir()
    await create_overlay(base, layer)
    top = tmp_path / "disk.qcow2"
    await create_overlay(layer, top, "qcow2")
    assert qcow2_backing(top) == layer and qcow2_backing(layer) == base and qcow2_backing(base) is None
    assert backing_chain(top) == [layer, base]
    assert qcow2_backing(tmp_path / "missing") is None
    with pytest.raises(Exception, match="backing formats"):
        await create_overlay(base, tmp_path / "x.qcow2", "vmdk")


def test_a_snapshot_build_is_restored_from_its_layer(tmp_path: Path) -> None:
    tpl = make_template(tmp_path, "tpl")
    snap = _snapshot_build(tmp_path, "s", "b1", requires=[str(tpl.resolve())], published=True)
    build = TemplateStore(DataRoot(tmp_path)).current("s")
    assert build.is_snapshot and build.writable_base == snap / LAYER and build.writable_format == "qcow2"
    assert build.init_token is None  # no token file
    (snap / snaps.AGENT_TOKEN).write_text("source-token\n")
    assert build.init_token == "source-token"
    template = TemplateStore(DataRoot(tmp_path)).current("tpl")
    assert not template.is_snapshot and template.writable_format == "raw" and template.init_token is None
    # a template's build a snapshot requires is never pruned
    store = TemplateStore(DataRoot(tmp_path))
    os.unlink(tmp_path / "templates" / "tpl" / "current")
    assert store.prune("tpl", keep=1) == []
    assert tpl.exists()


# -- the API over fake VMs -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def upstream():
    with ThreadedServer(upstream_app(UpstreamState())) as s:
        yield s


def _fake_checkpoints(m) -> list[str]:
    """Replace the VMM's checkpoint: stand-in files, as the real one leaves them."""
    taken: list[str] = []

    def vmm(sb):
        return None, None

    async def checkpoint(driver, vm, source, staging: Path) -> Checkpoint:
        taken.append(str(staging))
        (staging / MEMORY).write_bytes(b"m" * 4096)
        os.chmod(staging / MEMORY, 0o400)
        (staging / VMSTATE).write_bytes(b"v")
        (staging / LAYER).write_bytes(b"l")
        stats = qs.StreamStats(merged_pages=1)
        return Checkpoint(staging / VMSTATE, staging / MEMORY, staging / LAYER, stats, 0.01, {"migrate": 0.01})

    m.snapshots._vmm = vmm
    m.snapshots._checkpoint = checkpoint
    return taken


@pytest.fixture
async def api(tmp_path: Path, upstream):
    make_template(tmp_path, "tpl")
    cfg = make_config(tmp_path, max_sandboxes=6)
    m = fake_manager(cfg, upstream.port)
    await m.start()
    taken = _fake_checkpoints(m)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(cfg, manager=m)),
                                 base_url="http://testserver", timeout=60) as c:
        c.manager = m  # type: ignore[attr-defined]
        c.taken = taken  # type: ignore[attr-defined]
        yield c
    await m.close()


async def _create(c: httpx.AsyncClient, **body) -> dict:
    r = await c.post("/sandboxes", json={"templateID": "tpl", **body})
    assert r.status_code == 201, r.text
    return r.json()


async def test_fork_answers_one_entry_per_child(api) -> None:
    src = await _create(api, metadata={"k": "v"}, envVars={"E": "1"})
    r = await api.post(f"/sandboxes/{src['sandboxID']}/fork", json={"count": 3, "timeout": 120})
    assert r.status_code == 201, r.text
    results = r.json()
    assert len(results) == 3 and all(set(x) == {"sandbox"} for x in results)
    kids = [x["sandbox"] for x in results]
    assert len({k["sandboxID"] for k in kids} | {src["sandboxID"]}) == 4
    assert len({k["envdAccessToken"] for k in kids} | {src["envdAccessToken"]}) == 4
    for k in kids:
        assert k["templateID"] == "tpl"
        sb = api.manager.get(k["sandboxID"])
        assert sb.metadata == {"k": "v"} and sb.env_vars == {"E": "1"} and 110 < sb.timeout_left <= 120
        assert sb.build.is_snapshot and sb.build.manifest.snapshot.ephemeral
    assert len(api.taken) == 1  # one snapshot for all
    # the fork's snapshot: unlisted, kept while a child runs, gone with the last one
    assert (await api.get("/snapshots")).json() == []
    fork_dir = api.manager.get(kids[0]["sandboxID"]).build.path
    for k in kids[:2]:
        assert (await api.delete(f"/sandboxes/{k['sandboxID']}")).status_code == 204
    await api.manager.snapshots.collect()
    assert fork_dir.is_dir()
    assert (await api.delete(f"/sandboxes/{kids[2]['sandboxID']}")).status_code == 204
    await api.manager.snapshots.collect()
    assert not fork_dir.exists() and not fork_dir.parent.exists()


async def test_children_keep_the_sources_lifecycle_with_their_own_timeout(api) -> None:
    src = await _create(api, autoPause=True, autoPauseMemory=False, autoResume={"enabled": True}, timeout=300)
    r = await api.post(f"/sandboxes/{src['sandboxID']}/fork", json={"count": 2, "timeout": 90})
    assert r.status_code == 201, r.text
    for x in r.json():
        kid = x["sandbox"]["sandboxID"]
        lc = api.manager.get(kid).lifecycle
        assert (lc.auto_pause, lc.auto_pause_memory, lc.auto_resume, lc.timeout_s) == (True, False, True, 90)
        info = (await api.get(f"/sandboxes/{kid}")).json()
        assert info["lifecycle"]["onTimeout"] == "pause" and info["lifecycle"]["autoResume"] is True


async def test_children_that_cannot_start_are_errors_in_the_list(api) -> None:
    src = await _create(api)
    r = await api.post(f"/sandboxes/{src['sandboxID']}/fork", json={"count": 7})  # max_sandboxes = 6
    assert r.status_code == 201, r.text
    results = r.json()
    ok = [x for x in results if "sandbox" in x]
    failed = [x["error"] for x in results if "error" in x]
    assert len(ok) == 5 and len(failed) == 2
    assert all(e["code"] == 429 and set(e) == {"code", "message"} for e in failed)


async def test_refused_forks_and_snapshots_change_nothing(api) -> None:
    src = (await _create(api))["sandboxID"]
    templates = sorted(p.name for p in (api.manager.data_root.templates).iterdir())
    for body, field in (({"count": 0}, "count"), ({"count": 101}, "count"), ({"count": "1"}, "count"),
                        ({"timeout": 0}, "timeout"), ({"timeout": 10 ** 9}, "timeout")):
        r = await api.post(f"/sandboxes/{src}/fork", json=body)
        assert r.status_code == 400 and field in r.json()["message"], (body, r.text)
    assert (await api.post("/sandboxes/nosuch/fork", json={})).status_code == 404
    assert (await api.post("/sandboxes/nosuch/snapshots", json={})).status_code == 404
    for name in ("Bad Name", "ns/x", "x:v1"):
        r = await api.post(f"/sandboxes/{src}/snapshots", json={"name": name})
        assert r.status_code == 400, r.text
    r = await api.post(f"/sandboxes/{src}/snapshots", json={"name": "tpl"})  # a template's name: taken
    assert r.status_code == 409 and "name of a" in r.json()["message"], r.text
    r = await api.post(f"/sandboxes/{src}/snapshots", json={"memory": False})
    assert r.status_code == 400 and "filesystem-only" in r.json()["message"]
    assert (await api.post(f"/sandboxes/{src}/pause")).status_code == 204
    for path in ("fork", "snapshots"):
        r = await api.post(f"/sandboxes/{src}/{path}", json={})
        assert r.status_code == 409 and "paused" in r.json()["message"], r.text
    assert api.taken == [] and [s.id for s in api.manager.list()] == [src]
    assert sorted(p.name for p in (api.manager.data_root.templates).iterdir()) == templates


async def test_snapshots_are_created_listed_used_and_deleted(api) -> None:
    src = (await _create(api))["sandboxID"]
    first = (await api.post(f"/sandboxes/{src}/snapshots", json={})).json()
    named = await api.post(f"/sandboxes/{src}/snapshots", json={"name": "my-snap"})
    assert named.status_code == 201 and named.json() == {"snapshotID": "my-snap:default", "names": ["my-snap"]}
    other = (await _create(api))["sandboxID"]
    await api.post(f"/sandboxes/{other}/snapshots", json={})
    listed = [s["snapshotID"] for s in (await api.get("/snapshots")).json()]
    assert len(listed) == 3 and listed[1:] == ["my-snap:default", first["snapshotID"]]  # newest first
    assert [s["snapshotID"] for s in (await api.get("/snapshots", params={"sandboxID": src})).json()] == listed[1:]
    assert (await api.get("/snapshots", params={"name": "my-snap:default"})).json() == [named.json()]
    page = await api.get("/snapshots", params={"limit": 2})
    assert [s["snapshotID"] for s in page.json()] == listed[:2]
    rest = await api.get("/snapshots", params={"limit": 2, "nextToken": page.headers["x-next-token"]})
    assert [s["snapshotID"] for s in rest.json()] == listed[2:] and "x-next-token" not in rest.headers
    assert (await api.get("/snapshots", params={"nextToken": "garbage"})).status_code == 400
    # a snapshot's build: root's alone; its id starts sandboxes; templates do not list it
    build = api.manager.templates.current(first["snapshotID"].split(":")[0])
    assert stat.S_IMODE(build.path.stat().st_mode) == 0o700
    assert stat.S_IMODE((build.path / snaps.AGENT_TOKEN).stat().st_mode) == 0o600
    assert build.init_token == api.manager.get(src).access_token
    copy = await _create(api, templateID=first["snapshotID"])
    assert copy["templateID"] == first["snapshotID"].split(":")[0]
    assert first["snapshotID"].split(":")[0] not in [t["templateID"] for t in (await api.get("/templates")).json()]
    assert (await api.post("/sandboxes", json={"templateID": "tpl:v9"})).status_code == 404
    # delete: 204, then 404; the copy runs on; new copies refused
    assert (await api.delete(f"/templates/{first['snapshotID']}")).status_code == 204
    assert (await api.delete(f"/templates/{first['snapshotID']}")).status_code == 404
    assert (await api.post("/sandboxes", json={"templateID": first["snapshotID"]})).status_code == 404
    r = await api.delete("/templates/tpl")
    assert r.status_code == 409 and "not a snapshot" in r.json()["message"]
    assert build.path.is_dir()
    assert (await api.delete(f"/sandboxes/{copy['sandboxID']}")).status_code == 204
    await api.manager.snapshots.collect()
    assert not build.path.exists()
    # a snapshot outlives its source
    assert (await api.delete(f"/sandboxes/{src}")).status_code == 204
    await api.manager.snapshots.collect()
    assert (await api.get("/snapshots", params={"name": "my-snap"})).json() == [named.json()]
    # the metrics count them
    text = (await api.get("/metrics")).text
    assert 'trenvx_snapshots_total{outcome="ok",template="tpl"} 3.0' in text
    assert 'trenvx_snapshot_builds{state="published"} 2.0' in text


async def test_a_named_snapshot_taken_again_replaces_its_build(api) -> None:
    src = (await _create(api))["sandboxID"]
    await api.post(f"/sandboxes/{src}/snapshots", json={"name": "again"})
    old = api.manager.templates.current("again").path
    user = await _create(api, templateID="again")
    await api.post(f"/sandboxes/{src}/snapshots", json={"name": "again"})
    new = api.manager.templates.current("again").path
    assert new != old and old.is_dir()  # the old build is used
    assert api.manager.get(user["sandboxID"]).build.path == old
    await api.delete(f"/sandboxes/{user['sandboxID']}")
    await asyncio.sleep(0)
    await api.manager.snapshots.collect()
    assert not old.exists() and new.is_dir()


# -- the pages a checkpoint's migration read, given back -------------------------------------------

def test_file_pages_present_and_page_out(tmp_path: Path) -> None:
    """A process maps a file privately, reads every page and writes a few: the read pages are the
    file's (given back by page_out), the written ones its own (never in the set, never lost)."""
    from trenvx.vmm import ram_pages

    pages = 256
    path = tmp_path / "memory"
    with open(path, "wb") as f:
        f.write(b"\x07" * ram_pages.PAGE_SIZE * pages)
        os.fsync(f.fileno())  # clean pages: a dirty page cache page is not paged out
    script = (
        "import mmap, sys\n"
        f"f = open({str(path)!r}, 'rb')\n"
        "m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)\n"
        f"total = sum(m[i * {ram_pages.PAGE_SIZE}] for i in range({pages}))\n"
        f"for i in range(0, {pages}, 16):\n"
        f"    m[i * {ram_pages.PAGE_SIZE}] = 9\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        f"print(sum(m[i * {ram_pages.PAGE_SIZE}] for i in range({pages})), flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        start, length = ram_pages.mapping_of(proc.pid, path)
        assert length == pages * ram_pages.PAGE_SIZE
        present = ram_pages.file_pages_present(proc.pid, start, length)
        written = {i for i in range(0, pages, 16)}
        assert [i for i in range(pages) if not present[i]] == sorted(written)  # anonymous now
        assert ram_pages.page_out(proc.pid, start, present) == (pages - len(written)) * ram_pages.PAGE_SIZE
        assert sum(ram_pages.file_pages_present(proc.pid, start, length)) < pages - len(written)
        proc.stdin.write("\n")
        proc.stdin.flush()
        # every page reads back what it held: the file's, or what the process wrote
        assert int(proc.stdout.readline()) == 9 * len(written) + 7 * (pages - len(written))
    finally:
        proc.kill()
        proc.wait()
    assert ram_pages.mapping_of(os.getpid(), tmp_path / "nothing") is None
    assert ram_pages.page_out(os.getpid(), 0, bytearray(8)) == 0
