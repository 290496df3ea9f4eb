"""Issue 2 end to end: a template built from a Dockerfile, sandboxes restored from its snapshot.

Every test here boots real VMs (TCG on machines without usable KVM) through the real code path:
TemplateBuilder -> VMM snapshot -> SnapshotRestore -> guest agent. The sandbox-lifecycle tests run
once per VMM (``vmm_params()``: QEMU, and Firecracker / Cloud Hypervisor where ``trenvx doctor``
finds them usable; skipped with its reason otherwise), each on the test template built for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import pytest

from tests.conftest import E2E_CONFIG
from tests.vmm_matrix import vmm_params
from trenvx.config import VmmType
from trenvx.guest.client import AgentError
from trenvx.sandbox.manager import SandboxManager, SandboxNotFound
from trenvx.template.store import TemplateStore
from trenvx.layout import DataRoot

pytestmark = pytest.mark.e2e

HELLO = "python3 -c \"print('Hello World')\""
VMMS = vmm_params(str(E2E_CONFIG))
"""QEMU, Firecracker, Cloud Hypervisor: skipped with ``trenvx doctor``'s reason where unusable (binaries
from PATH or the e2e config's ``fc_binary_path`` / ``ch_binary_path``)."""


async def test_build_produced_a_complete_manifest(e2e_config, test_template) -> None:
    build = TemplateStore(DataRoot(e2e_config.data_root)).current(test_template)
    m = build.manifest
    assert m.vmm_type == "qemu" and m.machine.accelerator in ("kvm", "tcg")
    assert set(m.stage_seconds) >= {"kernel", "rootfs", "boot", "start", "snapshot"}
    assert m.sizes["memory_bytes"] == 256 * 2**20
    assert 0 < m.sizes["vmstate_bytes"] < 8 * 2**20, "device state only: RAM must stay in the memory file"
    assert build.rootfs.stat().st_mode & 0o222 == 0, "the template's disk is read-only once published"
    assert "Dockerfile" in m.rootfs_source


async def test_unchanged_inputs_skip_the_build(e2e_config, test_template) -> None:
    from trenvx.template.builder import TemplateBuilder

    t0 = time.perf_counter()
    result = await TemplateBuilder(e2e_config).build(test_template)
    assert result.skipped and time.perf_counter() - t0 < 10


@pytest.mark.parametrize("vmm_type", VMMS)
async def test_restore_runs_hello_world_and_the_start_cmd_is_running(vmm_managers, vmm_type: VmmType) -> None:
    manager = await vmm_managers.get(vmm_type)
    sb = await manager.create()
    try:
        # a hot pooled VM was loaded before the create (the session's manager has pools): its
        # create resumes and inits it; a warm or cold one also loads the snapshot on the create's path
        expected = {"resume", "init"} | ({"load"} if sb.restored.source != "hot" else set())
        assert expected <= set(sb.start_times), (sb.restored.source, sb.start_times)
        res = await sb.run(HELLO)
        assert (res.stdout, res.exit_code) == (b"Hello World\n", 0), res
        # the Dockerfile's RUN step is in the image, the start_cmd's server survived the snapshot
        assert (await sb.run("cat /etc/trenvx-e2e")).stdout == b"built-by-dockerfile\n"
        page = await sb.run(["python3", "-c", "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8080/').read().decode())"])
        assert b"hello from the template" in page.stdout, page
    finally:
        await manager.kill(sb.id)
    with pytest.raises(SandboxNotFound):
        manager.get(sb.id)


@pytest.mark.parametrize("vmm_type", VMMS)
async def test_five_sandboxes_at_once_each_see_only_their_own_writes(vmm_managers, vmm_type: VmmType) -> None:
    manager = await vmm_managers.get(vmm_type)
    sbs = await asyncio.gather(*(manager.create() for _ in range(5)))
    try:
        async def write_then_read(i: int) -> bytes:
            sb = sbs[i]
            r = await sb.run(f"echo sandbox-{i} > /root/mine.txt && sync && ls /root && cat /root/mine.txt")
            assert r.exit_code == 0, r
            return r.stdout

        outs = await asyncio.gather(*(write_then_read(i) for i in range(5)))
        for i, out in enumerate(outs):
            assert out.endswith(f"sandbox-{i}\n".encode())
            assert out.count(b"mine.txt") == 1
        # a fresh sandbox does not see any of those writes
        fresh = await manager.create()
        try:
            r = await fresh.run("test -e /root/mine.txt")
            assert r.exit_code == 1
        finally:
            await manager.kill(fresh.id)
    finally:
        await asyncio.gather(*(manager.kill(sb.id) for sb in sbs))


async def test_sandboxes_from_one_snapshot_do_not_share_random_state(manager: SandboxManager) -> None:
    sbs = await asyncio.gather(*(manager.create() for _ in range(3)))
    try:
        probe = "import uuid, os, socket; print(uuid.uuid4(), os.urandom(16).hex(), socket.gethostname(), open('/etc/machine-id').read().strip())"
        outs = [(await sb.run(["python3", "-c", probe])).stdout.decode().split() for sb in sbs]
        for column in range(4):
            values = [o[column] for o in outs]
            assert len(set(values)) == 3, f"column {column} repeats across sandboxes: {values}"
        for sb, o in zip(sbs, outs):
            assert o[2] == sb.id
        # the clock was set from the host's at restore, not left at the snapshot's time
        guest_now = float((await sbs[0].run(["python3", "-c", "import time; print(time.time())"])).stdout)
        assert abs(guest_now - time.time()) < 5
    finally:
        await asyncio.gather(*(manager.kill(sb.id) for sb in sbs))


@pytest.fixture
async def sandbox(manager: SandboxManager):
    sb = await manager.create(env_vars={"SANDBOX_VAR": "from-create"})
    yield sb
    await manager.kill(sb.id)


async def test_streaming_output_arrives_in_order_and_before_the_end(sandbox) -> None:
    script = "for i in 1 2 3 4 5; do echo out-$i; echo err-$i >&2; sleep 0.3; done; exit 3"
    events = []
    first_data_at = end_at = None
    async for ev in sandbox.agent.start(["/bin/sh", "-c", script]):
        events.append(ev)
        if ev.kind in ("stdout", "stderr") and first_data_at is None:
            first_data_at = time.monotonic()
        if ev.kind == "end":
            end_at = time.monotonic()
    assert events[0].kind == "start" and events[0].pid
    assert events[-1].kind == "end" and events[-1].exit_code == 3
    out = b"".join(e.data for e in events if e.kind == "stdout")
    err = b"".join(e.data for e in events if e.kind == "stderr")
    assert out == b"".join(b"out-%d\n" % i for i in range(1, 6))
    assert err == b"".join(b"err-%d\n" % i for i in range(1, 6))
    assert first_data_at is not None and end_at is not None and end_at - first_data_at > 0.8


async def test_env_cwd_exit_codes_and_non_utf8_output(sandbox) -> None:
    r = await sandbox.run("echo $SANDBOX_VAR $EXTRA; pwd", envs={"EXTRA": "per-call"}, cwd="/tmp")
    assert r.stdout == b"from-create per-call\n/tmp\n"
    assert (await sandbox.run("exit 42")).exit_code == 42
    r = await sandbox.run(["python3", "-c", "import sys; sys.stdout.buffer.write(bytes(range(256)))"])
    assert r.stdout == bytes(range(256))


async def test_stdin_and_signals(sandbox) -> None:
    r = await sandbox.run(["cat"], stdin=b"piped\x00bytes")
    assert r.stdout == b"piped\x00bytes"
    stream = sandbox.agent.start(["sleep", "600"])
    start = await stream.__anext__()
    assert start.kind == "start"
    await sandbox.agent.send_signal(start.pid, "SIGKILL")
    end = [ev async for ev in stream][-1]
    assert end.kind == "end" and end.exit_code != 0


async def test_large_file_upload_and_download_keep_their_hash(sandbox, tmp_path: Path) -> None:
    data = os.urandom(50 * 2**20)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    await sandbox.agent.upload("/root/big.bin", src)
    r = await sandbox.run("sha256sum /root/big.bin")
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    dest = tmp_path / "back.bin"
    await sandbox.agent.download("/root/big.bin", dest)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()


async def test_missing_files_and_bad_paths_are_clear_errors(sandbox, tmp_path: Path) -> None:
    with pytest.raises(AgentError) as ei:
        await sandbox.agent.download("/no/such/file", tmp_path / "x")
    assert "not" in str(ei.value).lower()
    with pytest.raises(AgentError):
        await sandbox.agent.stat("/no/such/file")
    with pytest.raises(AgentError):
        await sandbox.agent.list_dir("/etc/hostname")  # a file, not a directory


async def test_killing_an_unknown_sandbox_is_an_error(manager: SandboxManager) -> None:
    with pytest.raises(SandboxNotFound, match="does not exist"):
        await manager.kill("nosuchsandbox")
