"""SandboxManager without VMs: lifecycle, timeouts and the reaper, death detection, limits,
persistence and adoption after a restart. "VMs" are real processes (see server_fakes)."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from trenvx.sandbox import adopt
from trenvx.sandbox.lifecycle import InvalidTimeout
from trenvx.sandbox.limits import Admission, LimitReached, Limits, OutOfMemory
from trenvx.sandbox.manager import ManagerClosed, PauseUnsupported, PortUnavailable, SandboxConflict, SandboxNotFound
from trenvx.guest.endpoint import HybridVsockEndpoint, TcpEndpoint
from trenvx.sandbox.state import StateStore
from trenvx.vmm.cloud_hypervisor import CloudHypervisorVm
from trenvx.vmm.firecracker import FirecrackerVm
from trenvx.template.store import TemplateNotFound
from trenvx.template.build_users import USERS

from .server_fakes import UpstreamState, ThreadedServer, fake_attach, fake_manager, free_port, make_config, make_template, pid_gone, upstream_app


@pytest.fixture(scope="module")
def upstream():
    with ThreadedServer(upstream_app(UpstreamState())) as s:
        yield s


@pytest.fixture
def cfg(tmp_path: Path):
    make_template(tmp_path, "tpl")
    make_template(tmp_path, "big", mem_mb=4096)
    return make_config(tmp_path)


@pytest.fixture
def short_root():
    """A data_root short enough for the unix sockets of sandbox workdirs (108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="tx", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


MICROVMS = {"firecracker": (FirecrackerVm, "fc.sock"), "cloud-hypervisor": (CloudHypervisorVm, "ch.sock")}


async def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_create_get_list_kill_removes_process_and_files(cfg, upstream) -> None:
    async with fake_manager(cfg, upstream.port) as m:
        sb = await m.create("tpl", metadata={"k": "v"}, env_vars={"A": "1"})
        assert m.get(sb.id) is sb and m.list() == [sb]
        assert sb.workdir_exists if hasattr(sb, "workdir_exists") else sb.restored.workdir.is_dir()
        assert 299 < sb.timeout_left <= 300
        rec = m.store.get(sb.id)
        assert rec.state == "running" and rec.pid == sb.pid and rec.metadata == {"k": "v"}
        pid = sb.pid
        await m.kill(sb.id)
        assert pid_gone(pid)
        assert not sb.restored.workdir.exists()
        with pytest.raises(SandboxNotFound, match="does not exist anymore: it was killed"):
            m.get(sb.id)
        with pytest.raises(SandboxNotFound):
            await m.kill(sb.id)
        [ended] = m.ended()
        assert ended.id == sb.id and ended.end_reason == "killed" and ended.access_token == ""



@pytest.mark.parametrize("state", [True, False], ids=["sqlite", "memory"])
async def test_ended_sandboxes_are_kept_a_bounded_time_and_number(tmp_path: Path, upstream, state: bool) -> None:
    """`ls -a` and the 404s explain ended sandboxes for ended_retention_s, at most ended_retention_max
    of them, on a running server: the count holds as each one ends, the age at every reaper pass."""
    make_template(tmp_path, "tpl")
    cfg = make_config(tmp_path, ended_retention_max=3, reaper_interval_s=60)  # no reaper pass unless asked
    async with fake_manager(cfg, upstream.port, state=state) as m:
        sbs = [await m.create("tpl") for _ in range(5)]
        for sb in sbs:
            await m.kill(sb.id)
        kept = [s.id for s in sbs[2:]]
        assert [r.id for r in m.ended()] == kept, "the 3 that ended last"
        if state:
            assert [r.id for r in m.store.ended()] == kept and len(m.store.all()) == 3
        with pytest.raises(SandboxNotFound, match="anymore: it was killed"):
            m.get(kept[0])
        with pytest.raises(SandboxNotFound, match=r"does not exist \(it was killed, timed out, or never"):
            m.get(sbs[0].id)  # forgotten
        await m.reaper.tick(now=time.time() + 1800)
        assert [r.id for r in m.ended()] == kept, "within the hour"
        await m.reaper.tick(now=time.time() + 3601)  # a pass of the running reaper, past the hour
        assert m.ended() == [] and m._ended == {}
        if state:
            assert m.store.all() == []


async def test_ended_sandboxes_of_a_previous_server_are_pruned_at_start(cfg, upstream) -> None:
    """A restarted server (here with a lower limit) forgets what is past either bound before its
    first listing; one ended longer ago than the retention is never listed, pruned or not yet."""
    async with fake_manager(cfg.model_copy(update={"orchestrator": cfg.orchestrator.model_copy(
            update={"reaper_interval_s": 60})}), upstream.port) as first:
        sbs = [await first.create("tpl") for _ in range(4)]
        for sb in sbs:
            await first.kill(sb.id)
        assert len(first.ended()) == 4
        first.store.mark_ended(sbs[3].id, "killed", at=time.time() - 7200)  # ended two hours ago
        assert [r.id for r in first.ended()] == [s.id for s in sbs[:3]], "listed only within the retention"
    store = StateStore(cfg.data_root / "run" / "state.sqlite")
    assert len(store.ended()) == 4, "nothing pruned it yet"
    store.close()
    second = fake_manager(make_config(cfg.data_root, ended_retention_max=2, reaper_interval_s=60), upstream.port)
    await second.start()
    try:
        assert [r.id for r in second.store.ended()] == [s.id for s in sbs[1:3]]
        assert [r.id for r in second.ended()] == [s.id for s in sbs[1:3]]
    finally:
        await second.close()


async def test_unknown_template_and_bad_timeouts(cfg, upstream) -> None:
    async with fake_manager(cfg, upstream.port) as m:
        with pytest.raises(TemplateNotFound, match="not built"):
            await m.create("nope")
        for bad in (0, -5, 10**9):
            with pytest.raises(InvalidTimeout, match="between 1 and"):
                await m.create("tpl", timeout_s=bad)
        assert m.list() == [] and m.admission.total == 0


async def test_reaper_kills_expired_and_set_timeout_refresh_move_the_deadline(cfg, upstream) -> None:
    async with fake_manager(cfg, upstream.port) as m:
        short = await m.create("tpl", timeout_s=1)
        kept = await m.create("tpl", timeout_s=1)
        m.set_timeout(kept.id, 60)
        assert 59 < kept.timeout_left <= 60
        m.refresh(kept.id, 5)  # a refresh never shortens
        assert kept.timeout_left > 59
        m.set_timeout(kept.id, 30)  # set_timeout may shorten
        assert kept.timeout_left <= 30
        await wait_for(lambda: short.id not in {s.id for s in m.list()}, 4)
        assert m.store.get(short.id).end_reason == "timeout"
        await wait_for(lambda: not short.restored.workdir.exists() and pid_gone(short.pid), 3)
        assert [s.id for s in m.list()] == [kept.id]


async def test_a_vmm_that_dies_on_its_own_is_noticed_and_cleaned(cfg, upstream) -> None:
    async with fake_manager(cfg, upstream.port) as m:
        sb = await m.create("tpl")
        t0 = time.monotonic()
        os.kill(sb.pid, signal.SIGKILL)
        await wait_for(lambda: not m.list(), 3)
        assert time.monotonic() - t0 < 2
        assert m.store.get(sb.id).end_reason.startswith("died")
        await wait_for(lambda: not sb.restored.workdir.exists(), 3)
        with pytest.raises(SandboxNotFound, match="exited on its own"):
            m.get(sb.id)
        assert m.admission.total == 0


async def test_limits_per_host_and_per_template_even_for_concurrent_creates(cfg, upstream) -> None:
    cfg = make_config(cfg.data_root, max_sandboxes=3, max_sandboxes_per_template=2)
    async with fake_manager(cfg, upstream.port, delay_s=0.2) as m:
        results = await asyncio.gather(*(m.create("tpl") for _ in range(4)), return_exceptions=True)
        ok = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, LimitReached)]
        assert len(ok) == 2 and len(refused) == 2, results
        assert "max_sandboxes_per_template" in str(refused[0])
        make_template(cfg.data_root, "other")
        await m.create("other")
        with pytest.raises(LimitReached, match="maximum of 3 sandboxes"):
            await m.create("other")
        await m.kill(ok[0].id)
        await m.create("tpl")  # a slot was freed


async def test_memory_headroom_refuses_with_out_of_memory(cfg, upstream) -> None:
    free = 1024 << 20
    adm = Admission(Limits(100, 100, headroom_mb=512), available=lambda: free)
    async with fake_manager(cfg, upstream.port, admission=adm, delay_s=0.1) as m:
        with pytest.raises(OutOfMemory, match="4096 MiB"):
            await m.create("big")
        # two concurrent 256 MiB creates fit in 1024 - 512 headroom, a third is refused while they start
        results = await asyncio.gather(*(m.create("tpl") for _ in range(3)), return_exceptions=True)
        assert sum(isinstance(r, OutOfMemory) for r in results) == 1, results


async def test_restore_failure_releases_the_slot(cfg, upstream) -> None:
    cfg = make_config(cfg.data_root, max_sandboxes=1)
    async with fake_manager(cfg, upstream.port) as m:
        m.restorer.fail_next = RuntimeError("boom")
        with pytest.raises(RuntimeError, match="boom"):
            await m.create("tpl")
        await m.create("tpl")


async def test_ports_agent_then_forwarded_once_and_cached(cfg, upstream) -> None:
    async with fake_manager(cfg, upstream.port, forwards={8000: 41000}) as m:
        sb = await m.create("tpl")
        assert await m.port_endpoint(sb.id, 49983) == TcpEndpoint("127.0.0.1", upstream.port)
        got = await asyncio.gather(*(m.port_endpoint(sb.id, 8000) for _ in range(5)))
        assert set(got) == {TcpEndpoint("127.0.0.1", 41000)}
        assert sb.restored.vm.forward_calls == [8000]
        assert m.store.get(sb.id).ports == {8000: 41000}
        assert m.store.get(sb.id).vmm_type == "qemu"
        with pytest.raises(PortUnavailable):
            await m.port_endpoint(sb.id, 9999)
        with pytest.raises(PortUnavailable):
            await m.port_endpoint(sb.id, 70000)
        with pytest.raises(SandboxNotFound):
            await m.port_endpoint("nosuch", 8000)


async def test_pause_resume_conflicts(cfg, upstream) -> None:
    async with fake_manager(cfg, upstream.port) as m:
        sb = await m.create("tpl")
        await m.pause(sb.id)
        assert sb.state == "paused" and m.store.get(sb.id).state == "paused"
        with pytest.raises(SandboxConflict):
            await m.pause(sb.id)
        with pytest.raises(SandboxConflict, match="paused"):
            await m.port_endpoint(sb.id, 49983)
        await m.resume(sb.id)
        with pytest.raises(SandboxConflict):
            await m.resume(sb.id)


async def test_close_kills_everything_and_refuses_new_creates(cfg, upstream) -> None:
    m = fake_manager(cfg, upstream.port)
    sbs = [await m.create("tpl") for _ in range(3)]
    await m.close()
    assert all(pid_gone(s.pid) for s in sbs)
    assert list((cfg.data_root / "sandboxes").iterdir()) == []
    with pytest.raises(ManagerClosed):
        await m.create("tpl")
    store = StateStore(cfg.data_root / "run" / "state.sqlite")
    assert {r.end_reason for r in store.all()} == {"shutdown"}
    store.close()


async def test_restart_adopts_running_vms_and_cleans_dead_ones(cfg, upstream, monkeypatch) -> None:
    monkeypatch.setattr(adopt, "attach_qemu", fake_attach)
    first = fake_manager(cfg, upstream.port, keep=True)
    a = await first.create("tpl", metadata={"n": "a"}, timeout_s=100)
    b = await first.create("tpl", metadata={"n": "b"})
    assert first.restorer.kill_with_owner == [False, False], "keep mode must start VMs that outlive the server"
    await first.close()
    del first
    a_pid, b_pid = a.pid, b.pid
    a.restored.vm.process = b.restored.vm.process = None  # drop every reference to the asyncio transports
    gc.collect()
    await asyncio.sleep(0.1)
    assert not pid_gone(a_pid) and not pid_gone(b_pid), "--keep leaves the VMs running (even after GC)"
    os.kill(b_pid, signal.SIGKILL)  # one VMM dies while no server runs
    await wait_for(lambda: pid_gone(b_pid))

    # a sandbox of an older version has no entry in its build's users: adoption records it
    entry = a.restored.build.path / USERS / a.id
    entry.unlink(missing_ok=True)
    second = fake_manager(cfg, upstream.port)
    await second.start()
    try:
        assert second.adopted == [a.id] and second.cleaned == [b.id]
        sa = second.get(a.id)
        assert sa.adopted and sa.pid == a_pid and sa.metadata == {"n": "a"}
        assert entry.read_text() == str(a.restored.workdir)  # TemplateStore.prune keeps its build
        assert sa.access_token == a.access_token and sa.agent_port == upstream.port
        assert 95 < sa.timeout_left <= 100
        assert not b.restored.workdir.exists()
        with pytest.raises(SandboxNotFound, match="while the server was not running"):
            second.get(b.id)
        # death of an adopted VM (not our child) is still noticed, through its pidfd
        os.kill(a_pid, signal.SIGKILL)
        await wait_for(lambda: not second.list(), 3)
        await wait_for(lambda: not a.restored.workdir.exists(), 3)
    finally:
        await second.close()


async def test_restart_adopts_a_vm_paused_in_memory_without_asking_its_agent(cfg, monkeypatch) -> None:
    """A server of before pauses to disk left a VM paused in memory (vCPUs stopped, agent silent):
    it is adopted, still paused, on its VMM's word alone, and resumes by continuing its vCPUs."""
    monkeypatch.setattr(adopt, "attach_qemu", fake_attach)
    first = fake_manager(cfg, free_port(), keep=True)  # no agent listens there: any /health would fail
    a = await first.create("tpl")
    await a.restored.vm.pause()
    a.paused = True
    await first.close()
    second = fake_manager(cfg, a.agent_port)
    await second.start()
    try:
        sa = second.get(a.id)
        assert second.adopted == [a.id] and sa.state == "paused" and sa.pause_info is None
        await second.resume(a.id)
        assert sa.state == "running" and sa.pid == a.pid and sa.restored.vm.state.value == "running"
    finally:
        await second.close()


async def test_a_sandbox_paused_to_disk_survives_a_restart_and_resumes(cfg, upstream, monkeypatch) -> None:
    """Paused to disk, a sandbox is a record and files: a restarted manager lists it as paused
    (nothing to adopt), its timeout frozen, and resumes it with its id, token and metadata."""
    monkeypatch.setattr(adopt, "attach_qemu", fake_attach)
    first = fake_manager(cfg, upstream.port)  # no --keep: running sandboxes die with it, paused ones stay
    a = await first.create("tpl", timeout_s=100, metadata={"k": "v"}, env_vars={"E": "1"})
    b = await first.create("tpl")
    pid = a.pid
    await first.pause(a.id)
    assert pid_gone(pid) and a.pid == 0 and a.restored.workdir.is_dir() and (a.restored.workdir / "pause" / "vmstate").is_file()
    await first.close()
    assert pid_gone(b.pid) and not b.restored.workdir.exists()
    second = fake_manager(cfg, upstream.port)
    await second.start()
    try:
        assert second.recovered_paused == [a.id] and second.adopted == [] and second.cleaned == []
        sa = second.get(a.id)
        assert sa.state == "paused" and sa.pause_info is not None and 95 < sa.timeout_left <= 100
        assert second.store.get(a.id).state == "paused"
        await asyncio.sleep(0.2)  # the reaper runs: a paused sandbox's timeout does not
        assert second.get(a.id).state == "paused"
        await second.resume(a.id, timeout_s=10)
        assert sa.state == "running" and sa.access_token == a.access_token and sa.metadata == {"k": "v"}
        assert sa.env_vars == {"E": "1"} and 90 < sa.timeout_left <= 100  # what was left, not the shorter 10 s
        assert await sa.agent.health() and not (sa.restored.workdir / "pause").exists()
        assert second.store.get(a.id).state == "running" and second.store.get(a.id).pause == {}
    finally:
        await second.close()


async def test_a_paused_sandbox_whose_files_are_gone_is_cleaned_up_on_restart(cfg, upstream) -> None:
    first = fake_manager(cfg, upstream.port)
    a = await first.create("tpl")
    await first.pause(a.id)
    await first.close()
    shutil.rmtree(a.restored.workdir / "pause")
    second = fake_manager(cfg, upstream.port)
    await second.start()
    try:
        assert second.cleaned == [a.id] and not a.restored.workdir.exists()
        with pytest.raises(SandboxNotFound, match="saved state incomplete"):
            second.get(a.id)
    finally:
        await second.close()


async def test_restart_kills_adopted_vms_on_a_normal_stop(cfg, upstream, monkeypatch) -> None:
    monkeypatch.setattr(adopt, "attach_qemu", fake_attach)
    first = fake_manager(cfg, upstream.port, keep=True)
    a = await first.create("tpl")
    await first.close()
    second = fake_manager(cfg, upstream.port)
    await second.start()
    assert second.adopted == [a.id]
    await second.close()
    await wait_for(lambda: pid_gone(a.pid))
    assert not a.restored.workdir.exists()


async def test_a_recycled_pid_is_not_adopted(cfg, upstream, monkeypatch) -> None:
    monkeypatch.setattr(adopt, "attach_qemu", fake_attach)
    first = fake_manager(cfg, upstream.port, keep=True)
    a = await first.create("tpl")
    await first.close()
    store = StateStore(cfg.data_root / "run" / "state.sqlite")
    rec = store.get(a.id)
    rec.pid_started_at -= 1000  # as if the pid now belonged to a process started later
    store.put(rec)
    store.close()
    second = fake_manager(cfg, upstream.port)
    await second.start()
    try:
        assert second.adopted == [] and second.cleaned == [a.id]
    finally:
        await second.close()
        os.kill(a.pid, signal.SIGKILL)


async def test_orphaned_sandbox_dirs_are_swept_only_when_dead_and_old(cfg, upstream) -> None:
    sandboxes = cfg.data_root / "sandboxes"
    dead = sandboxes / "deadorphan"
    (dead / "vm").mkdir(parents=True)
    (dead / "vm" / "vmm.pid").write_text("999999999")
    young = sandboxes / "youngorphan"
    (young / "vm").mkdir(parents=True)
    (young / "vm" / "vmm.pid").write_text("999999999")
    alive = sandboxes / "aliveorphan"
    (alive / "vm").mkdir(parents=True)
    (alive / "vm" / "vmm.pid").write_text(str(os.getpid()))
    old = time.time() - 3600
    for d in (dead, alive):
        os.utime(d, (old, old))
    async with fake_manager(cfg, upstream.port):
        pass
    assert not dead.exists() and young.exists() and alive.exists()


# -- Firecracker / Cloud Hypervisor sandboxes (agent over hybrid vsock, VMM behind its API socket) -----------


@pytest.mark.parametrize("vmm", list(MICROVMS))
async def test_a_vsock_sandbox_reaches_only_its_agent(short_root, upstream, vmm) -> None:
    make_template(short_root, "tpl", vmm_type=vmm)
    m = fake_manager(make_config(short_root), upstream.port, vmm=vmm)
    try:
        sb = await m.create("tpl")
        endpoint = await m.port_endpoint(sb.id, 49983)
        assert endpoint == HybridVsockEndpoint(sb.restored.workdir / "vm" / "v.sock", 49983)
        assert await sb.agent.health()
        with pytest.raises(PortUnavailable, match=f"runs on {vmm}.*no tap networking.*vmm_type = \"qemu\""):
            await m.port_endpoint(sb.id, 8080)
        assert sb.restored.vm.forward_calls == []
        assert m.store.get(sb.id).vmm_type == vmm
    finally:
        await m.close()
        await m.restorer.close_standins()


@pytest.mark.parametrize("vmm", list(MICROVMS))
async def test_restart_adopts_a_microvm_through_its_api_socket(short_root, upstream, vmm) -> None:
    make_template(short_root, "tpl", vmm_type=vmm)
    cfg = make_config(short_root)
    first = fake_manager(cfg, upstream.port, keep=True, vmm=vmm)
    second = None
    try:
        a = await first.create("tpl", timeout_s=100)
        await first.close()
        _, api = first.restorer.standins[a.id]
        second = fake_manager(cfg, upstream.port, vmm=vmm)
        await second.start()
        assert second.adopted == [a.id] and second.cleaned == []
        sa = second.get(a.id)
        cls, sock = MICROVMS[vmm]
        assert isinstance(sa.restored.vm, cls) and sa.pid == a.pid and sa.adopted
        assert sa.restored.vm.api.socket_path == a.restored.workdir / "vm" / sock
        assert await second.port_endpoint(a.id, 49983) == a.restored.vm.agent_endpoint
        assert await sa.agent.health() and sa.access_token == a.access_token
        # pausing to disk is QEMU's only: refused, the sandbox runs on
        with pytest.raises(PauseUnsupported, match="not supported by this VMM yet"):
            await second.pause(a.id)
        assert api.state == "Running" and sa.state == "running"
        await second.kill(a.id)
        assert pid_gone(a.pid) and not a.restored.workdir.exists()
    finally:
        if second is not None:
            await second.close()
        await first.restorer.close_standins()


@pytest.mark.parametrize("vmm", list(MICROVMS))
async def test_a_microvm_whose_api_socket_is_gone_is_not_adopted(short_root, upstream, vmm) -> None:
    make_template(short_root, "tpl", vmm_type=vmm)
    cfg = make_config(short_root)
    first = fake_manager(cfg, upstream.port, keep=True, vmm=vmm)
    try:
        a = await first.create("tpl")
        await first.close()
        await first.restorer.standins[a.id][1].close()
        (a.restored.workdir / "vm" / MICROVMS[vmm][1]).unlink()
        second = fake_manager(cfg, upstream.port, vmm=vmm)
        await second.start()
        try:
            assert second.adopted == [] and second.cleaned == [a.id]
            with pytest.raises(SandboxNotFound, match="could not re-attach.*API socket .* is gone"):
                second.get(a.id)
            await wait_for(lambda: pid_gone(a.pid))
        finally:
            await second.close()
    finally:
        await first.restorer.close_standins()


async def test_a_cloud_hypervisor_socket_answering_for_another_pid_is_not_adopted(short_root, upstream) -> None:
    make_template(short_root, "tpl", vmm_type="cloud-hypervisor")
    cfg = make_config(short_root)
    first = fake_manager(cfg, upstream.port, keep=True, vmm="cloud-hypervisor")
    try:
        a = await first.create("tpl")
        await first.close()
        first.restorer.standins[a.id][1].pid = 1
        second = fake_manager(cfg, upstream.port, vmm="cloud-hypervisor")
        await second.start()
        try:
            assert second.adopted == [] and second.cleaned == [a.id]
            with pytest.raises(SandboxNotFound, match=f"pid 1, not the recorded pid {a.pid}"):
                second.get(a.id)
        finally:
            await second.close()
    finally:
        await first.restorer.close_standins()


async def test_a_record_whose_vmm_disagrees_with_its_build_is_not_adopted(short_root, upstream, monkeypatch) -> None:
    monkeypatch.setattr(adopt, "attach_qemu", fake_attach)
    make_template(short_root, "tpl")
    cfg = make_config(short_root)
    first = fake_manager(cfg, upstream.port, keep=True)
    a = await first.create("tpl")
    await first.close()
    store = StateStore(cfg.data_root / "run" / "state.sqlite")
    rec = store.get(a.id)
    rec.vmm_type = "firecracker"
    store.put(rec)
    store.close()
    second = fake_manager(cfg, upstream.port)
    await second.start()
    try:
        assert second.adopted == [] and second.cleaned == [a.id]
        with pytest.raises(SandboxNotFound, match="recorded as a firecracker VM but its template build .* qemu"):
            second.get(a.id)
    finally:
        await second.close()
        if not pid_gone(a.pid):
            os.kill(a.pid, signal.SIGKILL)
