"""Memory sharing between sandboxes, with real VMs: shared template pages, private writes, the
template's files never written, large writes on disk rather than in host memory, admission by
measured cost; the density benchmark in its short mode."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trenvx.config import Config, PoolConfig
from trenvx.sandbox.manager import SandboxManager
from trenvx.vmm.process import memory_of

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def no_pool(config: Config) -> Config:
    return config.model_copy(update={"pool": PoolConfig(warm_min=0, warm_max=0, hot_min=0, hot_max=0)})


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


async def test_sandboxes_share_template_pages_and_keep_writes_private(e2e_config: Config, test_template: str) -> None:
    async with SandboxManager(no_pool(e2e_config), pools=False) as m:
        sbs = [await m.create(test_template) for _ in range(4)]
        build = sbs[0].build
        before = {p: sha256(p) for p in build.files()}
        try:
            for i, sb in enumerate(sbs):
                assert (await sb.run(f"echo secret-{i} > /root/mine; sync")).exit_code == 0
            # Churn the guest's memory and free it again: the template's files must not change
            # (QEMU 7.2's free page reporting punched holes in them; see vmm/qemu.py).
            # Written (not calloc'd zero pages), freed, and reported back before the hash below.
            memory_file = build.snapshot.memory_file
            own0 = private_guest_ram(sbs[0].pid, memory_file)
            r = await sbs[0].run("python3 -c \"b = b'x' * (64 << 20); del b\"; sync; echo 3 > /proc/sys/vm/drop_caches")
            assert r.exit_code == 0, r.stderr
            await given_back(sbs[0].pid, memory_file, own0)
            for i, sb in enumerate(sbs):
                out = (await sb.run("cat /root/mine")).stdout
                assert out == f"secret-{i}\n".encode()  # each sandbox sees its own write only
            mem = [memory_of(sb.pid) for sb in sbs]
            # PSS well below RSS: the template's pages are counted once across the sandboxes.
            assert sum(p for _, p in mem) < 0.8 * sum(r for r, _ in mem), mem
        finally:
            for sb in sbs:
                await m.kill(sb.id)
        assert {p: sha256(p) for p in before} == before, "a sandbox changed its template's files"
        again = await m.create(test_template)
        try:
            r = await again.run("test ! -e /root/mine && python3 -c 'import json, http.server; print(1)'")
            assert r.exit_code == 0 and r.stdout == b"1\n", r.stderr
        finally:
            await m.kill(again.id)


async def test_large_write_goes_to_disk_not_host_memory(e2e_config: Config, test_template: str) -> None:
    async with SandboxManager(no_pool(e2e_config), pools=False) as m:
        sb = await m.create(test_template)
        try:
            pss0 = memory_of(sb.pid)[1]
            overlay = sb.restored.vm.spec.own_disk.path
            size0 = overlay.stat().st_blocks * 512
            # 3 x 150 MiB written (450 MiB, more than the 256 MiB guest): host memory grows by at
            # most the guest's RAM (its page cache), not by what was written; the data is on disk.
            r = await sb.run("for i in 1 2 3; do rm -f /root/big; dd if=/dev/urandom of=/root/big bs=1M count=150 "
                             "status=none && sync || exit 1; done; stat -c %s /root/big", timeout=600)
            assert r.exit_code == 0 and r.stdout.strip() == str(150 * MiB).encode(), r.stderr
            grown_disk = overlay.stat().st_blocks * 512 - size0
            grown_mem = memory_of(sb.pid)[1] - pss0
            mem_mb = sb.build.machine.mem_mb
            assert grown_disk >= 140 * MiB, grown_disk
            assert grown_mem < (mem_mb + 48) * MiB, grown_mem
        finally:
            await m.kill(sb.id)


async def test_overlay_root_reads_the_shared_image_without_guest_page_cache(e2e_config: Config, test_template: str) -> None:
    async with SandboxManager(no_pool(e2e_config), pools=False) as m:
        sb = await m.create(test_template)
        try:
            assert sb.build.overlay, "QEMU templates default to overlay mode"
            mounts = (await sb.run("cat /proc/mounts")).stdout.decode()
            assert any(line.split()[1] == "/" and line.split()[0] == "overlay" for line in mounts.splitlines()), mounts
            cached = "grep '^Cached:' /proc/meminfo | tr -s ' ' | cut -d' ' -f2"
            # Read every file of /usr (over 100 MiB): with DAX the guest's page cache stays flat,
            # the pages are the host's cache of the template's image, shared by all sandboxes.
            r = await sb.run(f"a=$({cached}); find /usr -xdev -type f -size +0 -exec cat {{}} + | wc -c; {cached}; echo $a",
                             timeout=300)
            read, after, before = (int(x) for x in r.stdout.split())
            assert read > 100 * MiB, r.stdout
            assert after - before < 8 * 1024, f"guest page cache grew {after - before} KiB after reading {read >> 20} MiB"
            # A file of the image can be changed (copied up into the sandbox's layer; that the image
            # itself never changes is checked by the sharing test above).
            r = await sb.run("echo changed > /etc/motd && cat /etc/motd")
            assert r.stdout == b"changed\n", r.stderr
        finally:
            await m.kill(sb.id)


def private_guest_ram(pid: int, memory_file: Path) -> int:
    """Bytes of the guest RAM mapping that are the VMM's own copies (written by the guest)."""
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) >= 6 and fields[5] == str(memory_file)
        elif inside and fields[0] in ("Private_Dirty:", "Private_Clean:"):
            total += int(fields[1]) * 1024
    return total


async def given_back(pid: int, memory_file: Path, own0: int, limit_mib: float = 24) -> list[float]:
    """Wait (up to 15 s) until the VM's own guest RAM is within ``limit_mib`` of ``own0``."""
    grown: list[float] = []
    for _ in range(30):
        grown.append((private_guest_ram(pid, memory_file) - own0) / MiB)
        if grown[-1] < limit_mib:
            return grown
        await asyncio.sleep(0.5)
    raise AssertionError(f"guest RAM copies still {grown[-1]:.0f} MiB above the start after 15 s: {grown}")


async def test_freed_guest_memory_goes_back_to_the_host(e2e_config: Config, test_template: str) -> None:
    async with SandboxManager(no_pool(e2e_config), pools=False) as m:
        sb = await m.create(test_template)
        try:
            memory_file = sb.build.snapshot.memory_file
            own0 = private_guest_ram(sb.pid, memory_file)
            assert own0 > 0, f"no private pages of {memory_file} in the VMM's mappings: is it mapped?"
            # 64 MiB written by a process that then exits: without free page reporting the sandbox
            # would keep every page of it as its own copy.
            run = asyncio.ensure_future(sb.run("python3 -c \"b = b'x' * (64 << 20); import time; time.sleep(5)\""))
            peak = 0
            while not run.done():
                peak = max(peak, private_guest_ram(sb.pid, memory_file) - own0)
                await asyncio.sleep(0.2)
            assert (await run).exit_code == 0
            assert peak > 48 * MiB, f"the workload's pages never showed up as the VM's own ({peak >> 20} MiB)"
            await given_back(sb.pid, memory_file, own0)
        finally:
            await m.kill(sb.id)


async def test_reclaim_gives_back_the_guest_page_cache(e2e_config: Config, test_template: str) -> None:
    async with SandboxManager(no_pool(e2e_config), pools=False) as m:
        sb = await m.create(test_template)
        try:
            # 64 MiB of a file in the sandbox's own layer (not DAX): it stays in the guest's page cache.
            r = await sb.run("head -c $((64 << 20)) /dev/urandom > /root/data && sync && cat /root/data > /dev/null")
            assert r.exit_code == 0, r.stderr
            result = await m.reclaim(sb.id)
            # Most of it comes back (without a reclaim, none): 38-60 MiB of the 64 measured here.
            assert result.freed > 32 * MiB, result
            assert sb.reclaimed_at > 0
            assert (await sb.run("wc -c < /root/data")).stdout == b"67108864\n", "a reclaim loses no data"
        finally:
            await m.kill(sb.id)


async def test_memory_is_reclaimed_before_a_create_is_refused(e2e_config: Config, test_template: str) -> None:
    from trenvx.sandbox.limits import Admission, Limits, OutOfMemory

    free = [64 << 30]
    admission = Admission(Limits(100, 100, 0), available=lambda: free[0])
    async with SandboxManager(no_pool(e2e_config), pools=False, admission=admission) as m:
        sb = await m.create(test_template)
        try:
            free[0] = 0  # the host is out of memory from now on
            with pytest.raises(OutOfMemory, match="not enough free memory"):
                await m.create(test_template)
            assert sb.reclaimed_at > 0, "running sandboxes were reclaimed before the create was refused"
            assert len(m.list()) == 1
        finally:
            await m.kill(sb.id)


async def test_admission_reserves_the_measured_cost(e2e_config: Config, test_template: str) -> None:
    async with SandboxManager(no_pool(e2e_config), pools=False) as m:
        mem_mb = m.templates.current(test_template).machine.mem_mb
        assert m.admission.reserve_mb(test_template, mem_mb) == mem_mb  # nothing measured yet
        sb = await m.create(test_template)
        pss = memory_of(sb.pid)[1]
        await m.kill(sb.id)
        # The cost is measured again at the kill; the guest may have given memory back meanwhile.
        expected = min(mem_mb, max(64, 1.5 * pss / MiB))
        assert abs(m.admission.reserve_mb(test_template, mem_mb) - expected) <= 0.1 * expected
        assert pss < mem_mb * MiB / 2  # so the reservation is well below the whole guest RAM


def test_density_benchmark_short_mode(e2e_config: Config, test_template: str, tmp_path: Path) -> None:
    from tests.e2e.server_helpers import linked_data_root

    root = linked_data_root(tmp_path, e2e_config)
    out = tmp_path / "density.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "density.py"), "--quick", "--template", test_template,
         "--config", str(REPO / "tests" / "e2e" / "e2e_config.toml"), "--json", str(out),
         "--workload", "python3 -c \"b = bytearray(16 << 20); open('/tmp/out', 'w').write('x' * 1000)\""],
        capture_output=True, text=True, timeout=900, env={**os.environ, "TRENVX_DATA_ROOT": str(root)},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {row["mode"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"trenvx", "e2b"}
    assert rows["trenvx"]["pss_mib"] < rows["e2b"]["pss_mib"]  # shared beats private copies
    for row in rows.values():  # the breakdown accounts for the whole PSS (measured a moment apart)
        assert abs(sum(row["pss_parts_mib"].values()) - row["pss_mib"]) < 0.1 * row["pss_mib"]
    assert rows["trenvx"]["pss_parts_mib"]["guest RAM"] < rows["e2b"]["pss_parts_mib"]["guest RAM"] / 2
    assert "where the PSS goes" in r.stdout
    assert "less memory per sandbox" in r.stdout
    assert not list((root / "sandboxes").iterdir())
