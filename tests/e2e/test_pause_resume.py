"""Pause to disk and resume on real VMs (issue 14 items 1 and 2).

Through E2B's unmodified ``e2b`` package and the HTTP API of a real ``trenvx serve``: ten
pause/resume cycles of one sandbox lose nothing (files, background processes and what they
write, environment); a filesystem-only pause keeps a write made just before it and ends the
processes; a paused sandbox survives a server restart and the next server resumes it; bad
requests change nothing; what a pause stores is far below the sandbox's RAM. And the stream
filter and merge (trenvx.vmm.qemu_stream) on a migration stream captured from a real VM.
"""

from __future__ import annotations

import asyncio
import io
import mmap
import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest

from trenvx.guest.client import AgentClient
from trenvx.vmm import SnapshotFiles, qemu_stream
from trenvx.vmm.qemu import QemuVm

from .server_helpers import e2b_pointed_at, make_server, pid_running, running_server, through_proxy, vm_pid, wait_until

pytestmark = pytest.mark.e2e

e2b = pytest.importorskip("e2b")

API_KEY = "pause-key"
HOME = "/home/user"


@pytest.fixture(scope="module")
def server(tmp_path_factory, e2e_config, test_template):
    with running_server(tmp_path_factory.mktemp("pause"), e2e_config, template=test_template, api_key=API_KEY,
                        pools=False) as srv:
        yield srv


@pytest.fixture
def e2b_env(server):
    with e2b_pointed_at(server.url, API_KEY):
        yield server


def lines(sbx, path: str) -> list[int]:
    return [int(x) for x in sbx.files.read(path).split()]


def detail(server, sid: str) -> dict:
    with server.client() as c:
        r = c.get(f"/sandboxes/{sid}")
    assert r.status_code == 200, r.text
    return r.json()


def test_ten_cycles_lose_nothing(e2b_env, test_template) -> None:
    """Each cycle writes a file and starts a background process writing a counter; after each
    resume every file is there, every process runs on (its counter kept and still growing) and
    the environment is the sandbox's."""
    from e2b import Sandbox, SandboxQuery, SandboxState

    sbx = Sandbox.create(test_template, timeout=900, envs={"CYCLE_ENV": "kept"}, metadata={"test": "cycles"})
    sid, token = sbx.sandbox_id, sbx._envd_access_token
    pids: list[int] = []
    try:
        for i in range(10):
            sbx.files.write(f"{HOME}/file{i}.txt", f"content of cycle {i}")
            # timeout=0: no deadline (the SDK's default of 60 s kills the first cycles' processes
            # once ten cycles take longer than that, as they do on a loaded host).
            h = sbx.commands.run(f"i=0; while :; do echo $i >> {HOME}/bg{i}.log; i=$((i+1)); sleep 0.3; done",
                                 background=True, timeout=0)
            pids.append(h.pid)
            assert wait_until(lambda: sbx.files.exists(f"{HOME}/bg{i}.log") and lines(sbx, f"{HOME}/bg{i}.log"), 60)
            before = {j: lines(sbx, f"{HOME}/bg{j}.log") for j in range(i + 1)}

            assert sbx.pause() is True
            d = detail(e2b_env, sid)
            assert d["state"] == "paused" and d["trenvx"].get("pid") is None
            pause = d["trenvx"]["pause"]
            assert pause["kind"] == "memory" and pause["frozen"], pause
            if i == 0:
                # What a pause stores is what the sandbox changed, not its RAM (a correctness check
                # of the diff: an idle sandbox changed a few MiB of its 256).
                assert pause["storedBytes"] < 0.5 * d["memoryMB"] * (1 << 20), pause
                print(f"\nfirst pause: {pause['storedBytes'] / (1 << 20):.1f} MiB stored ({pause['ramPages']} pages) "
                      f"of {d['memoryMB']} MiB RAM, in {pause['pauseSeconds']:.2f} s")
            paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED], metadata={"test": "cycles"}))
            assert [s.sandbox_id for s in paused.next_items()] == [sid]
            assert not sbx.is_running()

            t0 = time.monotonic()
            sbx.connect()
            resumed_in = time.monotonic() - t0
            assert sbx.is_running() and sbx.get_info().state == SandboxState.RUNNING
            for j in range(i + 1):
                assert sbx.files.read(f"{HOME}/file{j}.txt") == f"content of cycle {j}"
            assert sbx.commands.run("echo $CYCLE_ENV").stdout == "kept\n"
            running = {p.pid for p in sbx.commands.list()}
            assert set(pids) <= running, (pids, running)
            for j in range(i + 1):
                after = lines(sbx, f"{HOME}/bg{j}.log")
                assert after[:len(before[j])] == before[j], f"process {j}'s output before the pause changed"
            # ... and every process goes on writing
            grown = {j: len(lines(sbx, f"{HOME}/bg{j}.log")) for j in range(i + 1)}
            assert wait_until(lambda: all(len(lines(sbx, f"{HOME}/bg{j}.log")) > grown[j] for j in range(i + 1)), 60)
            print(f"cycle {i}: resumed in {resumed_in:.2f} s")
        assert detail(e2b_env, sid)["envdAccessToken"] == token
        text = httpx.get(f"{e2b_env.url}/metrics", headers={"X-API-Key": API_KEY}).text
        assert 'trenvx_pauses_total{kind="memory",outcome="ok"' in text and "trenvx_resumes_total" in text
    finally:
        sbx.kill()


def test_filesystem_pause_keeps_a_last_write_and_ends_processes(e2b_env, test_template) -> None:
    """``mode="filesystem"``: the guest syncs and freezes its filesystems, the VM ends; the resume
    boots the template's kernel on the sandbox's own disk: files are there (also one written an
    instant before the pause), processes are not; identity and environment are the sandbox's."""
    from e2b import Sandbox

    sbx = Sandbox.create(test_template, timeout=600, envs={"FS_ENV": "still"})
    try:
        sbx.commands.run("sleep 1000", background=True)
        # written and not synced: only the freeze's sync puts it on the disk
        sbx.commands.run(f"echo last-word > {HOME}/last.txt")
        assert sbx.pause(mode="filesystem") is True
        d = detail(e2b_env, sbx.sandbox_id)
        assert d["state"] == "paused" and d["trenvx"]["pause"]["kind"] == "filesystem"
        assert d["trenvx"]["pause"]["storedBytes"] == 0
        sbx.connect()
        assert sbx.files.read(f"{HOME}/last.txt") == "last-word\n"
        assert not [p for p in sbx.commands.list() if p.cmd == "sleep" or "sleep 1000" in " ".join(p.args)]
        r = sbx.commands.run("echo $FS_ENV; hostname; whoami")
        assert r.stdout == f"still\n{sbx.sandbox_id}\nuser\n"
        # a booted sandbox pauses with its memory and resumes like any other
        sbx.commands.run("sleep 1000", background=True)
        assert sbx.pause() is True
        sbx.connect()
        assert [p for p in sbx.commands.list() if "1000" in " ".join(p.args)]
        assert sbx.files.read(f"{HOME}/last.txt") == "last-word\n"
    finally:
        sbx.kill()


def test_bad_requests_change_nothing(e2b_env, test_template) -> None:
    from e2b import Sandbox
    from e2b.exceptions import NotFoundException

    with pytest.raises(NotFoundException):
        Sandbox.pause("nosuchsandbox0000000")
    sbx = Sandbox.create(test_template, timeout=300)
    sid = sbx.sandbox_id
    sbx.files.write(f"{HOME}/kept.txt", "kept")
    assert sbx.pause() is True
    stored = detail(e2b_env, sid)["trenvx"]["pause"]
    assert sbx.pause() is False  # 409: already paused
    with httpx.Client(base_url=e2b_env.url, headers={"X-API-Key": API_KEY}, timeout=120) as c:
        r = c.post(f"/sandboxes/{sid}/pause", json={"memory": False})
        assert r.status_code == 409 and "already paused" in r.json()["message"]
        assert c.post(f"/sandboxes/{sid}/pause", json={"memory": 3}).status_code == 400
    assert detail(e2b_env, sid)["trenvx"]["pause"] == stored, "the refused requests changed its saved state"
    sbx.connect()
    assert sbx.files.read(f"{HOME}/kept.txt") == "kept"
    workdir_count = len(e2b_env.sandbox_dirs())
    sbx.kill()
    assert len(e2b_env.sandbox_dirs()) == workdir_count - 1
    with pytest.raises(NotFoundException):
        Sandbox.connect(sid)
    with httpx.Client(base_url=e2b_env.url, headers={"X-API-Key": API_KEY}, timeout=60) as c:
        for path in ("resume", "pause", "connect"):
            r = c.post(f"/sandboxes/{sid}/{path}")
            assert r.status_code == 404 and "killed" in r.json()["message"], r.text


def test_killing_a_paused_sandbox_removes_its_files(e2b_env, test_template) -> None:
    from e2b import Sandbox

    sbx = Sandbox.create(test_template, timeout=300)
    sid = sbx.sandbox_id
    assert sbx.pause() is True
    workdir = e2b_env.data_root / "sandboxes" / sid
    assert (workdir / "pause" / "vmstate").is_file()
    assert oct(workdir.stat().st_mode & 0o777) == "0o700" and oct((workdir / "pause" / "vmstate").stat().st_mode & 0o777) == "0o600"
    assert Sandbox.kill(sid) is True
    assert not workdir.exists()


async def test_a_paused_sandbox_survives_a_server_restart(tmp_path, e2e_config, test_template) -> None:
    """The server stops (normally: running sandboxes die with it); a paused sandbox is a record and
    files, so the next server lists it as paused and resumes it with its state and processes."""
    srv = make_server(tmp_path, e2e_config, template=test_template, pools=False).start(keep=False)
    try:
        with srv.client(timeout=300) as c:
            sb = c.post("/sandboxes", json={"templateID": "base", "timeout": 300, "metadata": {"role": "paused"}}).json()
            other = c.post("/sandboxes", json={"templateID": "base"}).json()
        sid = sb["sandboxID"]
        async with through_proxy(srv.url, sb) as agent:
            r = await agent.run(["/bin/sh", "-c", f"echo before-restart > {HOME}/marker; "
                                 f"nohup sh -c 'i=0; while :; do echo $i >> {HOME}/count; i=$((i+1)); sleep 0.5; done' "
                                 ">/dev/null 2>&1 &"])
            assert r.exit_code == 0
        pid = vm_pid(srv, sid)
        with srv.client(timeout=300) as c:
            assert c.post(f"/sandboxes/{sid}/pause").status_code == 204
        assert not pid_running(pid)

        assert srv.stop(signal.SIGTERM) == 0
        assert srv.sandbox_dirs() == [sid], "the running sandbox dies with the server, the paused one stays"

        srv.start(keep=False)
        with srv.client(timeout=300) as c:
            info = c.get(f"/sandboxes/{sid}").json()
            assert info["state"] == "paused" and info["metadata"] == {"role": "paused"}, info
            assert 250 < info["trenvx"]["timeoutLeft"] <= 300
            listed = c.get("/v2/sandboxes", params={"state": "paused"}).json()
            assert [s["sandboxID"] for s in listed] == [sid]
            assert c.get(f"/sandboxes/{other['sandboxID']}").status_code == 404
            r = c.post(f"/sandboxes/{sid}/connect", json={"timeout": 120})
            assert r.status_code == 201 and r.json()["envdAccessToken"] == sb["envdAccessToken"]
        async with through_proxy(srv.url, sb) as agent:
            r = await agent.run(["/bin/sh", "-c", f"cat {HOME}/marker; wc -l < {HOME}/count"])
            marker, count = r.stdout.decode().split()
            assert marker == "before-restart" and int(count) > 0
            # the counter process runs on in the resumed sandbox
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                now = int((await agent.run(["/bin/sh", "-c", f"wc -l < {HOME}/count"])).stdout)
                if now > int(count):
                    break
                await asyncio.sleep(0.5)
            assert now > int(count), "the counter process does not run after the resume"
        with srv.client() as c:
            assert c.delete(f"/sandboxes/{sid}").status_code == 204
        assert srv.sandbox_dirs() == []
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.stop()
    assert srv.sandbox_dirs() == []
    srv.cleanup()


def _private_bytes(pid: int) -> int:
    """Private (copied) bytes of a QEMU's guest RAM: its mapping of the template's memory file."""
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if not first.endswith(":"):  # the header line of a mapping
                inside = line.rstrip().endswith("/memory")
            elif inside and first == "Private_Dirty:":
                total += int(line.split()[1]) * 1024
    return total


async def test_filter_and_merge_on_a_stream_captured_from_a_real_vm(manager, test_template, tmp_path) -> None:
    """A running VM's whole state, captured unfiltered (every page of its RAM, as a migration of a
    privately mapped RAM sends it); the filter keeps exactly its pages that differ from the
    template's, the merge of the filtered and of the raw stream give the same memory file, and a VM
    restored from the merged memory file and stream runs, with what the guest had."""
    restorer = manager.restorer
    build = manager.templates.current(test_template)
    driver = restorer.driver(build)
    prepared = await restorer.prepare(build, "capture" + os.urandom(6).hex())
    vm2 = None
    try:
        await restorer.start(build, prepared)
        vm = prepared.vm
        assert isinstance(vm, QemuVm)
        async with AgentClient.for_endpoint(vm.agent_endpoint, timeout=120) as agent:
            r = await agent.run(["/bin/sh", "-c", "head -c 8M /dev/urandom > /dev/shm/noise; echo captured > /root/mark; sync"])
            assert r.exit_code == 0, r.stderr
        private = _private_bytes(vm.pid)
        raw = tmp_path / "raw"
        await vm.pause()
        await vm.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
        fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            await driver._send_fd(vm, fd, "raw")
        finally:
            os.close(fd)
        await driver._migrate_and_wait(vm, "migrate", {"uri": "fd:raw"})
        await vm.quit()

        template = build.snapshot.memory_file
        mem_bytes = build.machine.mem_mb << 20
        with open(raw, "rb") as f:
            whole = qemu_stream.summarize(f)
        assert whole.ignore_shared and whole.machine.startswith("pc-q35")
        assert [b.length for b in whole.blocks if b.name == qemu_stream.MAIN_BLOCK] == [mem_bytes]
        assert whole.pages_in[qemu_stream.MAIN_BLOCK] == mem_bytes // qemu_stream.PAGE_SIZE, "every page once"

        # the pages that differ from the template, counted here on their own
        differ = 0
        with open(template, "rb") as t, mmap.mmap(t.fileno(), 0, prot=mmap.PROT_READ) as tpl:
            def count(rec: qemu_stream.PageRecord) -> bool:
                nonlocal differ
                if rec.block == qemu_stream.MAIN_BLOCK:
                    page = tpl[rec.offset:rec.offset + qemu_stream.PAGE_SIZE]
                    same = page == bytes(qemu_stream.PAGE_SIZE) if rec.zero else page == rec.data
                    differ += not same
                return True

            with open(raw, "rb") as f:
                qemu_stream.rewrite(f, None, count)
        filtered = tmp_path / "filtered"
        with open(raw, "rb") as src, open(filtered, "wb") as dst:
            stats = qemu_stream.filter_against(src, dst, template)
        assert stats.kept(qemu_stream.MAIN_BLOCK) == differ
        assert 8 << 20 <= differ * qemu_stream.PAGE_SIZE < mem_bytes // 2
        print(f"\nraw stream {raw.stat().st_size >> 20} MiB; filtered {filtered.stat().st_size / (1 << 20):.1f} MiB: "
              f"{differ} pages of RAM differ from the template ({differ * 4096 / (1 << 20):.1f} MiB), the VM's "
              f"private RAM was {private / (1 << 20):.1f} MiB; device state {stats.device_bytes / 1024:.0f} KiB")

        merged_raw, merged_filtered = tmp_path / "memory-raw", tmp_path / "memory"
        with open(raw, "rb") as src:
            qemu_stream.merge_into(src, io.BytesIO(), template, merged_raw)
        with open(filtered, "rb") as src, open(tmp_path / "vmstate", "wb") as dst:
            m = qemu_stream.merge_into(src, dst, template, merged_filtered)
        assert m.kept(qemu_stream.MAIN_BLOCK) == 0
        assert _same_file(merged_raw, merged_filtered), "filtered and raw stream merge into different memory"
        merged_raw.unlink()

        # a VM restored from the merged memory file (mapped privately, as a template's) and stream;
        # the memory file in the sandbox's directory: a jailed VMM reads nothing of a 0700 tmp_path
        memory = prepared.workdir / "merged-memory"
        shutil.move(merged_filtered, memory)
        memory.chmod(0o444)
        import dataclasses

        spec = dataclasses.replace(vm.spec, memory_file=memory)
        vm2 = await driver.prestart(spec)
        await driver.restore(vm2, SnapshotFiles(tmp_path / "vmstate", memory))
        async with AgentClient.for_endpoint(vm2.agent_endpoint, timeout=120) as agent:
            r = await agent.run(["/bin/sh", "-c", "cat /root/mark; wc -c < /dev/shm/noise"])
            assert r.stdout.split() == [b"captured", str(8 << 20).encode()], r
    finally:
        if vm2 is not None:
            await vm2.kill()
        await restorer.discard(prepared)


def _same_file(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


STOP_AGENT = r"""
for p in /proc/[0-9]*; do
  if [ "$(cat $p/comm 2>/dev/null)" = python3 ] && tr '\0' ' ' < $p/cmdline | grep -q "m trenvx""_agent"; then a=${p#/proc/}; fi
done
setsid sh -c "sleep 1; kill -STOP $a; sleep 300; kill -CONT $a" >/dev/null 2>&1 < /dev/null &
echo $a
"""


async def test_a_guest_whose_agent_hangs_does_not_hold_the_pause(manager, test_template, monkeypatch) -> None:
    """The guest stops its own agent: the freeze gets no answer. A strict or filesystem-only pause
    is refused within the freeze's bound and the sandbox runs on; a plain pause goes ahead, marked,
    and the sandbox then resumes only by booting its disk (E2B's semantics)."""
    from trenvx.sandbox import suspend
    from trenvx.sandbox.suspend import PauseRefused, ResumeRefused

    monkeypatch.setattr(suspend, "FREEZE_TIMEOUT_S", 5.0)
    sb = await manager.create(test_template, timeout_s=600)
    try:
        r = await sb.run(["/bin/sh", "-c", STOP_AGENT])
        assert r.exit_code == 0 and r.stdout.strip().isdigit(), r
        await asyncio.sleep(2)
        assert not await sb.agent.health()
        pid = sb.pid
        for kw in ({"strict": True}, {"memory": False}):
            with pytest.raises(PauseRefused, match="did not freeze"):
                # (a hang guard only: the refusal comes after the freeze's 5 s bound)
                await asyncio.wait_for(manager.pause(sb.id, **kw), 300)
            assert sb.state == "running" and sb.pid == pid and pid_running(pid)
        await manager.pause(sb.id)
        assert sb.state == "paused" and sb.pause_info.envd_unresponsive and sb.pause_info.frozen == []
        with pytest.raises(ResumeRefused, match="memory: false"):
            await manager.resume(sb.id)
        assert sb.state == "paused"
        await manager.resume(sb.id, memory=False)
        assert sb.state == "running" and await sb.agent.health()
        assert (await sb.run(["/bin/sh", "-c", "echo booted"])).stdout == b"booted\n"
    finally:
        await manager.kill(sb.id)
