"""Auto-pause, auto-resume and the retention of paused sandboxes (issue 14 item 3), over fake VMs
(see server_fakes: a pause ends the fake VMM process, a resume starts another): the reaper pauses a
timed-out sandbox whose lifecycle says so and kills the others; a failed auto-pause ends it with the
failure in its end reason; traffic through the proxy resumes an auto-resume sandbox once, however
many requests wait, and not without its secrets on the agent's port; a paused sandbox past
``paused_retention_s`` is killed with its reason and files; the lifecycle is reported in E2B's
shape and kept across pause/resume cycles and a restart. The real thing is
tests/e2e/test_auto_pause.py."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import httpx
import pytest

from sandbox_sdk._lifecycle import create_lifecycle_body
from sandbox_sdk.exceptions import InvalidArgumentError
from trenvx.sandbox.lifecycle import LifecyclePolicy
from trenvx.sandbox.manager import SandboxConflict, SandboxNotFound
from trenvx.server.app import create_app

from .server_fakes import ThreadedServer, UpstreamState, fake_manager, make_config, make_template, pid_gone, upstream_app

WEB_PORT = 8000
PAUSE = LifecyclePolicy(auto_pause=True)
PAUSE_AND_RESUME = LifecyclePolicy(auto_pause=True, auto_resume=True)


@pytest.fixture(scope="module")
def upstream():
    with ThreadedServer(upstream_app(UpstreamState())) as s:
        yield s


def manager_for(tmp_path: Path, upstream, **orch):
    make_template(tmp_path, "tpl")
    return fake_manager(make_config(tmp_path, **orch), upstream.port, forwards={WEB_PORT: upstream.port})


@pytest.fixture
async def manager(tmp_path: Path, upstream):
    m = manager_for(tmp_path, upstream)
    await m.start()
    yield m
    await m.close()


@pytest.fixture
async def api(manager):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(manager.config, manager=manager)),
                                 base_url="http://testserver") as c:
        c.manager = manager  # type: ignore[attr-defined]
        yield c


async def until(cond, timeout: float = 10.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.02)
    return True


def calls(m, op: str) -> list:
    return [c for c in m.suspender.calls if c[0] == op]


# -- the policy -----------------------------------------------------------------------------------

def test_policy_reads_old_and_newer_records() -> None:
    assert LifecyclePolicy.from_json({}) == LifecyclePolicy() and LifecyclePolicy().on_timeout == "kill"
    p = LifecyclePolicy(auto_pause=True, auto_resume=True, timeout_s=30.0)
    assert LifecyclePolicy.from_json(p.to_json()) == p and p.on_timeout == "pause"
    assert LifecyclePolicy.from_json({**p.to_json(), "a_later_field": 1}) == p


# -- the reaper: pause, not kill ------------------------------------------------------------------

async def test_a_timeout_pauses_a_sandbox_whose_lifecycle_says_so_and_kills_the_others(manager) -> None:
    events = []
    manager.suspend_observers.append(events.append)
    paused = await manager.create("tpl", timeout_s=1, lifecycle=PAUSE)
    killed = await manager.create("tpl", timeout_s=1)
    pid, workdir = paused.pid, paused.restored.workdir
    assert await until(lambda: paused.paused and killed.ending)
    assert [(e.op, e.reason, e.outcome) for e in events] == [("pause", "timeout", "ok")], "the metrics tell auto-pauses"
    assert pid_gone(pid) and workdir.is_dir() and paused.id in {s.id for s in manager.list()}
    assert paused.pause_info.reason == "timeout" and paused.pause_info.kind == "memory"
    assert paused.pause_info.timeout_left == 1.0, "an auto-paused sandbox gets its create's timeout again"
    assert calls(manager, "pause") == [("pause", paused.id, True)]
    rec = manager.store.get(paused.id)
    assert rec.state == "paused" and rec.pause["reason"] == "timeout" and rec.lifecycle["auto_pause"] is True
    with pytest.raises(SandboxNotFound, match="its timeout expired"):
        manager.get(killed.id)
    # paused, its timeout does not run: the reaper leaves it alone
    await manager.reaper.tick(now=paused.pause_info.paused_at + 3600)
    assert paused.paused and not paused.ending and len(calls(manager, "pause")) == 1
    # resumed (connect), it runs for its create's timeout, and pauses again at its end: any number of cycles
    for cycle in range(2):
        sb, resumed = await manager.connect(paused.id, 1)
        assert resumed and not sb.paused and sb.lifecycle == dataclasses.replace(PAUSE, timeout_s=1.0)
        assert await until(lambda: sb.paused), f"cycle {cycle}: not paused again at its timeout"
    assert len(calls(manager, "pause")) == 3 and manager.get(paused.id).lifecycle.auto_pause


async def test_a_filesystem_only_auto_pause(manager) -> None:
    sb = await manager.create("tpl", timeout_s=1, lifecycle=LifecyclePolicy(auto_pause=True, auto_pause_memory=False))
    assert await until(lambda: sb.paused)
    assert sb.pause_info.kind == "filesystem" and calls(manager, "pause") == [("pause", sb.id, False)]


async def test_a_failed_auto_pause_ends_the_sandbox_saying_why(manager) -> None:
    manager.suspender.refuse_next = "the agent did not answer the freeze"
    sb = await manager.create("tpl", timeout_s=1, lifecycle=PAUSE)
    pid = sb.pid
    assert await until(lambda: sb.ending)
    assert await until(lambda: pid_gone(pid))
    rec = manager.store.get(sb.id)
    assert rec.state == "exited" and rec.end_reason.startswith("timeout: its auto-pause failed (PauseRefused: ")
    with pytest.raises(SandboxNotFound, match="its timeout expired .*auto-pause failed"):
        manager.get(sb.id)


async def test_more_time_given_while_due_cancels_the_auto_pause(manager) -> None:
    sb = await manager.create("tpl", timeout_s=60, lifecycle=PAUSE)
    sb.end_at = 0.0  # due ...
    manager.set_timeout(sb.id, 300)  # ... and given more time before the reaper came by
    await manager._expire(sb.id)
    await asyncio.gather(*manager._auto_pausing.values())
    assert not sb.paused and calls(manager, "pause") == []


async def test_an_auto_pause_in_flight_keeps_its_sandbox_across_a_stop(tmp_path: Path, upstream) -> None:
    """A manager that stops while an auto-pause runs waits for it: the sandbox is then paused (a record
    and files for the next server), not killed with the running ones."""
    m = manager_for(tmp_path, upstream)
    await m.start()
    gate = asyncio.Event()
    real_pause = m.suspender.pause

    async def slow_pause(*a, **kw):
        await gate.wait()
        return await real_pause(*a, **kw)

    m.suspender.pause = slow_pause  # type: ignore[method-assign]
    sb = await m.create("tpl", timeout_s=1, lifecycle=PAUSE)
    assert await until(lambda: sb.id in m._auto_pausing)
    closing = asyncio.ensure_future(m.close())
    await asyncio.sleep(0.1)
    gate.set()
    await closing
    again = manager_for(tmp_path, upstream)
    await again.start()
    try:
        assert again.recovered_paused == [sb.id] and again.get(sb.id).pause_info.reason == "timeout"
    finally:
        await again.kill(sb.id)
        await again.close()


# -- retention ------------------------------------------------------------------------------------

async def test_a_sandbox_paused_past_the_retention_is_killed_with_its_files(tmp_path: Path, upstream) -> None:
    m = manager_for(tmp_path, upstream, paused_retention_s=600)
    await m.start()
    try:
        old = await m.create("tpl", lifecycle=PAUSE)
        recent = await m.create("tpl")
        for sb in (old, recent):
            await m.pause(sb.id)
        workdir = old.restored.workdir
        assert (workdir / "pause" / "vmstate").is_file()
        old.pause_info.paused_at -= 601  # paused 10 minutes ago
        recent.pause_info.paused_at -= 500
        await m.reaper.tick()
        assert await until(lambda: not workdir.exists())
        with pytest.raises(SandboxNotFound, match="stayed paused longer than .*paused_retention_s"):
            m.get(old.id)
        assert m.store.get(old.id).end_reason == "paused_retention_expired"
        assert m.get(recent.id).paused and recent.restored.workdir.is_dir()
    finally:
        await m.close()


async def test_retention_zero_keeps_paused_sandboxes(tmp_path: Path, upstream) -> None:
    m = manager_for(tmp_path, upstream, paused_retention_s=0)
    await m.start()
    try:
        sb = await m.create("tpl")
        await m.pause(sb.id)
        sb.pause_info.paused_at -= 10 * 365 * 86400
        await m.reaper.tick()
        assert m.get(sb.id).paused and sb.restored.workdir.is_dir()
    finally:
        await m.close()


def test_the_retention_default_is_a_week() -> None:
    from trenvx.config import OrchestratorConfig

    assert OrchestratorConfig().paused_retention_s == 7 * 24 * 3600


# -- wake (auto-resume) ---------------------------------------------------------------------------

async def test_wake_resumes_once_for_many_waiters_and_only_with_auto_resume(manager) -> None:
    events = []
    manager.suspend_observers.append(events.append)
    sb = await manager.create("tpl", timeout_s=300, lifecycle=PAUSE_AND_RESUME)
    plain = await manager.create("tpl", lifecycle=PAUSE)
    manager.set_timeout(sb.id, 2)  # paused with a moment left ...
    await manager.pause(sb.id)
    await manager.pause(plain.id)
    gate = asyncio.Event()
    real_resume = manager.suspender.resume

    async def slow_resume(*a, **kw):
        await gate.wait()
        return await real_resume(*a, **kw)

    manager.suspender.resume = slow_resume  # type: ignore[method-assign]
    waiters = [asyncio.ensure_future(manager.wake(sb.id)) for _ in range(5)]
    await asyncio.sleep(0.05)
    # a waiter that gives up does not stop the resume the others wait for
    waiters[0].cancel()
    gate.set()
    results = await asyncio.gather(*waiters[1:])
    assert all(r is sb for r in results) and not sb.paused
    assert sb.timeout_left > 250, "... woken, it runs for its create's timeout, as E2B's auto-resume"
    assert calls(manager, "resume") == [("resume", sb.id, True)]
    assert [(e.op, e.reason) for e in events if e.op == "resume"] == [("resume", "traffic")]
    assert await manager.wake(sb.id) is sb  # running: nothing to do
    with pytest.raises(SandboxConflict, match="not created with auto-resume"):
        await manager.wake(plain.id)
    assert plain.paused


# -- the API --------------------------------------------------------------------------------------

async def test_create_takes_e2b_lifecycle_fields_and_get_reports_them(api) -> None:
    cases = [
        ({}, {"onTimeout": "kill", "autoResume": False}),
        ({"autoPause": False, "autoPauseMemory": True}, {"onTimeout": "kill", "autoResume": False}),
        ({"autoPause": True}, {"onTimeout": "pause", "autoResume": False}),
        ({"autoPause": True, "autoResume": {"enabled": True}}, {"onTimeout": "pause", "autoResume": True}),
        ({"autoPause": True, "autoPauseMemory": False}, {"onTimeout": "pause", "autoResume": False}),
        # as in E2B's API, auto-resume stands apart from auto-pause: it wakes a sandbox a pause call paused
        ({"autoResume": {"enabled": True}}, {"onTimeout": "kill", "autoResume": True}),
    ]
    for body, expected in cases:
        r = await api.post("/v2/sandboxes", json={"templateID": "tpl", "timeout": 60, **body})
        assert r.status_code == 201, r.text
        sid = r.json()["sandboxID"]
        lifecycle = (await api.get(f"/sandboxes/{sid}")).json()["lifecycle"]
        assert {k: lifecycle[k] for k in expected} == expected, body
        assert lifecycle["autoPauseMemory"] is (body.get("autoPauseMemory") is not False)
        assert api.manager.get(sid).lifecycle.timeout_s == 60.0


@pytest.mark.parametrize("body, says", [
    ({"autoPause": "yes"}, "autoPause"), ({"autoPauseMemory": 0}, "autoPauseMemory"), ({"autoResume": {"enabled": 1}}, "autoResume"),
    ({"autoPauseMemory": None, "autoResume": True}, "autoResume"),
])
async def test_bad_lifecycles_are_400s_naming_the_field(api, body, says) -> None:
    r = await api.post("/sandboxes", json={"templateID": "tpl", **body})
    assert r.status_code == 400 and says in r.json()["message"], r.text
    assert api.manager.list() == []


async def test_auto_pause_on_a_vmm_that_cannot_pause_is_a_409(tmp_path: Path, upstream) -> None:
    make_template(tmp_path, "fc", vmm_type="firecracker")
    cfg = make_config(tmp_path)
    m = fake_manager(cfg, upstream.port, vmm="firecracker")
    await m.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(cfg, manager=m)),
                                     base_url="http://testserver") as c:
            r = await c.post("/sandboxes", json={"templateID": "fc", "autoPause": True})
            assert r.status_code == 409 and r.json()["message"].startswith("body field autoPause: "), r.text
            assert m.list() == []
    finally:
        await m.close()
        await m.restorer.close_standins()


async def test_the_deprecated_resume_sets_the_auto_pause(api) -> None:
    sid = (await api.post("/sandboxes", json={"templateID": "tpl"})).json()["sandboxID"]
    assert (await api.post(f"/sandboxes/{sid}/pause")).status_code == 204
    r = await api.post(f"/sandboxes/{sid}/resume", json={"autoPause": True})
    assert r.status_code == 201, r.text
    assert (await api.get(f"/sandboxes/{sid}")).json()["lifecycle"]["onTimeout"] == "pause"
    assert api.manager.store.get(sid).lifecycle["auto_pause"] is True
    assert (await api.post(f"/sandboxes/{sid}/pause")).status_code == 204
    assert (await api.post(f"/sandboxes/{sid}/resume", json={})).status_code == 201  # absent: unchanged
    assert api.manager.get(sid).lifecycle.auto_pause


async def test_paused_detail_says_why_it_paused(api) -> None:
    sid = (await api.post("/sandboxes", json={"templateID": "tpl", "timeout": 1, "autoPause": True})).json()["sandboxID"]
    assert await until(lambda: api.manager.get(sid).paused)
    d = (await api.get(f"/sandboxes/{sid}")).json()
    assert d["state"] == "paused" and d["trenvx"]["pause"]["reason"] == "timeout"
    assert (await api.post(f"/sandboxes/{sid}/connect", json={"timeout": 60})).status_code == 201
    assert (await api.post(f"/sandboxes/{sid}/pause")).status_code == 204
    assert (await api.get(f"/sandboxes/{sid}")).json()["trenvx"]["pause"]["reason"] == "requested"


# -- the proxy ------------------------------------------------------------------------------------

def to(sid: str, port: int, **headers: str) -> dict[str, str]:
    return {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": str(port), **headers}


async def test_traffic_resumes_an_auto_resume_sandbox_and_is_answered(api) -> None:
    created = (await api.post("/sandboxes", json={"templateID": "tpl", "autoPause": True,
                                                  "autoResume": {"enabled": True}})).json()
    sid = created["sandboxID"]
    assert (await api.post(f"/sandboxes/{sid}/pause")).status_code == 204
    gate = asyncio.Event()
    m = api.manager
    real_resume = m.suspender.resume

    async def slow_resume(*a, **kw):
        await gate.wait()
        return await real_resume(*a, **kw)

    m.suspender.resume = slow_resume  # type: ignore[method-assign]
    requests = [asyncio.ensure_future(api.get("/headers", headers=to(sid, WEB_PORT))) for _ in range(4)]
    await asyncio.sleep(0.1)
    gate.set()
    answers = await asyncio.gather(*requests)
    assert [r.status_code for r in answers] == [200] * 4 and answers[0].json()["path"] == "/headers"
    assert not m.get(sid).paused and calls(m, "resume") == [("resume", sid, True)]


async def test_the_agent_port_wakes_it_only_with_its_access_token(api) -> None:
    created = (await api.post("/sandboxes", json={"templateID": "tpl", "autoPause": True,
                                                  "autoResume": {"enabled": True}})).json()
    sid, token = created["sandboxID"], created["envdAccessToken"]
    assert (await api.post(f"/sandboxes/{sid}/pause")).status_code == 204
    for headers in ({}, {"X-Access-Token": "not-its-token"}):
        r = await api.get("/health", headers=to(sid, 49983, **headers))
        assert r.status_code == 502 and "is paused" in r.json()["message"], r.text
    assert api.manager.get(sid).paused and calls(api.manager, "resume") == []
    r = await api.get("/health", headers=to(sid, 49983, **{"X-Access-Token": token}))
    assert r.status_code == 204 and not api.manager.get(sid).paused


async def test_a_pause_call_and_auto_resume_without_auto_pause(api) -> None:
    """auto-resume without auto-pause (E2B's API takes them apart): its timeout kills it, and traffic
    wakes it when a pause call paused it with its memory, not when it was paused without."""
    sid = (await api.post("/sandboxes", json={"templateID": "tpl", "autoResume": {"enabled": True}})).json()["sandboxID"]
    assert (await api.post(f"/sandboxes/{sid}/pause")).status_code == 204
    assert (await api.get("/headers", headers=to(sid, WEB_PORT))).status_code == 200
    assert not api.manager.get(sid).paused
    assert (await api.post(f"/sandboxes/{sid}/pause", json={"memory": False})).status_code == 204
    r = await api.get("/headers", headers=to(sid, WEB_PORT))
    assert r.status_code == 502 and "paused without its memory" in r.json()["message"], r.text
    assert api.manager.get(sid).paused and calls(api.manager, "resume") == [("resume", sid, True)]


async def test_without_auto_resume_a_paused_sandbox_stays_a_502(api) -> None:
    sid = (await api.post("/sandboxes", json={"templateID": "tpl", "autoPause": True})).json()["sandboxID"]
    assert (await api.post(f"/sandboxes/{sid}/pause")).status_code == 204
    r = await api.get("/headers", headers=to(sid, WEB_PORT))
    assert r.status_code == 502 and "is paused" in r.json()["message"]
    assert api.manager.get(sid).paused and calls(api.manager, "resume") == []


async def test_a_private_sandbox_needs_its_traffic_token_before_it_wakes(api) -> None:
    created = (await api.post("/sandboxes", json={"templateID": "tpl", "autoPause": True, "autoResume": {"enabled": True},
                                                  "network": {"allowPublicTraffic": False}})).json()
    sid = created["sandboxID"]
    sb = api.manager.get(sid)
    assert (await api.post(f"/sandboxes/{sid}/pause")).status_code == 204
    assert (await api.get("/headers", headers=to(sid, WEB_PORT))).status_code == 403
    assert sb.paused
    assert sb.traffic_access_token
    r = await api.get("/headers", headers=to(sid, WEB_PORT, **{"e2b-traffic-access-token": sb.traffic_access_token}))
    assert r.status_code == 200 and not sb.paused


async def test_a_failed_or_slow_auto_resume_is_said_and_changes_nothing(tmp_path: Path, upstream) -> None:
    m = manager_for(tmp_path, upstream, auto_resume_wait_s=0.2)
    await m.start()
    gate = asyncio.Event()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(m.config, manager=m)),
                                     base_url="http://testserver") as api:
            sid = (await api.post("/sandboxes", json={"templateID": "tpl", "autoPause": True,
                                                      "autoResume": {"enabled": True}})).json()["sandboxID"]
            assert (await api.post(f"/sandboxes/{sid}/pause")).status_code == 204
            m.suspender.fail_next = RuntimeError("no room for its memory")
            r = await api.get("/headers", headers=to(sid, WEB_PORT))
            assert r.status_code == 502, r.text
            assert "auto-resume failed: RuntimeError: no room for its memory" in r.json()["message"]
            assert m.get(sid).paused
            real_resume = m.suspender.resume

            async def stuck_resume(*a, **kw):
                await gate.wait()
                return await real_resume(*a, **kw)

            m.suspender.resume = stuck_resume  # type: ignore[method-assign]
            r = await api.get("/headers", headers=to(sid, WEB_PORT))
            assert r.status_code == 503 and r.headers["retry-after"] == "5" and "is resuming" in r.json()["message"]
            gate.set()  # the resume went on without the request that woke it
            assert await until(lambda: not m.get(sid).paused)
            assert (await api.get("/headers", headers=to(sid, WEB_PORT))).status_code == 200
    finally:
        gate.set()
        await m.close()


# -- across a restart -----------------------------------------------------------------------------

async def test_the_lifecycle_survives_a_restart_and_auto_resume_works_after_it(tmp_path: Path, upstream) -> None:
    m = manager_for(tmp_path, upstream)
    await m.start()
    sb = await m.create("tpl", timeout_s=1, lifecycle=PAUSE_AND_RESUME)
    assert await until(lambda: sb.paused)
    await m.close()
    again = manager_for(tmp_path, upstream)
    await again.start()
    try:
        back = again.get(sb.id)
        assert back.paused and back.lifecycle == dataclasses.replace(PAUSE_AND_RESUME, timeout_s=1.0)
        assert (await again.wake(sb.id)) is back and not back.paused
        assert back.lifecycle.auto_resume and back.timeout_left > 0
    finally:
        await again.close()


# -- sandbox_sdk ----------------------------------------------------------------------------------

@pytest.mark.parametrize("lifecycle, body", [
    (None, {}),
    ({"on_timeout": "kill"}, {"autoPause": False}),
    ({"on_timeout": "pause", "auto_resume": True}, {"autoPause": True, "autoResume": {"enabled": True}}),
    ({"on_timeout": {"action": "pause", "mode": "filesystem"}}, {"autoPause": True, "autoPauseMemory": False}),
    ({"on_timeout": {"action": "pause", "keep_memory": True}}, {"autoPause": True, "autoPauseMemory": True}),
    ({"on_timeout": "pause", "auto_resume": False}, {"autoPause": True, "autoResume": {"enabled": False}}),
])
def test_sdk_lifecycle_body_is_e2b_s(lifecycle, body) -> None:
    assert create_lifecycle_body(lifecycle) == body


def test_sdk_lifecycle_body_matches_the_e2b_package() -> None:
    e2b_api = pytest.importorskip("e2b.sandbox.sandbox_api")
    from e2b.api.client.models.new_sandbox_v2 import NewSandboxV2

    for lifecycle in ({"on_timeout": "pause", "auto_resume": True}, {"on_timeout": "kill"},
                      {"on_timeout": {"action": "pause", "mode": "filesystem"}}, {"on_timeout": "pause"}):
        b = e2b_api.build_lifecycle_config(lifecycle)
        theirs = NewSandboxV2(template_id="t", auto_pause=b.auto_pause, auto_pause_memory=b.auto_pause_memory,
                              auto_resume=b.auto_resume).to_dict()
        ours = create_lifecycle_body(lifecycle)
        assert ours == {k: v for k, v in theirs.items() if k in ("autoPause", "autoPauseMemory", "autoResume")}


@pytest.mark.parametrize("lifecycle, says", [
    ({"on_timeout": "sleep"}, "on_timeout must be"),
    ({"on_timeout": {"action": "nap"}}, 'on_timeout["action"] must be'),
    ({"on_timeout": "kill", "auto_resume": True}, "auto_resume can be True only"),
    ({"auto_resume": True}, "auto_resume can be True only"),
    ({"on_timeout": {"action": "pause", "mode": "filesystem"}, "auto_resume": True}, "filesystem"),
    ({"on_timeout": {"action": "kill", "mode": "full"}}, "only allowed with action"),
    ({"on_timeout": {"action": "pause", "mode": "disk"}}, "must be \"full\" or \"filesystem\""),
    ({"on_timeout": "pause", "autoresume": True}, "unknown key"),
    ("pause", "must be a dict"),
])
def test_sdk_lifecycle_mistakes_are_said(lifecycle, says) -> None:
    with pytest.raises(InvalidArgumentError, match=None) as ei:
        create_lifecycle_body(lifecycle)  # type: ignore[arg-type]
    assert says in str(ei.value)


async def test_both_sdks_create_with_a_lifecycle_and_read_it_back(manager) -> None:
    from sandbox_sdk import Sandbox as TrenvxSandbox
    from sandbox_sdk.e2b import AsyncSandbox

    conn = {"api_url": "http://testserver", "transport": httpx.ASGITransport(app=create_app(manager.config, manager=manager))}
    sbx = await AsyncSandbox.create("tpl", timeout=60, lifecycle={"on_timeout": "pause", "auto_resume": True}, **conn)
    assert (await sbx.get_info()).lifecycle == {"on_timeout": "pause", "auto_resume": True}
    assert manager.get(sbx.sandbox_id).lifecycle == dataclasses.replace(PAUSE_AND_RESUME, timeout_s=60.0)
    plain = await AsyncSandbox.create("tpl", **conn)
    assert (await plain.get_info()).lifecycle == {"on_timeout": "kill", "auto_resume": False}
    with pytest.raises(InvalidArgumentError, match="auto_resume can be True only"):
        await AsyncSandbox.create("tpl", lifecycle={"on_timeout": "kill", "auto_resume": True}, **conn)
    trenvx = await TrenvxSandbox.create("tpl", sandbox_timeout=60,
                                        lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"}}, **conn)
    assert manager.get(trenvx.id).lifecycle == LifecyclePolicy(auto_pause=True, auto_pause_memory=False, timeout_s=60.0)
    for s in (sbx, plain):
        await s.kill()
    await trenvx.kill()
