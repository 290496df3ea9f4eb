"""Pause to disk and resume through the HTTP API, in-process (no VMs: the VMM is a process that a
pause ends and a resume starts again, see server_fakes.FakeSuspender): E2B's statuses and bodies,
bad requests that change nothing, the frozen timeout, the listing, the metrics. The real thing is
tests/e2e/test_pause_resume.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from .server_fakes import ThreadedServer, UpstreamState, fake_api, pid_gone, upstream_app


@pytest.fixture(scope="module")
def upstream():
    with ThreadedServer(upstream_app(UpstreamState())) as s:
        yield s


@pytest.fixture
async def api(tmp_path: Path, upstream):
    async with fake_api(tmp_path, upstream.port) as c:
        yield c


async def create(c: httpx.AsyncClient, **body) -> str:
    r = await c.post("/sandboxes", json={"templateID": "tpl", **body})
    assert r.status_code == 201, r.text
    return r.json()["sandboxID"]


async def test_pause_then_connect_keeps_id_token_and_metadata(api) -> None:
    r = await api.post("/sandboxes", json={"templateID": "tpl", "metadata": {"k": "v"}, "envVars": {"E": "1"}})
    created = r.json()
    sid, token = created["sandboxID"], created["envdAccessToken"]
    pid = api.manager.get(sid).pid
    assert (await api.post(f"/sandboxes/{sid}/pause", json={})).status_code == 204
    assert pid_gone(pid)
    d = (await api.get(f"/sandboxes/{sid}")).json()
    assert d["state"] == "paused" and d["trenvx"].get("pid") is None and d["trenvx"]["pssBytes"] == 0
    assert d["trenvx"]["pause"]["kind"] == "memory" and d["trenvx"]["pause"]["storedBytes"] > 0
    assert "envdUnresponsiveAtPause" not in d
    r = await api.post(f"/sandboxes/{sid}/connect", json={"timeout": 120})
    assert r.status_code == 201 and r.json()["envdAccessToken"] == token and r.json()["sandboxID"] == sid
    d = (await api.get(f"/sandboxes/{sid}")).json()
    assert d["state"] == "running" and d["metadata"] == {"k": "v"} and d["trenvx"].get("pid") not in (None, pid)
    assert api.manager.get(sid).env_vars == {"E": "1"} and 290 < d["trenvx"]["timeoutLeft"] <= 300  # never shortened


async def test_any_number_of_cycles_and_both_resume_paths(api) -> None:
    sid = await create(api)
    for i in range(5):
        assert (await api.post(f"/sandboxes/{sid}/pause")).status_code == 204
        path = f"/sandboxes/{sid}/resume" if i % 2 else f"/v2/sandboxes/{sid}/connect"
        assert (await api.post(path)).status_code == 201
    assert [c[0] for c in api.manager.suspender.calls] == ["pause", "resume"] * 5


async def test_bad_requests_change_nothing(api) -> None:
    sid = await create(api)
    assert (await api.post("/sandboxes/nosuchsandbox/pause")).status_code == 404
    assert (await api.post("/sandboxes/nosuchsandbox/connect")).status_code == 404
    assert (await api.post(f"/sandboxes/{sid}/resume")).status_code == 409  # running
    assert (await api.post(f"/sandboxes/{sid}/pause", json={"memory": "no"})).status_code == 400
    assert api.manager.get(sid).state == "running" and api.manager.suspender.calls == []
    assert (await api.post(f"/sandboxes/{sid}/pause")).status_code == 204
    r = await api.post(f"/sandboxes/{sid}/pause")
    assert r.status_code == 409 and "already paused" in r.json()["message"]
    r = await api.post(f"/sandboxes/{sid}/resume", json={"autoPause": "yes"})
    assert r.status_code == 400 and "autoPause" in r.json()["message"]
    assert api.manager.get(sid).state == "paused" and len(api.manager.suspender.calls) == 1
    # killed while paused: its files go, and it stays a 404 with the reason
    workdir = api.manager.get(sid).restored.workdir
    assert (await api.delete(f"/sandboxes/{sid}")).status_code == 204
    assert not workdir.exists() and api.manager.store.get(sid).state == "exited"
    for path in ("resume", "connect", "pause"):
        r = await api.post(f"/sandboxes/{sid}/{path}")
        assert r.status_code == 404 and "killed" in r.json()["message"]


async def test_filesystem_only_pause(api) -> None:
    sid = await create(api)
    assert (await api.post(f"/sandboxes/{sid}/pause", json={"memory": False})).status_code == 204
    d = (await api.get(f"/sandboxes/{sid}")).json()
    assert d["trenvx"]["pause"]["kind"] == "filesystem" and d["trenvx"]["pause"]["storedBytes"] == 0
    assert (await api.post(f"/sandboxes/{sid}/connect")).status_code == 201
    assert api.manager.suspender.calls == [("pause", sid, False), ("resume", sid, True)]


async def test_a_guest_that_does_not_answer(api) -> None:
    """E2B's semantics: strict (requireHealthyGuest) or filesystem-only pauses are refused (503, it
    keeps running); a plain pause goes ahead, marked, and then resumes only without memory."""
    sid = await create(api)
    fake = api.manager.suspender
    for body in ({"requireHealthyGuest": True}, {"memory": False}):
        fake.unresponsive_next = True
        r = await api.post(f"/sandboxes/{sid}/pause", json=body)
        assert r.status_code == 503 and api.manager.get(sid).state == "running"
    fake.unresponsive_next = True
    assert (await api.post(f"/sandboxes/{sid}/pause")).status_code == 204
    d = (await api.get(f"/sandboxes/{sid}")).json()
    assert d["envdUnresponsiveAtPause"] is True
    listed = (await api.get("/v2/sandboxes", params={"state": "paused"})).json()
    assert [x["envdUnresponsiveAtPause"] for x in listed] == [True]
    r = await api.post(f"/sandboxes/{sid}/connect")
    assert r.status_code == 409 and r.json()["error_code"] == "sandbox_snapshot_guest_agent_unresponsive"
    assert api.manager.get(sid).state == "paused"
    assert (await api.post(f"/sandboxes/{sid}/connect", json={"memory": False})).status_code == 201
    assert api.manager.get(sid).state == "running"


async def test_a_failed_pause_or_resume_leaves_the_sandbox_as_it_was(api) -> None:
    sid = await create(api)
    fake = api.manager.suspender
    fake.fail_next = RuntimeError("the migration broke")
    r = await api.post(f"/sandboxes/{sid}/pause")
    assert r.status_code == 500 and "keeps running" in r.json()["message"] and "migration broke" in r.json()["message"]
    sb = api.manager.get(sid)
    assert sb.state == "running" and sb._watcher is not None and not sb._watcher.done()
    assert (await api.post(f"/sandboxes/{sid}/pause")).status_code == 204
    fake.fail_next = RuntimeError("no VMM today")
    r = await api.post(f"/sandboxes/{sid}/connect")
    assert r.status_code == 500 and "stays paused" in r.json()["message"]
    assert sb.state == "paused" and (sb.restored.workdir / "pause" / "vmstate").is_file()
    assert (await api.post(f"/sandboxes/{sid}/connect")).status_code == 201


async def test_a_paused_sandboxs_timeout_does_not_run(api) -> None:
    sid = await create(api, timeout=2)
    assert (await api.post(f"/sandboxes/{sid}/pause")).status_code == 204
    await asyncio.sleep(3)  # the reaper runs every 50 ms
    assert api.manager.get(sid).state == "paused"
    left = (await api.get(f"/sandboxes/{sid}")).json()["trenvx"]["timeoutLeft"]
    assert 0 < left <= 2
    # set_timeout on a paused sandbox sets what it will have left
    assert (await api.post(f"/sandboxes/{sid}/timeout", json={"timeout": 50})).status_code == 204
    assert 49 < (await api.get(f"/sandboxes/{sid}")).json()["trenvx"]["timeoutLeft"] <= 50
    assert (await api.post(f"/sandboxes/{sid}/resume")).status_code == 201
    assert 45 < api.manager.get(sid).timeout_left <= 50


async def test_listing_and_metrics(api) -> None:
    a, b = await create(api), await create(api)
    assert (await api.post(f"/sandboxes/{a}/pause")).status_code == 204
    ids = lambda r: sorted(x["sandboxID"] for x in r.json())  # noqa: E731
    assert ids(await api.get("/v2/sandboxes", params={"state": "paused"})) == [a]
    assert ids(await api.get("/v2/sandboxes", params={"state": "running"})) == [b]
    assert ids(await api.get("/v2/sandboxes")) == sorted([a, b])
    text = (await api.get("/metrics")).text
    assert 'trenvx_sandboxes_paused{template="tpl"} 1.0' in text
    assert 'trenvx_sandboxes_running{template="tpl"} 1.0' in text
    assert 'trenvx_pauses_total{kind="memory",outcome="ok",reason="requested",template="tpl"} 1.0' in text
    assert 'trenvx_paused_stored_bytes{template="tpl"} 110.0' in text
    assert (await api.post(f"/sandboxes/{a}/connect")).status_code == 201
    text = (await api.get("/metrics")).text
    assert 'trenvx_resumes_total{kind="memory",outcome="ok",reason="requested",template="tpl"} 1.0' in text
    assert 'trenvx_pause_stored_bytes_total{template="tpl"} 110.0' in text


async def test_proxy_answers_502_for_a_paused_sandbox(api) -> None:
    sid = await create(api)
    assert (await api.post(f"/sandboxes/{sid}/pause")).status_code == 204
    r = await api.get("/health", headers={"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983"})
    assert r.status_code == 502 and "paused" in r.json()["message"]


async def test_kill_waits_for_a_pause_in_progress(api, monkeypatch) -> None:
    sid = await create(api)
    fake = api.manager.suspender
    real = fake.pause
    finished: list[str] = []

    async def slow_pause(*a, **kw):  # noqa: ANN002, ANN003
        await asyncio.sleep(0.3)
        got = await real(*a, **kw)
        finished.append("pause")
        return got

    monkeypatch.setattr(fake, "pause", slow_pause)
    workdir = api.manager.get(sid).restored.workdir
    pausing = asyncio.ensure_future(api.post(f"/sandboxes/{sid}/pause"))
    await asyncio.sleep(0.05)
    assert (await api.delete(f"/sandboxes/{sid}")).status_code == 204
    assert finished == ["pause"]  # the kill waited for it
    assert (await pausing).status_code == 204
    assert not workdir.exists()  # nothing of the pause left behind
