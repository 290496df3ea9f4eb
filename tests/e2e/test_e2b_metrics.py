"""Sandbox metrics on real VMs (issue 13 item 11): E2B's unmodified ``Sandbox.get_metrics()`` (on the
instance and by id, sync and async), ``GET /sandboxes/metrics``, sandbox_sdk's ``get_metrics``.

The figures are the guest's own, read by its agent: a file written shows in ``disk_used``, a busy
loop in ``cpu_used_pct``; a paused sandbox gets no samples and is sampled again once resumed. The
waits are bounded polls on the backend's sampler (every 5 s), never fixed sleeps asserted on, except
the pause, which must outlast two sampling intervals to show that none was taken.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

pytestmark = pytest.mark.e2e

e2b = pytest.importorskip("e2b")

BOUND_S = 180.0
"""How long a sample showing what the guest did may take to appear (TCG is slow)."""
MiB = 1 << 20


def _poll(fetch, cond, what: str):
    """``fetch()`` until ``cond(result)`` holds (at most BOUND_S); the result."""
    end = time.monotonic() + BOUND_S
    while True:
        got = fetch()
        if cond(got):
            return got
        assert time.monotonic() < end, f"no sample {what} within {BOUND_S:.0f} s: {got}"
        time.sleep(1.0)


def test_unmodified_e2b_get_metrics_follows_the_guest(e2b_env: str, test_template: str) -> None:
    sbx = e2b.Sandbox.create(test_template, timeout=600)
    sid = sbx.sandbox_id
    try:
        info = sbx.get_info()
        first = sbx.get_metrics()  # none taken yet: the backend samples it when first asked
        assert len(first) >= 1
        m = first[-1]
        assert m.cpu_count == info.cpu_count
        assert 0 < m.mem_used <= m.mem_total <= info.memory_mb * MiB and m.mem_total > info.memory_mb * MiB // 2
        assert 0 <= m.mem_cache <= m.mem_total and 0 <= m.cpu_used_pct <= 100
        assert 0 < m.disk_used < m.disk_total
        assert e2b.Sandbox.get_metrics(sid)[: len(first)] == first  # by id: the same samples
        # the agent in the guest serves the raw CPU counters that CPU use is computed from
        raw = sbx.commands.run("PYTHONPATH=/opt/trenvx python3 -c 'from trenvx_agent.metrics import Metrics; "
                               "s = Metrics().snapshot(); print(s[\"cpu_ticks_total\"] > s[\"cpu_ticks_idle\"] > 0)'")
        assert raw.stdout == "True\n", raw.stdout

        # disk: a file written shows in disk_used
        size_mib = max(8, min(48, (m.disk_total - m.disk_used) // MiB // 3))
        sbx.commands.run(f"dd if=/dev/zero of=$HOME/blob bs=1M count={size_mib} status=none && sync", timeout=300)
        written_at = time.time()
        _poll(sbx.get_metrics,
              lambda ms: any(x.timestamp.timestamp() > written_at and x.disk_used >= m.disk_used + size_mib * MiB * 0.9
                             for x in ms), f"with {size_mib} MiB more disk used")

        # CPU: every vCPU busy for a while shows in cpu_used_pct
        sbx.commands.run("for i in $(seq $(nproc)); do timeout 40 sh -c 'while :; do :; done' & done; wait",
                         background=True)
        busy_from = time.time()
        _poll(sbx.get_metrics, lambda ms: any(x.timestamp.timestamp() > busy_from and x.cpu_used_pct >= 50 for x in ms),
              "with the vCPUs busy")

        # the latest sample of several sandboxes at once, E2B's GET /sandboxes/metrics
        latest = sbx.get_metrics()[-1]
        r = httpx.get(f"{e2b_env}/sandboxes/metrics", params={"sandbox_ids": f"{sid},nosuchsandbox"}, timeout=60)
        assert r.status_code == 200, r.text
        assert set(r.json()["sandboxes"]) == {sid}
        assert r.json()["sandboxes"][sid]["timestampUnix"] >= int(latest.timestamp.timestamp())

        # the async SDK, start/end filters
        got = asyncio.run(e2b.AsyncSandbox.get_metrics(sid))
        assert len(got) >= 3 and [x.timestamp for x in got] == sorted(x.timestamp for x in got)
        middle = got[len(got) // 2].timestamp
        assert all(x.timestamp.timestamp() >= int(middle.timestamp()) for x in sbx.get_metrics(start=middle))
        assert all(x.timestamp.timestamp() < int(middle.timestamp()) + 1 for x in sbx.get_metrics(end=middle))

        # paused: no samples; resumed: sampled again
        assert httpx.post(f"{e2b_env}/sandboxes/{sid}/pause", timeout=120).status_code == 204
        paused_at = time.time()
        time.sleep(12)  # more than two sampling intervals
        resumed_at = time.time()
        during = e2b.Sandbox.get_metrics(sid)
        assert [x for x in during if paused_at < x.timestamp.timestamp() < resumed_at] == []
        assert httpx.post(f"{e2b_env}/sandboxes/{sid}/resume", timeout=120).status_code == 201
        _poll(sbx.get_metrics, lambda ms: ms[-1].timestamp.timestamp() > resumed_at, "after the resume")
    finally:
        sbx.kill()
    with pytest.raises(e2b.exceptions.NotFoundException):
        e2b.Sandbox.get_metrics(sid)


async def test_sandbox_sdk_get_metrics(sdk_backend: str, test_template: str) -> None:
    from sandbox_sdk.e2b import AsyncSandbox

    sbx = await AsyncSandbox.create(test_template, timeout=300, api_url=sdk_backend)
    try:
        [*_, m] = await sbx.get_metrics()
        assert m.mem_total > 0 and m.disk_total > m.disk_used > 0 and m.timestamp is not None
        assert (await AsyncSandbox.get_metrics(sbx.sandbox_id, api_url=sdk_backend))[0].timestamp is not None
    finally:
        await sbx.kill()
