"""E2B endpoints trenvx does not serve yet answer 501 naming the endpoint and its plan, not the
router's 404 (which E2B's SDK reports as "sandbox not found"); the API key still comes first;
and E2B's unmodified SDK carries the message to its caller."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from trenvx.server.app import create_app
from trenvx.server.routes_not_implemented import NOT_IMPLEMENTED

from .server_fakes import ThreadedServer, UpstreamState, fake_api, fake_manager, make_config, make_template, upstream_app

KEY = "planned-key"


@pytest.fixture(scope="module")
def upstream():
    with ThreadedServer(upstream_app(UpstreamState())) as s:
        yield s


@pytest.fixture
async def api(tmp_path: Path, upstream):
    async with fake_api(tmp_path, upstream.port, api_key=KEY) as c:
        yield c


def concrete(path: str) -> str:
    return (path.replace("{sandboxID}", "sbx-123").replace("{templateID}", "tpl")
            .replace("{secretID}", "s1").replace("{volumeID}", "v1"))


@pytest.mark.parametrize("endpoint", NOT_IMPLEMENTED, ids=lambda e: f"{e.method} {e.path}")
async def test_every_planned_endpoint_answers_501_naming_it(api: httpx.AsyncClient, endpoint) -> None:
    r = await api.request(endpoint.method, concrete(endpoint.path), headers={"X-API-Key": KEY}, json={})
    assert r.status_code == 501, r.text
    body = r.json()
    assert body["code"] == 501
    assert f"{endpoint.method} {endpoint.path}" in body["message"]
    assert "not implemented in trenvx yet" in body["message"]


@pytest.mark.parametrize("endpoint", NOT_IMPLEMENTED[:3], ids=lambda e: f"{e.method} {e.path}")
async def test_the_api_key_comes_first(api: httpx.AsyncClient, endpoint) -> None:
    r = await api.request(endpoint.method, concrete(endpoint.path), json={})
    assert r.status_code == 401


async def test_served_routes_are_not_shadowed(api: httpx.AsyncClient) -> None:
    """GET /templates/{id} and DELETE /sandboxes/{id} keep their own handlers."""
    h = {"X-API-Key": KEY}
    assert (await api.get("/templates/tpl", headers=h)).status_code == 200
    assert (await api.delete("/sandboxes/nope", headers=h)).status_code == 404


def test_unmodified_e2b_sdk_reports_not_implemented(tmp_path: Path, upstream, monkeypatch) -> None:
    e2b = pytest.importorskip("e2b")
    make_template(tmp_path, "tpl")
    cfg = make_config(tmp_path, api_key=KEY)
    m = fake_manager(cfg, upstream.port)
    with ThreadedServer(create_app(cfg, manager=m), lifespan="on") as srv:
        url = f"http://127.0.0.1:{srv.port}"
        for k, v in (("E2B_API_URL", url), ("E2B_SANDBOX_URL", url), ("E2B_API_KEY", KEY)):
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("E2B_DEBUG", raising=False)
        with pytest.raises(e2b.SecretException, match=r"GET /secrets \(secrets\) is not implemented in trenvx yet"):
            e2b.Secret.list().next_items()
