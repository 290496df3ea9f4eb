"""GET /sandboxes/{id}/metrics and GET /sandboxes/metrics through the real app and manager over
fake VMs, whose "agent" is a small server answering ``/metrics`` as each test sets it; and E2B's
unmodified ``Sandbox.get_metrics()`` against it. tests/e2e/test_e2b_metrics.py repeats the SDK
part with real VMs and their real agent."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trenvx.server.app import create_app

from .server_fakes import ThreadedServer, fake_manager, make_config, make_template

E2B_FIELDS = {"timestamp", "timestampUnix", "cpuCount", "cpuUsedPct", "memUsed", "memTotal", "memCache",
              "diskUsed", "diskTotal"}
KEY = "metrics-key"


class AgentAnswers:
    """What the fake agent's /metrics answers next (the last one repeats)."""

    def __init__(self) -> None:
        self.answers: list[Any] = []
        self.calls = 0

    def set(self, *answers: Any) -> None:
        self.answers = list(answers)

    def next(self) -> Any:
        self.calls += 1
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def figures(total: int = 1000, idle: int = 900, **kw: Any) -> dict[str, Any]:
    return {"cpu_count": 64, "cpu_used_pct": 7.0, "cpu_ticks_total": total, "cpu_ticks_idle": idle,
            "mem_total": 256 << 20, "mem_used": 50 << 20, "mem_cache": 5 << 20,
            "disk_total": 1 << 30, "disk_used": 200 << 20, **kw}


def agent_app(answers: AgentAnswers) -> Starlette:
    async def health(request: Request) -> Response:
        return Response(status_code=204)

    async def metrics(request: Request) -> Response:
        a = answers.next()
        if isinstance(a, bytes):
            return Response(a, media_type="application/json")
        return JSONResponse(a)

    return Starlette(routes=[Route("/health", health), Route("/metrics", metrics)])


@pytest.fixture(scope="module")
def agent():
    answers = AgentAnswers()
    with ThreadedServer(agent_app(answers)) as srv:
        srv.answers = answers  # type: ignore[attr-defined]
        yield srv


@pytest.fixture
async def api(tmp_path: Path, agent):
    agent.answers.set(figures())
    make_template(tmp_path, "tpl", vcpu=2)
    cfg = make_config(tmp_path, api_key=KEY)
    m = fake_manager(cfg, agent.port)
    app = create_app(cfg, manager=m)
    sampler = app.state.sampler
    sampler.interval_s, sampler.max_per_s = 1e-9, 1e6  # every run_once samples every running sandbox
    await m.start()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver",
                                 headers={"X-API-Key": KEY}) as c:
        c.manager, c.sampler = m, sampler  # type: ignore[attr-defined]
        yield c
    await sampler.stop()
    await m.close()


async def create(c: httpx.AsyncClient) -> str:
    r = await c.post("/sandboxes", json={"templateID": "tpl"})
    assert r.status_code == 201, r.text
    return r.json()["sandboxID"]


async def test_a_new_sandbox_gets_a_sample_when_first_asked_in_e2b_shape(api) -> None:
    sid = await create(api)
    r = await api.get(f"/sandboxes/{sid}/metrics")
    assert r.status_code == 200, r.text
    [m] = r.json()
    assert set(m) == E2B_FIELDS
    assert m["cpuCount"] == 2  # the template's vCPUs, not what the guest says (64)
    assert (m["memTotal"], m["memUsed"], m["memCache"], m["diskTotal"], m["diskUsed"]) == (
        256 << 20, 50 << 20, 5 << 20, 1 << 30, 200 << 20)
    assert m["cpuUsedPct"] == 7.0  # a first sample: the agent's own figure
    when = dt.datetime.fromisoformat(m["timestamp"].replace("Z", "+00:00"))
    assert int(when.timestamp()) == m["timestampUnix"]
    assert abs(m["timestampUnix"] - dt.datetime.now(dt.UTC).timestamp()) < 3600


async def test_samples_accumulate_oldest_first_with_cpu_between_samples(api, agent) -> None:
    sid = await create(api)
    agent.answers.set(figures(1000, 900), figures(2000, 1500), figures(2500, 2000))
    for _ in range(3):
        await api.sampler.run_once()
    got = (await api.get(f"/sandboxes/{sid}/metrics")).json()
    assert [m["cpuUsedPct"] for m in got] == [7.0, 40.0, 0.0]
    assert [m["timestampUnix"] for m in got] == sorted(m["timestampUnix"] for m in got)


async def test_start_and_end_select_by_unix_seconds(api) -> None:
    sid = await create(api)
    await api.sampler.run_once()
    all_ = (await api.get(f"/sandboxes/{sid}/metrics")).json()
    t = all_[0]["timestampUnix"]
    assert (await api.get(f"/sandboxes/{sid}/metrics", params={"start": t, "end": t})).json()[0] == all_[0]
    assert (await api.get(f"/sandboxes/{sid}/metrics", params={"start": t + 3600})).json() == []
    assert (await api.get(f"/sandboxes/{sid}/metrics", params={"end": t - 1})).json() == []
    assert (await api.get(f"/sandboxes/{sid}/metrics", params={"start": t + 1, "end": t})).json() == []
    for bad in ({"start": -1}, {"end": "yesterday"}):
        r = await api.get(f"/sandboxes/{sid}/metrics", params=bad)
        assert r.status_code == 400 and next(iter(bad)) in r.json()["message"]


async def test_unknown_and_ended_sandboxes_are_404(api) -> None:
    r = await api.get("/sandboxes/nosuchsandbox/metrics")
    assert r.status_code == 404 and "nosuchsandbox" in r.json()["message"]
    sid = await create(api)
    await api.get(f"/sandboxes/{sid}/metrics")
    assert (await api.delete(f"/sandboxes/{sid}")).status_code == 204
    r = await api.get(f"/sandboxes/{sid}/metrics")
    assert r.status_code == 404 and "killed" in r.json()["message"]
    await api.sampler.run_once()
    assert api.sampler.samples(sid) == []  # its ring is gone with it


async def test_a_paused_sandbox_is_not_sampled_and_keeps_its_history(api, agent) -> None:
    sid = await create(api)
    await api.sampler.run_once()
    assert (await api.post(f"/sandboxes/{sid}/pause")).status_code == 204
    calls = agent.answers.calls
    await api.sampler.run_once()
    got = (await api.get(f"/sandboxes/{sid}/metrics")).json()
    assert len(got) == 1 and agent.answers.calls == calls
    assert (await api.post(f"/sandboxes/{sid}/resume")).status_code == 201
    await api.sampler.run_once()
    assert len((await api.get(f"/sandboxes/{sid}/metrics")).json()) == 2


async def test_a_paused_sandbox_never_sampled_has_no_metrics_yet(api, agent) -> None:
    sid = await create(api)
    assert (await api.post(f"/sandboxes/{sid}/pause")).status_code == 204
    calls = agent.answers.calls
    assert (await api.get(f"/sandboxes/{sid}/metrics")).json() == [] and agent.answers.calls == calls


async def test_latest_sample_of_many_sandboxes(api, agent) -> None:
    a, b, c = await create(api), await create(api), await create(api)
    agent.answers.set(figures(mem_used=1 << 20), figures(mem_used=2 << 20), figures(mem_used=3 << 20))
    await api.sampler.run_once()  # a, b and c, in that order
    agent.answers.set(figures(mem_used=9 << 20))
    await api.get(f"/sandboxes/{a}/metrics")  # a has a sample: none taken on demand
    r = await api.get("/sandboxes/metrics", params={"sandbox_ids": f"{a},{b},nosuchsandbox,{a}"})
    assert r.status_code == 200, r.text
    got = r.json()["sandboxes"]
    assert set(got) == {a, b} and set(got[a]) == E2B_FIELDS
    assert {got[a]["memUsed"], got[b]["memUsed"]} == {1 << 20, 2 << 20}
    await api.delete(f"/sandboxes/{c}")
    assert (await api.get("/sandboxes/metrics", params={"sandbox_ids": c})).json() == {"sandboxes": {}}


@pytest.mark.parametrize("query, words", [
    ({}, "sandbox_ids"), ({"sandbox_ids": ",".join(f"s{i}" for i in range(101))}, "at most 100"),
    ({"sandbox_ids": "a,B/../x"}, "sandbox_ids"),
])
async def test_bad_metrics_lists_are_400_naming_sandbox_ids(api, query, words) -> None:
    r = await api.get("/sandboxes/metrics", params=query)
    assert r.status_code == 400 and words in r.json()["message"], r.text


async def test_no_ids_is_an_empty_map(api) -> None:
    for ids in ("", " , "):
        assert (await api.get("/sandboxes/metrics", params={"sandbox_ids": ids})).json() == {"sandboxes": {}}


@pytest.mark.parametrize("method", ["DELETE", "POST", "PUT", "OPTIONS"])
async def test_other_methods_on_the_metrics_list_are_405_not_a_sandbox_named_metrics(api, method) -> None:
    r = await api.request(method, "/sandboxes/metrics")
    assert r.status_code == 405 and r.headers["allow"] == "GET", (r.status_code, r.headers)


async def test_metrics_need_the_api_key(api) -> None:
    sid = await create(api)
    for path in (f"/sandboxes/{sid}/metrics", f"/sandboxes/metrics?sandbox_ids={sid}"):
        r = await api.get(path, headers={"X-API-Key": "wrong"})
        assert r.status_code == 401, r.text


@pytest.mark.parametrize("answer", [
    b"[" * 200_000,  # larger than the client reads
    b"not json",
    {"mem_used": -5, "mem_total": 1},
    ["a", "list"],
], ids=["huge", "not-json", "negative", "a-list"])
async def test_a_guest_answering_garbage_gets_no_sample_and_harms_nothing(api, agent, answer) -> None:
    sid = await create(api)
    agent.answers.set(answer)
    r = await api.get(f"/sandboxes/{sid}/metrics")
    assert r.status_code == 200 and r.json() == []
    assert api.sampler.failures >= 1
    agent.answers.set(figures())
    assert (await api.get(f"/sandboxes/{sid}/metrics")).json() != []  # the next good answer counts


def test_unmodified_e2b_get_metrics(tmp_path: Path, agent, monkeypatch) -> None:
    e2b = pytest.importorskip("e2b")
    agent.answers.set(figures())
    make_template(tmp_path, "tpl", vcpu=2)
    cfg = make_config(tmp_path, api_key=KEY)
    m = fake_manager(cfg, agent.port)
    with ThreadedServer(create_app(cfg, manager=m), lifespan="on") as srv:
        url = f"http://127.0.0.1:{srv.port}"
        for k, v in (("E2B_API_URL", url), ("E2B_SANDBOX_URL", url), ("E2B_API_KEY", KEY)):
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("E2B_DEBUG", raising=False)
        sbx = e2b.Sandbox.create("tpl", timeout=60)
        try:
            [first] = sbx.get_metrics()
            assert first.cpu_count == 2 and first.mem_total == 256 << 20 and first.disk_used == 200 << 20
            assert first.mem_cache == 5 << 20 and first.timestamp.tzinfo is not None
            by_id = e2b.Sandbox.get_metrics(sbx.sandbox_id)
            assert by_id and by_id[0] == first
            later = sbx.get_metrics(start=first.timestamp + dt.timedelta(hours=1))
            assert later == []
        finally:
            sbx.kill()
        with pytest.raises(e2b.exceptions.NotFoundException):
            e2b.Sandbox.get_metrics(sbx.sandbox_id)


@pytest.fixture
def served(tmp_path: Path, agent):
    """The app served over TCP with its lifespan (the sampler running), for the SDKs and the CLI."""
    agent.answers.set(figures())
    make_template(tmp_path, "tpl", vcpu=2)
    cfg = make_config(tmp_path, api_key=KEY)
    m = fake_manager(cfg, agent.port)
    with ThreadedServer(create_app(cfg, manager=m), lifespan="on") as srv:
        srv.url = f"http://127.0.0.1:{srv.port}"  # type: ignore[attr-defined]
        yield srv


async def test_sandbox_sdk_get_metrics_on_the_instance_and_by_id(served) -> None:
    from sandbox_sdk.e2b import AsyncSandbox, SandboxMetrics

    conn = {"api_url": served.url, "api_key": KEY}
    sbx = await AsyncSandbox.create("tpl", timeout=60, **conn)
    try:
        [m] = await sbx.get_metrics()
        assert isinstance(m, SandboxMetrics) and m.cpu_count == 2 and m.mem_used == 50 << 20
        assert m.timestamp is not None and m.timestamp.tzinfo is not None
        assert await AsyncSandbox.get_metrics(sbx.sandbox_id, **conn) == [m]
        assert await sbx.get_metrics(start=m.timestamp + dt.timedelta(hours=1)) == []
        assert await sbx.get_metrics(end=m.timestamp - dt.timedelta(hours=1)) == []
    finally:
        await sbx.kill()
    from sandbox_sdk import exceptions

    with pytest.raises(exceptions.SandboxNotFoundError):
        await AsyncSandbox.get_metrics(sbx.sandbox_id, **conn)


def test_sync_sandbox_sdk_get_metrics(served) -> None:
    from sandbox_sdk.e2b import Sandbox

    sbx = Sandbox.create("tpl", timeout=60, api_url=served.url, api_key=KEY)
    try:
        [m] = sbx.get_metrics()
        assert m.disk_total == 1 << 30 and Sandbox.get_metrics(sbx.sandbox_id, api_url=served.url, api_key=KEY) == [m]
    finally:
        sbx.kill()


def test_cli_sandbox_metrics(served) -> None:
    import json

    from typer.testing import CliRunner

    from trenvx.cli import sandbox_cli

    def cli(*args: str) -> tuple[int, str]:
        sandbox_cli._target = sandbox_cli.Target()  # the CLI keeps its options in a module global
        r = CliRunner().invoke(sandbox_cli.app, ["-p", str(served.port), "-i", "127.0.0.1", "--api-key", KEY, *args])
        return r.exit_code, r.output

    sid = httpx.post(f"{served.url}/sandboxes", json={"templateID": "tpl"}, headers={"X-API-Key": KEY}).json()["sandboxID"]
    code, out = cli("sandbox", "metrics", sid)
    assert code == 0, out
    for words in ("CPU", "MEMORY", "7.0% of 2", "50.0 MiB / 256.0 MiB", "200.0 MiB / 1024.0 MiB"):
        assert words in out, (words, out)
    code, out = cli("--json", "sandbox", "metrics", sid, "--since", "3600")
    assert code == 0 and set(json.loads(out)[0]) == E2B_FIELDS, out
    code, out = cli("sandbox", "metrics", "nosuchsandbox")
    assert code == 1 and "nosuchsandbox" in out and "404" in out, out
