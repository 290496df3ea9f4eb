"""Storage and memory faults of a real server (docs/reliability.md's storage rows):

- a template's file damaged on disk is found by its manifest's hashes before any restore, pooled
  VMs of it are not handed out, and the error says how to rebuild it;
- the data root full while a sandbox writes (the guest gets an I/O error, its VM and the other
  sandboxes run on), while a sandbox pauses (507, it runs on, nothing half-written) and during a
  template build (BuildError naming the data root and the space needed, no staging directory left);
- host memory short of ``memory_headroom_mb``: a create is refused with 503 and nothing starts.

The full data roots are small tmpfs mounts of their own (unmounted in teardown), never the real disk.
Their mount points are the servers' short data_root paths under /tmp (UNIX socket paths in sandbox
directories must stay under 108 bytes), not under tmp_path.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trenvx.build_errors import BuildError
from trenvx.config import Config
from trenvx.diskspace import free_bytes
from trenvx.template.store import TemplateStore
from trenvx.layout import DataRoot

from .server_helpers import ServerProc, make_server, pid_running, through_proxy, vm_pid, wait_until

pytestmark = pytest.mark.e2e

MiB = 1 << 20
LINKED = ("templates", "kernels", "cache")


@contextlib.contextmanager
def small_fs(path: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` MiB mounted on ``path`` for the duration."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "trenvx-test-small", str(path)],
                   check=True, timeout=10)
    try:
        yield path
    finally:
        # The server's orphan watchdog (a process of its own) may hold the state database a moment longer.
        deadline = time.monotonic() + 10
        while True:
            r = subprocess.run(["umount", str(path)], capture_output=True, text=True, timeout=30)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], timeout=30)
            raise AssertionError(f"the small filesystem at {path} was busy: {r.stderr}")


def server(tmp_path: Path, shared: Config, template: str, **kw) -> ServerProc:
    """make_server's server (VMMs jailed where the host allows, as by default)."""
    return make_server(tmp_path, shared, template=template, **kw)


def link_shared(root: Path, shared: Config, names: tuple[str, ...] = LINKED) -> None:
    for name in names:
        (root / name).symlink_to(shared.data_root / name)


def flip_byte(p: Path, offset: int) -> None:
    with open(p, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


async def run(url: str, sandbox: dict, script: str) -> tuple[int | None, str, str]:
    """(exit code, stdout, stderr) of ``sh -c script`` in the sandbox, through the server's proxy."""
    async with through_proxy(url, sandbox) as c:
        r = await c.run(["/bin/sh", "-c", script])
    return r.exit_code, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


def stop_and_check(srv: ServerProc) -> None:
    if srv.proc is not None and srv.proc.poll() is None:
        assert srv.stop() == 0, srv.log()
    assert srv.sandbox_dirs() == [], f"sandbox directories left: {srv.sandbox_dirs()}"


# -- a damaged template ---------------------------------------------------------------------------


def private_copy(srv: ServerProc, shared: Config, name: str) -> Path:
    """The server's templates directory holds its own copy of ``name``'s current build: the images
    hard-linked (never written), the memory file copied (this test damages it)."""
    src = TemplateStore(DataRoot(shared.data_root)).current(name)
    assert src.manifest.integrity is not None, "the session's build records its files' hashes"
    (srv.data_root / "templates").unlink()
    dest = srv.data_root / "templates" / name / src.build_id
    dest.mkdir(parents=True)
    for p in src.path.iterdir():
        if p.name == "memory":
            subprocess.run(["cp", "--sparse=always", str(p), str(dest / p.name)], check=True, timeout=60)
        elif p.is_file():
            (dest / p.name).hardlink_to(p)
    (dest.parent / "current").symlink_to(dest.name)
    return dest


async def test_damaged_template_is_refused_before_any_restore(tmp_path, e2e_config, test_template) -> None:
    srv = server(tmp_path, e2e_config, test_template, pools=True)
    build = private_copy(srv, e2e_config, test_template)
    srv.start()
    try:
        with srv.client() as c:
            ok = c.post("/sandboxes", json={"templateID": test_template})
            assert ok.status_code == 201, ok.text
            flip_byte(build / "memory", 100 * MiB)  # damaged while the server runs (and its pool is filled)
            for _ in range(2):  # the pool's VMs of the build are not handed out either
                bad = c.post("/sandboxes", json={"templateID": test_template})
                assert bad.status_code == 500, bad.text
                msg = bad.json()["message"]
                assert "damaged" in msg and f"'{test_template}'" in msg and build.name in msg, msg
                assert "its file memory does not match" in msg, msg
                assert f"template-manager --config <config.toml> --template {test_template} --force" in msg, msg
            assert c.delete(f"/sandboxes/{ok.json()['sandboxID']}").status_code == 204
            flip_byte(build / "memory", 100 * MiB)  # repaired: checked in full again, and accepted
            again = c.post("/sandboxes", json={"templateID": test_template})
            assert again.status_code == 201, again.text
            assert c.delete(f"/sandboxes/{again.json()['sandboxID']}").status_code == 204
        log = srv.log(400)
        assert "does not match the hash recorded" in log and "its files match their hashes" in log, log
    finally:
        stop_and_check(srv)
        srv.cleanup()


# -- the data root full ---------------------------------------------------------------------------


async def test_full_data_root_during_a_write_and_a_pause(tmp_path, e2e_config, test_template) -> None:
    srv = server(tmp_path, e2e_config, test_template, pools=False)
    for name in LINKED:
        (srv.data_root / name).unlink()
    with small_fs(srv.data_root, 48):
        link_shared(srv.data_root, e2e_config)
        srv.start()
        try:
            with srv.client() as c:
                a = c.post("/sandboxes", json={"templateID": test_template, "timeout": 120}).json()
                b = c.post("/sandboxes", json={"templateID": test_template, "timeout": 120}).json()
                pids = [vm_pid(srv, a["sandboxID"]), vm_pid(srv, b["sandboxID"])]
                # a write larger than the data root's free space: the guest sees an I/O error
                code, _, err = await run(srv.url, a, "dd if=/dev/zero of=/home/user/fill bs=1M count=96 oflag=direct")
                assert code != 0 and "Input/output error" in err, (code, err)
                assert free_bytes(srv.data_root) < 4 * MiB
                # its VM runs on (not stopped by QEMU), and so does the other sandbox
                assert await run(srv.url, a, "echo a-alive") == (0, "a-alive\n", "")
                assert await run(srv.url, b, "echo b-alive") == (0, "b-alive\n", "")
                # a pause that does not fit: 507, nothing stored, the sandbox keeps running
                p = c.post(f"/sandboxes/{b['sandboxID']}/pause")
                assert p.status_code == 507, p.text
                msg = p.json()["message"]
                assert f"the data root {srv.data_root} is full" in msg and "keeps running" in msg, msg
                bdir = srv.data_root / "sandboxes" / b["sandboxID"]
                assert not (bdir / "pause").exists() and not list(bdir.rglob("*.part"))
                assert c.get(f"/sandboxes/{b['sandboxID']}").json()["state"] == "running"
                assert await run(srv.url, b, "echo b-after-pause") == (0, "b-after-pause\n", "")
                assert all(pid_running(p) for p in pids)
                # the writer's end frees its disk: new sandboxes start again
                assert c.delete(f"/sandboxes/{a['sandboxID']}").status_code == 204
                assert wait_until(lambda: free_bytes(srv.data_root) > 30 * MiB, 10)
                d = c.post("/sandboxes", json={"templateID": test_template})
                assert d.status_code == 201, d.text
                for sb in (b, d.json()):
                    assert c.delete(f"/sandboxes/{sb['sandboxID']}").status_code == 204
        finally:
            stop_and_check(srv)
    srv.cleanup()


async def test_full_data_root_during_a_build(tmp_path, e2e_config, test_template) -> None:
    """Refused before anything is made, naming the data root and the space needed. (A build that
    fills the data root part way is reworded the same way and its staging directory removed:
    tests/unit/test_diskspace.py; making the root image here would take 30-50 s of the CI budget.)"""
    from trenvx.template.builder import TemplateBuilder

    root = tmp_path / "data"
    with small_fs(root, 32):
        link_shared(root, e2e_config, ("kernels", "cache"))
        config = e2e_config.model_copy(update={"data_root": root})
        try:
            with pytest.raises(BuildError) as e:
                await TemplateBuilder(config).build(test_template, force=True)
            assert e.value.stage == "space"
            msg = str(e.value)
            assert f"the data root {root} is full" in msg and "needs about" in msg and test_template in msg, msg
            assert "free space there" in msg
            tdir = root / "templates" / test_template
            assert sorted(p.name for p in tdir.iterdir()) == [".build.lock"], "no staging directory is left"
            assert free_bytes(root) > 30 * MiB, "nothing of the failed build takes space"
        finally:
            for name in ("kernels", "cache"):
                (root / name).unlink()
    shutil.rmtree(root, ignore_errors=True)


# -- host memory ----------------------------------------------------------------------------------


def test_memory_headroom_refuses_a_create_and_starts_nothing(tmp_path, e2e_config, test_template) -> None:
    import psutil

    huge = psutil.virtual_memory().total // MiB * 4  # more than this host will ever have available
    srv = server(tmp_path, e2e_config, test_template, pools=True, memory_headroom_mb=huge).start()
    try:
        with srv.client() as c:
            r = c.post("/sandboxes", json={"templateID": test_template})
            assert r.status_code == 503, r.text
            assert "memory_headroom_mb" in r.json()["message"] and r.headers.get("retry-after"), r.text
        kids = psutil.Process(srv.proc.pid).children(recursive=True)
        assert not [k for k in kids if k.name().startswith("qemu")], "neither the create nor a pool started a VM"
        assert srv.sandbox_dirs() == []
    finally:
        stop_and_check(srv)
        srv.cleanup()
