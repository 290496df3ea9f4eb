"""The guest image pipeline for real: the Debian kernel, the initramfs booted in QEMU (TCG), root
filesystems built with buildah, and a full boot of kernel + initramfs + ext4 root to the rootfs
init (and the agent's /health when the agent exists).

Uses the data root of TRENVX_DATA_ROOT (default /var/lib/trenvx): the kernel, the debootstrap
base and buildah's storage are cached there and reused between runs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from trenvx.config import TemplateConfig
from trenvx.kernel import ensure_initramfs, ensure_kernel
from trenvx.kernel import debian as kdebian
from trenvx.layout import DataRoot
from trenvx.build_errors import BuildError, RootfsError
from trenvx.template.image import make_ext4_image
from trenvx.template.inject import INIT_MARKER, check_python, inject_guest_files
from trenvx.template.rootfs import CONTAINER_PREFIX, Buildah, prepared_rootfs

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 not installed"),
]
needs_buildah = pytest.mark.skipif(shutil.which("buildah") is None, reason="buildah not installed")

DATA_ROOT = DataRoot(Path(os.environ.get("TRENVX_DATA_ROOT") or "/var/lib/trenvx"))
AGENT_SRC = Path(__file__).resolve().parents[2] / "src" / "trenvx" / "guest" / "agent"
QEMU_BASE = [
    "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg,tb-size=32", "-cpu", "max", "-m", "256",
    "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
]  # fmt: skip


def log(msg: str) -> None:
    print(msg, flush=True)


async def run_qemu(args: list[str], console: Path, timeout: float, until=None) -> tuple[int | None, str]:
    """Start QEMU, wait until it exits by itself (or ``until(console_text)`` is true, or the timeout);
    always kill it. Returns (exit code or None if we killed it, console text)."""
    proc = await asyncio.create_subprocess_exec(
        *QEMU_BASE, "-serial", f"file:{console}", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    rc = None
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                rc = await asyncio.wait_for(proc.wait(), 0.2)
                break
            except asyncio.TimeoutError:
                pass
            if until is not None and console.exists() and await until(console.read_text(errors="replace")):
                break
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = console.read_text(errors="replace") if console.exists() else ""
    if rc not in (0, None):
        out = (await proc.stdout.read()).decode(errors="replace") if proc.stdout else ""
        text += f"\n[qemu exit {rc}: {out}]"
    return rc, text


def _our_containers() -> set[str]:
    import subprocess

    bh = Buildah(DATA_ROOT, log)
    out = subprocess.run(bh.argv("containers", "--format", "{{.ContainerName}}"), capture_output=True, text=True)
    return {n for n in out.stdout.split() if n.startswith(CONTAINER_PREFIX)}


def _rmi(tag: str) -> None:
    import subprocess

    subprocess.run(Buildah(DATA_ROOT, log).argv("rmi", "-f", tag), capture_output=True)


def _buildah_mounts() -> list[str]:
    return [line for line in Path("/proc/mounts").read_text().splitlines() if str(DATA_ROOT.cache) in line]


# ---------------------------------------------------------------------------------------------
# kernel + initramfs


async def test_kernel_fetch_is_cached(monkeypatch):
    t0 = time.monotonic()
    k = await ensure_kernel(DATA_ROOT, "auto", log=log)
    log(f"kernel {k.version}: {time.monotonic() - t0:.1f}s")
    assert k.bzimage.is_file() and (k.modules_dir / "modules.dep").is_file()
    assert k.version.endswith("-cloud-amd64")

    async def no_apt(*a, **kw):
        raise AssertionError(f"apt must not run for a cached kernel: {a}")

    monkeypatch.setattr(kdebian, "run", no_apt)
    t0 = time.monotonic()
    again = await ensure_kernel(DATA_ROOT, "auto", log=log)
    assert again == k and time.monotonic() - t0 < 1.0
    # an explicit version of the cached kernel is found the same way
    assert await ensure_kernel(DATA_ROOT, k.version.removesuffix("-cloud-amd64"), log=log) == k


async def test_initramfs_probe_boots_under_tcg(tmp_path: Path):
    k = await ensure_kernel(DATA_ROOT, log=log)
    initrd = await ensure_initramfs(k)
    assert await ensure_initramfs(k) == initrd  # cached by its inputs
    t0 = time.monotonic()
    rc, text = await run_qemu(
        ["-kernel", str(k.bzimage), "-initrd", str(initrd), "-append", "console=ttyS0 trenvx.probe=1"],
        tmp_path / "console.log",
        timeout=120,
    )
    log(f"probe boot under TCG: {time.monotonic() - t0:.1f}s")
    assert "TRENVX-PROBE-OK" in text, text[-3000:]
    assert "TRENVX-INIT-ERROR" not in text
    assert rc == 0, "QEMU must exit by itself after the probe powers off"


async def test_initramfs_fails_cleanly_without_root_device(tmp_path: Path):
    """No disk: the init prints TRENVX-INIT-ERROR and powers off (no shell, no hang)."""
    k = await ensure_kernel(DATA_ROOT, log=log)
    initrd = await ensure_initramfs(k)
    rc, text = await run_qemu(
        ["-kernel", str(k.bzimage), "-initrd", str(initrd),
         "-append", "console=ttyS0 quiet root=/dev/vda trenvx.rootwait=1"],
        tmp_path / "console.log",
        timeout=120,
    )  # fmt: skip
    assert "TRENVX-INIT-ERROR: root device /dev/vda did not appear" in text, text[-3000:]
    assert rc == 0, "the VM must power off by itself"


# ---------------------------------------------------------------------------------------------
# root filesystems (buildah)


@needs_buildah
async def test_tiny_dockerfile_rootfs_leaves_nothing_behind(tmp_path: Path):
    (tmp_path / "tiny.Dockerfile").write_text("FROM debian:bookworm\nRUN echo hi > /hello\n")
    t = TemplateConfig(name="trenvx-test-tiny", dockerfile=str(tmp_path / "tiny.Dockerfile"), context=str(tmp_path))
    before_c, before_m = _our_containers(), _buildah_mounts()
    try:
        t0 = time.monotonic()
        async with prepared_rootfs(t, DATA_ROOT, log) as tree:
            log(f"tiny Dockerfile rootfs: {time.monotonic() - t0:.1f}s ({tree.source})")
            assert (tree.path / "hello").read_text() == "hi\n"
            assert "via" in tree.source and len(tree.digest) == 64
            check_python(tree.path)  # the debootstrap base has python3 with json
            (tree.path / "writable").write_text("yes")  # ours to modify
            assert len(_our_containers() - before_c) == 1
        assert _our_containers() == before_c, "buildah containers left behind"
        assert _buildah_mounts() == before_m, "mounts left behind"
        # unchanged inputs: the image is reused, its RUN steps do not run again; --force rebuilds it
        said: list[str] = []
        async with prepared_rootfs(t, DATA_ROOT, said.append) as tree:
            assert (tree.path / "hello").read_text() == "hi\n" and not (tree.path / "writable").exists()
        assert any("is up to date" in m for m in said), said
        said.clear()
        async with prepared_rootfs(t, DATA_ROOT, said.append, reuse_image=False):
            pass
        assert any("buildah build" in m for m in said) and not any("is up to date" in m for m in said), said
        # a changed context is a new image
        (tmp_path / "new-file").write_text("changes the context")
        said.clear()
        async with prepared_rootfs(t, DATA_ROOT, said.append):
            pass
        assert any("buildah build" in m for m in said), said
    finally:
        _rmi("localhost/trenvx-tmpl/trenvx-test-tiny:latest")


@needs_buildah
async def test_rootfs_cleanup_on_error_and_cancel(tmp_path: Path):
    before = _our_containers()
    with pytest.raises(RuntimeError, match="boom"):
        async with prepared_rootfs(TemplateConfig(name="base"), DATA_ROOT, log):
            raise RuntimeError("boom")
    assert _our_containers() == before

    entered = asyncio.Event()

    async def hold() -> None:
        async with prepared_rootfs(TemplateConfig(name="base"), DATA_ROOT, log):
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(hold())
    await asyncio.wait_for(entered.wait(), 600)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _our_containers() == before, "a cancelled build must remove its container"


@needs_buildah
async def test_failing_dockerfile_names_the_stage(tmp_path: Path):
    (tmp_path / "bad.Dockerfile").write_text("FROM debian:bookworm\nRUN echo about-to-fail && false\n")
    t = TemplateConfig(name="trenvx-test-bad", dockerfile=str(tmp_path / "bad.Dockerfile"), context=str(tmp_path))
    before = _our_containers()
    with pytest.raises(RootfsError) as ei:
        async with prepared_rootfs(t, DATA_ROOT, log):
            pass
    assert ei.value.stage == "rootfs" and "about-to-fail" in str(ei.value)
    assert _our_containers() == before


@needs_buildah
async def test_unknown_local_image_with_no_pull(tmp_path: Path):
    t = TemplateConfig(name="x", docker_img="localhost/does-not-exist:1", no_pull=True)
    with pytest.raises(BuildError, match="no_pull"):
        async with prepared_rootfs(t, DATA_ROOT, log):
            pass


# ---------------------------------------------------------------------------------------------
# the real thing: kernel + initramfs + ext4 root with the injected files


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_buildah
async def test_boot_base_rootfs_to_init(tmp_path: Path):
    k = await ensure_kernel(DATA_ROOT, log=log)
    initrd = await ensure_initramfs(k)
    has_agent = (AGENT_SRC / "__main__.py").is_file()
    agent_src = AGENT_SRC
    if not has_agent:  # the agent is not written yet: a placeholder keeps inject's contract
        agent_src = tmp_path / "agent"
        agent_src.mkdir()
        (agent_src / "__main__.py").write_text("import time\nprint('placeholder agent')\ntime.sleep(3600)\n")
    image = tmp_path / "rootfs.ext4"
    t0 = time.monotonic()
    async with prepared_rootfs(TemplateConfig(name="base"), DATA_ROOT, log) as tree:
        check_python(tree.path)
        inject_guest_files(tree.path, agent_src)
        t1 = time.monotonic()
        size = await make_ext4_image(tree.path, image, 64)
        log(f"base rootfs {t1 - t0:.1f}s, ext4 image {time.monotonic() - t1:.1f}s ({size >> 20} MiB)")

    port = _free_port()
    health: dict[str, float] = {}
    t_start = time.monotonic()

    async def ready(text: str) -> bool:
        if INIT_MARKER in text and "init" not in health:
            health["init"] = time.monotonic() - t_start
        if "TRENVX-INIT-ERROR" in text:
            return True
        if not has_agent:
            return "init" in health
        try:
            status = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status
            )
        except OSError:
            return False
        health["status"] = status
        health["health"] = time.monotonic() - t_start
        return True

    rc, text = await run_qemu(
        [
            "-kernel", str(k.bzimage), "-initrd", str(initrd),
            "-append", "console=ttyS0 quiet panic=-1 root=/dev/vda trenvx.net=10.0.2.15/24,10.0.2.2 trenvx.dns=10.0.2.3",
            "-drive", f"file={image},format=raw,if=none,id=d0,cache=unsafe", "-device", "virtio-blk-pci,drive=d0",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:49983", "-device", "virtio-net-pci,netdev=n0",
        ],
        tmp_path / "console.log",
        timeout=180,
        until=ready,
    )  # fmt: skip
    log(f"boot under TCG: init after {health.get('init', -1):.1f}s, /health after {health.get('health', -1):.1f}s")
    assert "TRENVX-INIT-ERROR" not in text, text[-3000:]
    assert "trenvx-initramfs: switching to /opt/trenvx/init on /dev/vda" in text, text[-3000:]
    assert INIT_MARKER in text, text[-3000:]
    if has_agent:
        assert health.get("status") == 204, text[-3000:]


GUEST_CHECK = r'''
import fcntl, json, os, pwd, socket, struct, sys
r = {}
m, s = os.openpty()
r["pty"] = os.ttyname(s)
r["dev_fd"] = os.path.exists("/dev/fd/0") and os.path.exists("/dev/stdin")
mounts = {l.split()[1]: l.split()[2] for l in open("/proc/mounts")}
r["mounts"] = {p: mounts.get(p) for p in ("/", "/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/tmp", "/run")}
u = pwd.getpwnam("user")
r["user"] = [u.pw_uid, u.pw_dir, u.pw_shell, os.stat(u.pw_dir).st_uid]
r["machine_id"] = open("/etc/machine-id").read()
r["pid1"] = open("/proc/1/comm").read().strip()
r["argv"] = sys.argv[1:]
r["env"] = {k: os.environ.get(k) for k in ("PATH", "HOME", "PYTHONPATH")}
r["resolv"] = open("/etc/resolv.conf").read().strip()
sk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
r["eth0"] = socket.inet_ntoa(fcntl.ioctl(sk.fileno(), 0x8915, struct.pack("256s", b"eth0"))[20:24])
r["gateway"] = [l.split()[2] for l in open("/proc/net/route").readlines()[1:] if l.split()[1] == "00000000"]
r["uid"] = os.getuid()
with open("/dev/console", "w") as c:
    c.write("TRENVX-CHECK " + json.dumps(r) + "\n")
import time
time.sleep(3600)
'''


@needs_buildah
async def test_rootfs_init_environment(tmp_path: Path):
    """What processes see under /opt/trenvx/init: PTYs, /dev/fd, tmpfs mounts, the user, the
    network from trenvx.net, the resolver from trenvx.dns, tini as PID 1 (a stand-in agent reports)."""
    import json

    k = await ensure_kernel(DATA_ROOT, log=log)
    initrd = await ensure_initramfs(k)
    agent_src = tmp_path / "agent"
    agent_src.mkdir()
    (agent_src / "__main__.py").write_text(GUEST_CHECK)
    image = tmp_path / "rootfs.ext4"
    async with prepared_rootfs(TemplateConfig(name="base"), DATA_ROOT, log) as tree:
        inject_guest_files(tree.path, agent_src)
        await make_ext4_image(tree.path, image, 16)

    async def reported(text: str) -> bool:
        return "TRENVX-CHECK " in text or "TRENVX-INIT-ERROR" in text

    _, text = await run_qemu(
        [
            "-kernel", str(k.bzimage), "-initrd", str(initrd),
            "-append", "console=ttyS0 quiet panic=-1 root=/dev/vda trenvx.net=10.0.2.15/24,10.0.2.2 trenvx.dns=10.0.2.3",
            "-drive", f"file={image},format=raw,if=none,id=d0,cache=unsafe", "-device", "virtio-blk-pci,drive=d0",
            "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
        ],
        tmp_path / "console.log",
        timeout=180,
        until=reported,
    )  # fmt: skip
    line = next((x for x in text.splitlines() if x.startswith("TRENVX-CHECK ")), None)
    assert line, text[-3000:]
    r = json.loads(line.split(" ", 1)[1])
    assert r["pty"].startswith("/dev/pts/")
    assert r["dev_fd"]
    assert r["mounts"] == {
        "/": "ext4", "/proc": "proc", "/sys": "sysfs", "/dev": "devtmpfs", "/dev/pts": "devpts",
        "/dev/shm": "tmpfs", "/tmp": "tmpfs", "/run": "tmpfs",
    }  # fmt: skip
    assert r["user"] == [1000, "/home/user", "/bin/bash", 1000]
    assert r["machine_id"] == ""
    assert r["pid1"] == "tini"
    assert r["argv"] == ["--port", "49983"]
    assert r["env"]["PYTHONPATH"] == "/opt/trenvx" and r["env"]["HOME"] == "/root" and "/usr/bin" in r["env"]["PATH"]
    assert r["resolv"] == "nameserver 10.0.2.3"
    assert r["eth0"] == "10.0.2.15"
    assert r["gateway"] == ["0202000A"]
    assert r["uid"] == 0
