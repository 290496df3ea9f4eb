"""EtcdClient against a real 3-member etcd on loopback (LocalEtcdCluster, started once for the
module): keys and prefixes, conditional puts raced by many tasks, leases that expire or are kept,
watch order and resumption, failover when the first endpoint dies, EtcdUnavailable when all do,
a member rejoining, traffic statistics, and parse_etcd_url. Tests that kill members restore them
or use a cluster of their own, so the others do not depend on the order they run in.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import pytest_asyncio

from trenvx.cluster import etcd as etcd_mod
from trenvx.cluster.etcd import (
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    EtcdLeaseNotFound,
    EtcdUnavailable,
    KeyValue,
    WatchEvent,
    parse_etcd_url,
    prefix_range_end,
)
from trenvx.cluster.etcd_local import LocalEtcdCluster

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None,
                                reason="etcd is not installed (Debian's etcd-server; scripts/start.sh setup installs it)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcdCluster]:
    with LocalEtcdCluster(tmp_path_factory.mktemp("etcd"), 3) as c:
        yield c


@pytest_asyncio.fixture
async def etcd(cluster: LocalEtcdCluster) -> AsyncIterator[EtcdClient]:
    async with EtcdClient(cluster.endpoints) as client:
        yield client


@pytest.fixture
def p() -> str:
    """A fresh key prefix, so tests sharing the cluster never see each other's keys."""
    return f"t/{uuid.uuid4().hex[:8]}/"


def etcd_pids(cluster: LocalEtcdCluster) -> set[int]:
    """Live etcd processes whose data directory is under the cluster's base_dir."""
    out = set()
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        if proc.info["name"] == "etcd" and proc.info["status"] != psutil.STATUS_ZOMBIE \
                and any(str(cluster.base_dir) in a for a in proc.info["cmdline"] or []):
            out.add(proc.pid)
    return out


async def wait_until(check, timeout_s: float, step_s: float = 0.1) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(step_s)
    return await check()


# --- keys ----------------------------------------------------------------------------------


async def test_put_get_range_count_delete(etcd: EtcdClient, p: str) -> None:
    assert await etcd.get(p + "a") is None
    r1 = await etcd.put(p + "a", b"1")
    r2 = await etcd.put(p + "c", json.dumps({"n": 3}))
    r3 = await etcd.put(p + "b", "two")
    await etcd.put(p[:-1] + "0", "sibling")  # shares p without its last byte: not under p
    assert r1 < r2 < r3

    a = await etcd.get(p + "a")
    assert a == KeyValue(key=p + "a", value=b"1", create_revision=r1, mod_revision=r1, version=1, lease=0)
    r4 = await etcd.put(p + "a", b"one")
    a2 = await etcd.get(p + "a")
    assert (a2.value, a2.create_revision, a2.mod_revision, a2.version) == (b"one", r1, r4, 2)
    assert (await etcd.get(p + "c")).json() == {"n": 3}

    assert [kv.key for kv in await etcd.range(p)] == [p + "a", p + "b", p + "c"]
    assert [kv.value for kv in await etcd.range(p)] == [b"one", b"two", b'{"n": 3}']
    assert [kv.key for kv in await etcd.range(p, limit=2)] == [p + "a", p + "b"]
    assert await etcd.count(p) == 3
    assert await etcd.range(p + "zz") == [] and await etcd.count(p + "zz") == 0

    assert await etcd.delete(p + "b") == 1
    assert await etcd.delete(p + "b") == 0
    assert await etcd.get(p + "b") is None
    assert await etcd.delete_prefix(p) == 2
    assert await etcd.count(p) == 0
    assert (await etcd.get(p[:-1] + "0")).value == b"sibling"
    with pytest.raises(ValueError, match="non-empty prefix"):
        await etcd.delete_prefix("")
    with pytest.raises(TypeError, match="bytes or str"):
        await etcd.put(p + "x", {"not": "encoded"})  # type: ignore[arg-type]


async def test_unicode_keys_and_binary_values(etcd: EtcdClient, p: str) -> None:
    key = p + "sandbox-é/ünïcode"
    value = bytes(range(256))
    await etcd.put(key, value)
    kv = await etcd.get(key)
    assert kv.key == key and kv.value == value
    assert [k.key for k in await etcd.range(p + "sandbox-é")] == [key]


async def test_range_pages_through_a_large_prefix(etcd: EtcdClient, p: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(etcd_mod, "RANGE_PAGE", 3)
    keys = [f"{p}{i:02d}" for i in range(10)]
    for k in reversed(keys):
        await etcd.put(k, k)
    etcd.stats.reset()
    got = await etcd.range(p)
    assert [kv.key for kv in got] == keys and [kv.value for kv in got] == [k.encode() for k in keys]
    assert etcd.stats.by_call == {"/v3/kv/range": 4}  # 3 + 3 + 3 + 1
    assert [kv.key for kv in await etcd.range(p, limit=5)] == keys[:5]


def test_prefix_range_end() -> None:
    assert prefix_range_end(b"a/") == b"a0"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"\xff\xff") == b"\0"
    assert prefix_range_end(b"") == b"\0"


async def test_put_if_absent_race(etcd: EtcdClient, p: str) -> None:
    """Twenty tasks race to create one key: exactly one wins and its value is what is stored."""
    results = await asyncio.gather(*(etcd.put_if_absent(p + "owner", f"node-{i}") for i in range(20)))
    winners = [i for i, ok in enumerate(results) if ok]
    assert len(winners) == 1
    assert (await etcd.get(p + "owner")).value == f"node-{winners[0]}".encode()
    assert await etcd.put_if_absent(p + "owner", "late") is False


async def test_put_if_revision_compare_and_swap(etcd: EtcdClient, p: str) -> None:
    """Ten tasks each add 1 five times to a counter with read + put_if_revision: no update is lost."""
    key = p + "counter"
    assert await etcd.put_if_revision(key, "0", 0) is True  # 0: only if absent
    assert await etcd.put_if_revision(key, "0", 0) is False

    async def add_one() -> int:
        tries = 0
        while True:
            tries += 1
            kv = await etcd.get(key)
            if await etcd.put_if_revision(key, str(int(kv.value) + 1), kv.mod_revision):
                return tries

    async def worker() -> int:
        return sum([await add_one() for _ in range(5)])

    tries = await asyncio.gather(*(worker() for _ in range(10)))
    kv = await etcd.get(key)
    assert int(kv.value) == 50 and kv.version == 51
    assert sum(tries) > 50  # the tasks did collide, and the losers retried
    stale = kv.mod_revision - 1
    assert await etcd.put_if_revision(key, "stale", stale) is False
    assert (await etcd.get(key)).value == b"50"


# --- leases --------------------------------------------------------------------------------


async def test_lease_expires_without_keepalive_and_stays_with_it(etcd: EtcdClient, p: str) -> None:
    kept, dropped = await etcd.grant(1), await etcd.grant(1)
    assert kept != dropped and kept > 0
    await etcd.put(p + "kept", "alive", lease=kept)
    await etcd.put(p + "dropped", "alive", lease=dropped)
    assert (await etcd.get(p + "kept")).lease == kept
    assert await etcd.time_to_live(dropped) >= 0

    started = time.monotonic()
    while time.monotonic() - started < 4.0:  # well past the TTL (etcd grants at least 2 s here)
        assert await etcd.keepalive(kept) > 0
        await asyncio.sleep(0.4)
    assert await etcd.get(p + "dropped") is None
    assert await etcd.time_to_live(dropped) == -1
    assert await etcd.keepalive(dropped) == 0
    assert (await etcd.get(p + "kept")).value == b"alive"
    assert await etcd.time_to_live(kept) > 0

    with pytest.raises(EtcdLeaseNotFound) as e:
        await etcd.put(p + "late", "x", lease=dropped)
    assert isinstance(e.value, EtcdError) and "lease not found" in str(e.value)
    await etcd.revoke(kept)


async def test_revoke(etcd: EtcdClient, p: str) -> None:
    lease = await etcd.grant(60)
    assert 55 <= await etcd.time_to_live(lease) <= 60
    await etcd.put(p + "a", "1", lease=lease)
    await etcd.put(p + "b", "2", lease=lease)
    await etcd.revoke(lease)
    assert await etcd.count(p) == 0
    assert await etcd.time_to_live(lease) == -1
    await etcd.revoke(lease)  # already gone: not an error
    await etcd.revoke(123456789)  # never existed: not an error
    with pytest.raises(ValueError, match="at least 1 s"):
        await etcd.grant(0)


# --- watch ---------------------------------------------------------------------------------


async def collect(etcd: EtcdClient, prefix: str, start_revision: int, n: int,
                  timeout_s: float = 5.0) -> list[WatchEvent]:
    events: list[WatchEvent] = []

    async def run() -> None:
        async with contextlib.aclosing(etcd.watch(prefix, start_revision=start_revision)) as stream:
            async for ev in stream:
                events.append(ev)
                if len(events) == n:
                    return

    await asyncio.wait_for(run(), timeout_s)
    return events


async def test_watch_sees_puts_and_deletes_in_order_and_resumes(etcd: EtcdClient, p: str) -> None:
    start = await etcd.put(p + "seed", "0")
    watcher = asyncio.create_task(collect(etcd, p, start + 1, 5))
    await asyncio.sleep(0.2)  # live events as well as the ones from start_revision
    await etcd.put(p + "a", "1")
    await etcd.put(p[:-1] + "-outside", "not watched")
    await etcd.put(p + "b", "2")
    await etcd.delete(p + "a")
    await etcd.put(p + "b", "3")
    await etcd.delete_prefix(p)  # deletes b and seed in one revision
    events = await watcher

    assert [(e.type, e.kv.key) for e in events] == [
        ("put", p + "a"), ("put", p + "b"), ("delete", p + "a"), ("put", p + "b"), ("delete", p + "b"),
    ]
    revisions = [e.revision for e in events]
    assert revisions == sorted(revisions) and revisions[0] > start
    assert [e.kv.value for e in events[:4]] == [b"1", b"2", b"", b"3"]
    assert events[3].kv.version == 2 and events[3].kv.create_revision == events[1].revision

    # resume after the second event: the rest again, from etcd's history
    again = await collect(etcd, p, events[1].revision + 1, 4)
    assert [(e.type, e.kv.key, e.revision) for e in again[:3]] == [(e.type, e.kv.key, e.revision) for e in events[2:]]
    assert (again[3].type, again[3].kv.key) == ("delete", p + "seed")


async def test_watch_of_a_compacted_revision(etcd: EtcdClient, cluster: LocalEtcdCluster, p: str) -> None:
    first = await etcd.put(p + "a", "1")
    now = await etcd.put(p + "a", "2")
    async with httpx.AsyncClient() as http:  # compaction is not part of the client: do it by hand
        r = await http.post(cluster.endpoints[0] + "/v3/kv/compaction", json={"revision": str(now)})
        assert r.status_code == 200, r.text
    with pytest.raises(EtcdCompacted) as e:
        await collect(etcd, p, first, 1)
    assert e.value.compact_revision == now and "compacted" in str(e.value)


# --- cluster, stats ------------------------------------------------------------------------


async def test_status_and_members(etcd: EtcdClient, cluster: LocalEtcdCluster) -> None:
    status = await etcd.status()
    assert status["version"] == "3.4.23" or status["version"].startswith("3.")
    assert status["endpoint"] in cluster.endpoints and status["leader"] > 0 and status["dbSize"] > 0
    members = await etcd.members()
    assert [m["name"] for m in members] == ["m0", "m1", "m2"]
    assert [m["clientURLs"] for m in members] == [[u] for u in cluster.endpoints]
    assert status["leader"] in {m["id"] for m in members}


async def test_stats_count_requests_and_bytes(etcd: EtcdClient, p: str) -> None:
    etcd.stats.reset()
    assert etcd.stats.requests == 0 and etcd.stats.by_call == {}
    await etcd.put(p + "k", "v" * 1000)
    sent_put = etcd.stats.bytes_sent
    assert etcd.stats.requests == 1 and etcd.stats.by_call == {"/v3/kv/put": 1}
    assert sent_put > len(base64.b64encode(b"v" * 1000)) and etcd.stats.bytes_received > 0
    received = etcd.stats.bytes_received
    await etcd.get(p + "k")
    await etcd.put_if_absent(p + "k", "w")
    assert etcd.stats.by_call == {"/v3/kv/put": 1, "/v3/kv/range": 1, "/v3/kv/txn": 1}
    assert etcd.stats.requests == 3
    assert etcd.stats.bytes_received > received + 1300  # the range carried the base64 value back
    etcd.stats.reset()
    assert (etcd.stats.requests, etcd.stats.bytes_sent, etcd.stats.bytes_received, etcd.stats.by_call) == (0, 0, 0, {})


# --- failover ------------------------------------------------------------------------------


async def test_failover_when_the_first_endpoint_dies_and_it_rejoins(cluster: LocalEtcdCluster, p: str) -> None:
    """The first endpoint is the leader's, the hardest member to lose: the others elect a new
    leader while the client goes round them."""
    async with EtcdClient(cluster.endpoints) as probe:
        status = await probe.status()
        urls = {m["id"]: m["clientURLs"][0] for m in await probe.members()}
    i = cluster.endpoints.index(urls[status["leader"]])
    first = cluster.endpoints[i]
    endpoints = [first] + [e for e in cluster.endpoints if e != first]
    async with EtcdClient(endpoints) as etcd, EtcdClient([first]) as only_first:
        await etcd.put(p + "before", "1")
        assert etcd.endpoint == first
        watch_first = asyncio.create_task(collect(only_first, p, 0, 100, timeout_s=30))
        await asyncio.sleep(0.2)

        cluster.kill_member(i)
        try:
            assert cluster.pid(i) is None
            with pytest.raises(EtcdUnavailable) as dropped:
                await asyncio.wait_for(watch_first, 5)
            assert first in str(dropped.value)

            etcd.stats.reset()
            rev = await etcd.put(p + "during", "2")
            assert etcd.endpoint != first
            assert etcd.stats.by_call["/v3/kv/put"] >= 2  # the dead endpoint was tried first
            assert (await etcd.get(p + "before")).value == b"1"
            assert [kv.key for kv in await etcd.range(p)] == [p + "before", p + "during"]
            assert await etcd.put_if_absent(p + "during", "x") is False
            assert (await etcd.status())["leader"] not in (0, status["leader"])
            with pytest.raises(EtcdUnavailable):
                await only_first.get(p + "before")
        finally:
            cluster.restart_member(i)

        # the member rejoined and caught up with what was written while it was down
        kv = await only_first.get(p + "during")
        assert kv is not None and kv.mod_revision == rev and kv.value == b"2"
        assert len(await only_first.members()) == 3
        assert (await only_first.status())["leader"] > 0


async def test_all_members_down(tmp_path: Path) -> None:
    c = LocalEtcdCluster(tmp_path / "etcd", 3)
    with c:
        async with EtcdClient(c.endpoints, timeout_s=1.0) as etcd:
            await etcd.put("k", "v")
            pids = etcd_pids(c)
            assert len(pids) == 3
            for i in range(3):
                c.kill_member(i)
            started = time.monotonic()
            with pytest.raises(EtcdUnavailable) as e:
                await etcd.get("k")
            assert time.monotonic() - started < 1.0  # refused everywhere: no waiting
            message = str(e.value)
            assert all(ep in message for ep in c.endpoints) and "--cluster etcd://" in message
            assert e.value.endpoints == c.endpoints and "ConnectError" in e.value.last_error
            with pytest.raises(EtcdUnavailable):
                async for _ in etcd.watch("k"):
                    pass
    assert not etcd_pids(c) and not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                                        for pid in pids)
    assert not any(c.data_dir(i).exists() for i in range(3))
    assert c.log_path(0).exists()


async def test_unreachable_endpoint_times_out_to_unavailable() -> None:
    """An endpoint nothing listens on: EtcdUnavailable at once, naming it, after one request."""
    from trenvx.cluster.etcd_local import free_ports

    port = free_ports("127.0.0.1", 1)[0]
    async with EtcdClient([f"http://127.0.0.1:{port}"], timeout_s=0.5) as etcd:
        with pytest.raises(EtcdUnavailable, match=f"127.0.0.1:{port}"):
            await etcd.grant(5)
        assert etcd.stats.requests == 1


def test_client_needs_endpoints() -> None:
    with pytest.raises(ValueError, match="at least one endpoint"):
        EtcdClient([])


# --- parse_etcd_url ------------------------------------------------------------------------


@pytest.mark.parametrize("url, expected", [
    ("etcd://10.0.0.1:2379", ["http://10.0.0.1:2379"]),
    ("etcd://h1:1,h2:2, h3:3", ["http://h1:1", "http://h2:2", "http://h3:3"]),
    ("etcd+https://a.example:2379,b.example:2379", ["https://a.example:2379", "https://b.example:2379"]),
    ("etcd+http://h:1/", ["http://h:1"]),
    ("http://127.0.0.1:2379", ["http://127.0.0.1:2379"]),
    ("http://a:1,http://b:2", ["http://a:1", "http://b:2"]),
    ("https://a:1", ["https://a:1"]),
    ("etcd://[::1]:2379,[fe80::1]:2380", ["http://[::1]:2379", "http://[fe80::1]:2380"]),
    ("ETCD://H:1", ["http://h:1"]),
])
def test_parse_etcd_url_accepts(url: str, expected: list[str]) -> None:
    assert parse_etcd_url(url) == expected


@pytest.mark.parametrize("url, why", [
    ("", "empty"),
    ("h1:2379", "no scheme"),
    ("redis://h:1", "unknown scheme"),
    ("etcd://", "empty member"),
    ("etcd://h1:1,,h2:2", "empty member"),
    ("etcd://h1", "no port"),
    ("etcd://h1:0", "no port"),
    ("etcd://h1:99999", "out of range"),
    ("etcd://h1:port", "h1:port"),
    ("etcd://:2379", "no host"),
    ("etcd://h1:1/v3", "more than host:port"),
    ("etcd://user@h1:1", "more than host:port"),
    ("http://a:1,b:2", "not a http:// URL"),
    ("http://a:1,https://b:2", "not a http:// URL"),
])
def test_parse_etcd_url_refuses(url: str, why: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_etcd_url(url)
    message = str(e.value)
    assert why in message and repr(url) in message and "etcd://host:port" in message
