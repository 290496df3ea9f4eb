"""The HTTP API in-process (no VMs): E2B shapes, status codes, errors naming the field, auth,
limits, pagination and filters; and a schemathesis fuzz run (no 5xx for any generated request)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import httpx
import pytest

from trenvx.sandbox.limits import Admission, Limits
from trenvx.server.app import create_app

from .server_fakes import ThreadedServer, UpstreamState, fake_manager, make_config, make_template, upstream_app


@pytest.fixture(scope="module")
def upstream():
    with ThreadedServer(upstream_app(UpstreamState())) as s:
        yield s


def build(tmp_path: Path, upstream, **orch):
    make_template(tmp_path, "tpl")
    cfg = make_config(tmp_path, **orch)
    m = fake_manager(cfg, upstream.port, admission=orch.pop("admission", None) if "admission" in orch else None)
    return m, create_app(cfg, manager=m)


@pytest.fixture
async def api(tmp_path: Path, upstream):
    m, app = build(tmp_path, upstream)
    await m.start()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as c:
        c.manager = m  # type: ignore[attr-defined]
        yield c
    await m.close()


async def create(c: httpx.AsyncClient, **body) -> dict:
    r = await c.post("/sandboxes", json={"templateID": "tpl", **body})
    assert r.status_code == 201, r.text
    return r.json()


async def test_create_returns_e2b_sandbox_with_timings(api) -> None:
    r = await api.post("/v2/sandboxes", json={"templateID": "tpl", "timeout": 60, "metadata": {"a": "1"},
                                              "envVars": {"X": "y"}, "autoPause": False, "secure": True,
                                              "mcp": None, "allow_internet_access": True})
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body) >= {"sandboxID", "templateID", "clientID", "envdVersion", "envdAccessToken", "domain", "startTimes"}
    assert body["templateID"] == "tpl" and body["domain"] == "localhost" and body["envdAccessToken"]
    assert json.loads(r.headers["x-trenvx-timings"]) == body["startTimes"] and "init" in body["startTimes"]
    assert r.headers["location"] == f"/sandboxes/{body['sandboxID']}"
    d = (await api.get(f"/sandboxes/{body['sandboxID']}")).json()
    assert d["state"] == "running" and d["metadata"] == {"a": "1"} and d["envdAccessToken"] == body["envdAccessToken"]
    assert d["cpuCount"] == 1 and d["memoryMB"] == 256 and d["trenvx"]["rssBytes"] > 0
    assert 55 < d["trenvx"]["timeoutLeft"] <= 60


async def test_base_means_the_default_template(api) -> None:
    r = await api.post("/sandboxes", json={"templateID": "base"})
    assert r.status_code == 201 and r.json()["templateID"] == "tpl"


@pytest.mark.parametrize("path", ["/sandboxes", "/v2/sandboxes"])
@pytest.mark.parametrize("body", [{}, {"templateID": None}, {"timeout": 60}])
async def test_create_without_template_gets_the_default(api, path, body) -> None:
    r = await api.post(path, json=body)
    assert r.status_code == 201, r.text
    assert r.json()["templateID"] == "tpl"


@pytest.mark.parametrize("body,field", [
    ({"templateID": ""}, "templateID"),
    ({"templateID": 5}, "templateID"),
    ({"templateID": "../../etc"}, "templateID"),
    ({"templateID": "a/b"}, "templateID"),
    ({"templateID": "tpl", "timeout": "60"}, "timeout"),
    ({"templateID": "tpl", "timeout": 1.5}, "timeout"),
    ({"templateID": "tpl", "timeout": True}, "timeout"),
    ({"templateID": "tpl", "timeout": 0}, "timeout"),
    ({"templateID": "tpl", "timeout": 10**9}, "timeout"),
    ({"templateID": "tpl", "metadata": {"a": 1}}, "metadata"),
    ({"templateID": "tpl", "metadata": ["a"]}, "metadata"),
    ({"templateID": "tpl", "envVars": {"1BAD": "x"}}, "envVars"),
    ({"templateID": "tpl", "envVars": {"A": "x\u0000y"}}, "envVars"),
])
async def test_bad_create_bodies_are_400_naming_the_field(api, body, field) -> None:
    r = await api.post("/sandboxes", json=body)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["code"] == 400 and field in err["message"], err


async def test_malformed_and_oversized_bodies(api) -> None:
    r = await api.post("/sandboxes", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["message"]
    r = await api.post("/sandboxes", content=b"templateID=x")
    assert r.status_code == 400 and "JSON object" in r.json()["message"]
    huge = {"templateID": "tpl", "metadata": {"k": "v" * (2 << 20)}}
    r = await api.post("/sandboxes", json=huge)
    assert r.status_code == 413 and r.json()["code"] == 413

    async def chunks():  # no Content-Length: counted while reading
        for _ in range(40):
            yield b"x" * 65536
    r = await api.post("/sandboxes", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


async def test_unknown_things_are_404(api) -> None:
    r = await api.post("/sandboxes", json={"templateID": "nosuch"})
    assert r.status_code == 404 and "templateID" in r.json()["message"] and "template-manager" in r.json()["message"]
    for method, path in [("GET", "/sandboxes/nosuch"), ("DELETE", "/sandboxes/nosuch"),
                         ("GET", "/sandboxes/..%2F..%2Fetc%2Fpasswd"), ("GET", "/templates/nosuch"),
                         ("GET", "/templates/..%2Fx"), ("GET", "/no/such/route")]:
        r = await api.request(method, path)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["code"] == 404
    r = await api.post("/sandboxes/nosuch/timeout", json={"timeout": 10})
    assert r.status_code == 404
    r = await api.put("/sandboxes")
    assert r.status_code == 405 and r.json()["code"] == 405


async def test_kill_then_404_with_the_reason(api) -> None:
    sid = (await create(api))["sandboxID"]
    assert (await api.delete(f"/sandboxes/{sid}")).status_code == 204
    r = await api.get(f"/sandboxes/{sid}")
    assert r.status_code == 404 and "killed" in r.json()["message"]
    assert (await api.delete(f"/sandboxes/{sid}")).status_code == 404


async def test_timeout_refresh_and_connect(api) -> None:
    sid = (await create(api, timeout=30))["sandboxID"]
    assert (await api.post(f"/sandboxes/{sid}/timeout", json={"timeout": 600})).status_code == 204
    left = (await api.get(f"/sandboxes/{sid}")).json()["trenvx"]["timeoutLeft"]
    assert 595 < left <= 600
    r = await api.post(f"/sandboxes/{sid}/timeout", json={"timeout": "x"})
    assert r.status_code == 400 and "timeout" in r.json()["message"]
    r = await api.post(f"/sandboxes/{sid}/timeout", json={"timeout": -1})
    assert r.status_code == 400 and "timeout" in r.json()["message"]
    assert (await api.post(f"/sandboxes/{sid}/refreshes", json={"duration": 10})).status_code == 204
    assert (await api.get(f"/sandboxes/{sid}")).json()["trenvx"]["timeoutLeft"] > 590
    assert (await api.post(f"/sandboxes/{sid}/refreshes")).status_code == 204
    r = await api.post(f"/v2/sandboxes/{sid}/connect", json={"timeout": 900})
    assert r.status_code == 200 and r.json()["sandboxID"] == sid and r.json()["envdAccessToken"]
    assert (await api.get(f"/sandboxes/{sid}")).json()["trenvx"]["timeoutLeft"] > 890


async def test_pause_resume_409s(api) -> None:
    sid = (await create(api))["sandboxID"]
    assert (await api.post(f"/sandboxes/{sid}/pause")).status_code == 204
    r = await api.post(f"/sandboxes/{sid}/pause")
    assert r.status_code == 409 and r.json()["code"] == 409
    assert (await api.get(f"/sandboxes/{sid}")).json()["state"] == "paused"
    r = await api.get("/sandboxes/x", headers={"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983"})
    assert r.status_code == 502 and "paused" in r.json()["message"]  # E2B's SDKs: is_running() -> False
    assert (await api.post(f"/sandboxes/{sid}/resume")).status_code == 201
    assert (await api.post(f"/sandboxes/{sid}/resume")).status_code == 409
    await api.post(f"/sandboxes/{sid}/pause")
    assert (await api.post(f"/sandboxes/{sid}/connect", json={"timeout": 60})).status_code == 201  # resumed
    assert (await api.get(f"/sandboxes/{sid}")).json()["state"] == "running"
    assert (await api.post(f"/sandboxes/{sid}/connect", json={"timeout": 60})).status_code == 200  # running


async def test_list_filters_and_pagination(api) -> None:
    a = (await create(api, metadata={"team": "x", "n": "1"}))["sandboxID"]
    b = (await create(api, metadata={"team": "x", "n": "2"}))["sandboxID"]
    c = (await create(api, metadata={"team": "y"}))["sandboxID"]
    ids = lambda r: [s["sandboxID"] for s in r.json()]  # noqa: E731
    assert ids(await api.get("/sandboxes")) == [a, b, c]
    assert ids(await api.get("/sandboxes", params={"metadata": "team=x"})) == [a, b]
    assert ids(await api.get("/v2/sandboxes", params={"metadata": "team=x&n=2"})) == [b]
    assert ids(await api.get("/v2/sandboxes", params={"order": "desc"})) == [c, b, a]
    assert ids(await api.get("/v2/sandboxes", params={"order": "asc"})) == [a, b, c]
    assert ids(await api.get("/v2/sandboxes")) == [c, b, a]  # newest first, as E2B
    assert ids(await api.get("/v2/sandboxes", params={"template": "other"})) == []
    r = await api.get("/v2/sandboxes", params={"limit": 2})
    assert ids(r) == [c, b] and r.headers["x-next-token"]
    r2 = await api.get("/v2/sandboxes", params={"limit": 2, "nextToken": r.headers["x-next-token"]})
    assert ids(r2) == [a] and "x-next-token" not in r2.headers
    r = await api.get("/v2/sandboxes", params={"limit": 2, "order": "asc"})
    assert ids(r) == [a, b]
    r2 = await api.get("/v2/sandboxes", params={"limit": 2, "order": "asc", "nextToken": r.headers["x-next-token"]})
    assert ids(r2) == [c] and "x-next-token" not in r2.headers
    await api.delete(f"/sandboxes/{a}")
    assert ids(await api.get("/v2/sandboxes")) == [c, b]
    r = await api.get("/v2/sandboxes", params={"state": "running,exited"})
    assert {s["sandboxID"]: s["state"] for s in r.json()} == {a: "exited", b: "running", c: "running"}
    ex = [s for s in r.json() if s["state"] == "exited"][0]
    assert ex["trenvx"]["endReason"] == "killed"
    assert ids(await api.get("/v2/sandboxes", params={"state": "paused"})) == []
    for params in ({"state": "bogus"}, {"limit": 0}, {"limit": "x"}, {"nextToken": "!!!"}, {"order": "up"},
                   {"nextToken": "2"}, {"nextToken": "12.a/b"}, {"startedAfter": "yesterday"}, {"startedAfter": ""},
                   {"startedBefore": "2026-13-01T00:00:00Z"}):
        r = await api.get("/v2/sandboxes", params=params)
        assert r.status_code == 400, (params, r.text)
        assert r.json()["code"] == 400
        assert next(iter(params)) in r.json()["message"], r.json()


async def test_v2_list_time_filters(api) -> None:
    ids = lambda r: [s["sandboxID"] for s in r.json()]  # noqa: E731
    a = (await create(api))["sandboxID"]
    b = (await create(api))["sandboxID"]
    c = (await create(api))["sandboxID"]
    started = {s["sandboxID"]: dt.datetime.fromisoformat(s["startedAt"].replace("Z", "+00:00"))
               for s in (await api.get("/v2/sandboxes")).json()}
    tb = started[b]
    # startedAfter/startedBefore are inclusive, in any RFC 3339 spelling (Z, an offset, E2B's isoformat)
    r = await api.get("/v2/sandboxes", params={"startedAfter": tb.isoformat()})
    assert r.status_code == 200, r.text
    assert ids(r) == [c, b]
    z = tb.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert ids(await api.get("/v2/sandboxes", params={"startedBefore": z})) == [b, a]
    plus2 = tb.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat()
    assert ids(await api.get("/v2/sandboxes", params={"startedAfter": plus2, "startedBefore": plus2})) == [b]
    r = await api.get("/v2/sandboxes?startedAfter=" + plus2)  # "+" unescaped: read as the offset
    assert ids(r) == [c, b], r.text
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    assert ids(await api.get("/v2/sandboxes", params={"startedAfter": future})) == []
    assert ids(await api.get("/v2/sandboxes", params={"startedBefore": future})) == [c, b, a]


async def test_v2_list_cursor_survives_concurrent_creates(api) -> None:
    ids = lambda r: [s["sandboxID"] for s in r.json()]  # noqa: E731
    a = (await create(api))["sandboxID"]
    b = (await create(api))["sandboxID"]
    c = (await create(api))["sandboxID"]
    r = await api.get("/v2/sandboxes", params={"limit": 2})
    assert ids(r) == [c, b]
    token = r.headers["x-next-token"]
    d = (await create(api))["sandboxID"]  # created between pages: newer, so not on a later page
    r2 = await api.get("/v2/sandboxes", params={"limit": 2, "nextToken": token})
    assert ids(r2) == [a] and "x-next-token" not in r2.headers
    await api.delete(f"/sandboxes/{b}")  # the cursor's own item gone: still continues after it
    r3 = await api.get("/v2/sandboxes", params={"limit": 2, "nextToken": token})
    assert ids(r3) == [a]
    # walking all pages one at a time, with creates in between, sees each older sandbox once
    seen, token = [], None
    while True:
        params = {"limit": 1, **({"nextToken": token} if token else {})}
        r = await api.get("/v2/sandboxes", params=params)
        seen += ids(r)
        await create(api)
        token = r.headers.get("x-next-token")
        if not token:
            break
    assert seen == [d, c, a]


async def test_templates_and_health(api) -> None:
    r = await api.get("/templates")
    assert r.status_code == 200
    [t] = r.json()
    assert t["templateID"] == "tpl" and t["buildStatus"] == "ready" and t["memoryMB"] == 256 and t["isDefault"]
    await create(api)
    d = (await api.get("/templates/tpl")).json()
    assert d["spawnCount"] == 1 and len(d["builds"]) == 1 and d["builds"][0]["trenvxBuildID"] == t["buildID"]
    h = (await api.get("/health")).json()
    assert h["status"] == "ok" and h["sandboxes"] == 1 and h["templates"] == ["tpl"]
    spec = (await api.get("/openapi.json")).json()
    assert {"/sandboxes", "/v2/sandboxes", "/sandboxes/{sandboxID}", "/sandboxes/{sandboxID}/timeout",
            "/templates", "/health"} <= set(spec["paths"])


async def test_limits_map_to_429_and_503(tmp_path: Path, upstream) -> None:
    make_template(tmp_path, "tpl")
    cfg = make_config(tmp_path, max_sandboxes=1)
    m = fake_manager(cfg, upstream.port)
    app = create_app(cfg, manager=m)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        await create(c)
        r = await c.post("/sandboxes", json={"templateID": "tpl"})
        assert r.status_code == 429 and r.json()["code"] == 429 and r.headers["retry-after"]
        m.admission = Admission(Limits(10, 10, headroom_mb=10**6))
        r = await c.post("/sandboxes", json={"templateID": "tpl"})
        assert r.status_code == 503 and "memory" in r.json()["message"]

        async def broken_reclaim(parallel: int = 8) -> int:
            raise RuntimeError("agent gone")

        m.reclaim_for_memory = broken_reclaim  # a failed reclaim still lets the refusal through
        r = await c.post("/sandboxes", json={"templateID": "tpl"})
        assert r.status_code == 503 and "memory" in r.json()["message"]
        m.restorer.fail_next = RuntimeError("qemu exploded")
        m.admission = Admission(Limits(10, 10, headroom_mb=0))
        r = await c.post("/sandboxes", json={"templateID": "tpl"})
        assert r.status_code == 500 and "qemu exploded" in r.json()["message"]
    await m.close()


async def test_api_key(tmp_path: Path, upstream) -> None:
    make_template(tmp_path, "tpl")
    cfg = make_config(tmp_path, api_key="s3cret")
    m = fake_manager(cfg, upstream.port)
    app = create_app(cfg, manager=m)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for path in ("/sandboxes", "/v2/sandboxes", "/templates", "/templates/tpl", "/sandboxes/x"):
            r = await c.get(path)
            assert r.status_code == 401 and "X-API-Key" in r.json()["message"], path
            r = await c.get(path, headers={"X-API-Key": "wrong"})
            assert r.status_code == 401 and r.json()["message"] == "invalid API key"
        r = await c.post("/sandboxes", json={"templateID": "tpl"})
        assert r.status_code == 401 and not m.list()
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/openapi.json")).status_code == 200
        r = await c.post("/sandboxes", json={"templateID": "tpl"}, headers={"X-API-Key": "s3cret"})
        assert r.status_code == 201
        sid = r.json()["sandboxID"]
        # the proxy is authorised per sandbox (by the agent's access token), not by the API key
        r = await c.get("/health", headers={"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983"})
        assert r.status_code == 204
    await m.close()


async def test_concurrent_creates_and_kills_are_consistent(api) -> None:
    created = await asyncio.gather(*(create(api) for _ in range(8)))
    ids = [c["sandboxID"] for c in created]
    assert len(set(ids)) == 8
    rs = await asyncio.gather(*(api.delete(f"/sandboxes/{i}") for i in ids + ids[:3]))
    assert sorted(r.status_code for r in rs) == [204] * 8 + [404] * 3
    assert (await api.get("/sandboxes")).json() == []


async def test_invalid_unicode_in_bodies_is_a_400_not_a_crash(api) -> None:
    for raw in (b'{"templateID": "tpl", "metadata": {"\\udadb": "v"}}',
                b'{"templateID": "tpl", "envVars": {"A": "\\udadb"}}',
                b'{"templateID": "\\udadb"}',
                b'{"templateID": "tpl", "metadata": {"k": "\xff\xfe"}}'):
        r = await api.post("/sandboxes", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, (raw, r.text)
        assert r.json()["code"] == 400
    assert (await api.get("/sandboxes")).json() == []
