"""Pools on the create path, with real VMs: refill, hot and warm takes, empty-pool fallback, memory
cap, a template rebuilt under a full pool, shutdown and crash cleanup; /metrics; the start-latency
benchmark in its short mode (so it cannot rot)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import psutil
import pytest
import pytest_asyncio

from trenvx.config import Config, PoolConfig
from trenvx.layout import DataRoot
from trenvx.sandbox.limits import Admission, Limits, OutOfMemory
from trenvx.sandbox.manager import SandboxManager
from trenvx.sandbox.pool import POOLED_MARKER, reap_stale_pooled

REPO = Path(__file__).resolve().parents[2]


def with_pool(config: Config, template: str, **pool: int | str) -> Config:
    return config.model_copy(update={"pool": PoolConfig(templates=[template], **pool)})  # type: ignore[arg-type]


async def until(check: Callable[[], bool], timeout_s: float = 90.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.1)


def pooled_pids(m: SandboxManager) -> list[int]:
    return [i.vm.pid for p in m.pools.values() for q in p.items.values() for i in q]


def pooled_dirs(m: SandboxManager) -> list[Path]:
    return [i.workdir for p in m.pools.values() for q in p.items.values() for i in q]


@pytest_asyncio.fixture
async def pooled(e2e_config: Config, test_template: str) -> AsyncIterator[Callable[..., SandboxManager]]:
    """Makes managers with a pool of the test template; closes them (asserting cleanup) after the test."""
    made: list[SandboxManager] = []

    def make(admission: Admission | None = None, **pool: int | str) -> SandboxManager:
        m = SandboxManager(with_pool(e2e_config, test_template, **pool), admission=admission)
        made.append(m)
        return m

    yield make
    for m in made:
        pids, dirs = pooled_pids(m), pooled_dirs(m)
        await m.close()
        assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert not [d for d in dirs if d.exists()]


async def test_warm_pool_serves_a_create_and_refills(pooled: Callable[..., SandboxManager], test_template: str) -> None:
    m = pooled(warm_min=2, warm_max=2, hot_min=0, hot_max=0)
    await m.start()
    pool = m.pools[test_template]
    await until(lambda: len(pool.items["warm"]) == 2, what="2 warm VMs")
    first = {i.sandbox_id for i in pool.items["warm"]}
    sb = await m.create(test_template)
    try:
        assert sb.restored.source == "warm" and sb.id in first
        assert set(sb.start_times) == {"load", "resume", "init"}  # disk and spawn were done ahead
        assert not (sb.restored.workdir / POOLED_MARKER).exists()
        assert (await sb.run("echo pooled")).stdout == b"pooled\n"
        await until(lambda: len(pool.items["warm"]) == 2, what="the refill")
        assert pool.made["warm"] >= 3 and pool.hits["warm"] == 1
    finally:
        await m.kill(sb.id)


async def test_hot_pool_gives_identity_at_create(pooled: Callable[..., SandboxManager], test_template: str) -> None:
    m = pooled(warm_min=0, warm_max=0, hot_min=1, hot_max=1, hot_warmup_cmd="true")
    await m.start()
    pool = m.pools[test_template]
    await until(lambda: len(pool.items["hot"]) == 1, what="a hot VM")
    a = await m.create(test_template, env_vars={"POOL_TEST": "hot-1"})
    try:
        assert a.restored.source == "hot" and set(a.start_times) == {"resume", "init"}
        r = await a.run("echo $POOL_TEST; hostname; cat /etc/machine-id")
        env, host, mid = r.stdout.decode().split()
        assert env == "hot-1" and host == a.id and len(mid) == 32
        # A second create right away: the pool is empty and refills later; the create does not wait.
        t0 = time.monotonic()
        b = await m.create(test_template)
        try:
            assert b.restored.source == "cold" and "spawn" in b.start_times
            assert time.monotonic() - t0 < 30
            rb = await b.run("hostname; cat /etc/machine-id")
            assert rb.stdout.decode().split() != [host, mid]  # every sandbox its own identity
        finally:
            await m.kill(b.id)
        assert pool.misses == 1
    finally:
        await m.kill(a.id)


async def test_pool_stays_within_memory_headroom(pooled: Callable[..., SandboxManager], test_template: str) -> None:
    headroom = 1024
    # The host "has" the headroom plus 100 MiB: no 256 MiB guest fits, so the pool stays empty.
    admission = Admission(Limits(100, 100, headroom), available=lambda: (headroom + 100) << 20)
    m = pooled(admission=admission, warm_min=2, warm_max=2, hot_min=1, hot_max=1)
    await m.start()
    await asyncio.sleep(3)
    stats = m.pool_stats()[0]
    assert (stats.warm, stats.hot, stats.failures) == (0, 0, 0)
    with pytest.raises(OutOfMemory, match="memory_headroom_mb"):
        await m.create(test_template)


async def test_rebuilt_template_replaces_pooled_vms(
    pooled: Callable[..., SandboxManager], e2e_config: Config, test_template: str
) -> None:
    from trenvx.template.builder import TemplateBuilder

    m = pooled(warm_min=1, warm_max=1, hot_min=1, hot_max=1, hot_warmup_cmd="true")
    await m.start()
    pool = m.pools[test_template]
    await until(lambda: len(pool.items["warm"]) == 1 and len(pool.items["hot"]) == 1, what="a full pool")
    old = {i.vm.pid for q in pool.items.values() for i in q}
    new_build = (await TemplateBuilder(e2e_config).build(test_template, force=True)).build
    await until(lambda: all(i.build.path == new_build.path for q in pool.items.values() for i in q)
                and len(pool.items["warm"]) == 1 and len(pool.items["hot"]) == 1,
                timeout_s=120, what="pooled VMs of the new build")
    assert not [p for p in old if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    sb = await m.create(test_template)
    try:
        assert sb.build.build_id == new_build.build_id and sb.restored.source == "hot"
    finally:
        await m.kill(sb.id)


async def test_crashed_servers_pool_is_reaped(pooled: Callable[..., SandboxManager], e2e_config: Config,
                                              test_template: str) -> None:
    m = pooled(warm_min=2, warm_max=2, hot_min=0, hot_max=0)
    await m.start()
    pool = m.pools[test_template]
    await until(lambda: len(pool.items["warm"]) == 2, what="2 warm VMs")
    pids, dirs = pooled_pids(m), pooled_dirs(m)
    # What the next server does at start when a previous one died with a full pool.
    removed = reap_stale_pooled(DataRoot(e2e_config.data_root))
    assert {d.name for d in dirs} <= set(removed)
    await until(lambda: not [p for p in pids if psutil.pid_exists(p)
                             and psutil.Process(p).status() != psutil.STATUS_ZOMBIE], what="pooled VMs killed")
    assert not [d for d in dirs if d.exists()]


async def test_metrics_count_creates_and_stages(backend_url: str) -> None:
    async with httpx.AsyncClient(base_url=backend_url, timeout=120) as c:
        r = await c.post("/sandboxes", json={"templateID": "e2e-test"})
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["startSource"] in ("hot", "warm", "cold") and body["startTimes"]["init"] > 0
        assert r.headers["X-Trenvx-Start-Source"] == body["startSource"]
        try:
            text = (await c.get("/metrics")).text
        finally:
            await c.delete(f"/sandboxes/{body['sandboxID']}")
    assert f'trenvx_creates_total{{outcome="ok",source="{body["startSource"]}",template="e2e-test"}}' in text
    assert 'trenvx_create_stage_seconds_count{source=' in text and 'stage="init"' in text
    assert 'trenvx_pool_ready{template="e2e-test",tier="warm"}' in text


def test_start_latency_benchmark_short_mode(e2e_config: Config, test_template: str,
                                            tmp_path: Path) -> None:
    """The benchmark through the public SDK against real backends, a few creates per mode."""
    from tests.e2e.server_helpers import linked_data_root

    root = linked_data_root(tmp_path, e2e_config)
    out = tmp_path / "bench.json"
    env = {**os.environ, "TRENVX_DATA_ROOT": str(root)}
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "start_latency.py"), "--quick", "--modes", "hot,warm,cold,e2b",
         "--config", str(REPO / "tests" / "e2e" / "e2e_config.toml"), "--template", test_template, "--json", str(out)],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["accelerator"] in ("kvm", "tcg")
    modes = {m["mode"]: m for m in data["modes"]}
    assert set(modes) == {"hot", "warm", "cold", "e2b"}
    for m in modes.values():
        assert m["ready_ms"]["n"] == 3 and m["n_failures"] == 0 and m["bursts"][0]["failures"] == 0
    assert modes["hot"]["served_by"] == {"hot": 3} and modes["warm"]["served_by"] == {"warm": 3}
    assert "ready p50" in r.stdout and "JSON:" in r.stdout
    assert not list((root / "sandboxes").iterdir())
