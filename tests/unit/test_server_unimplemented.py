"""E2B create options trenvx does not implement are refused with a 400 naming them (issue 13,
item 13), through the real app over fake VMs: every entry of UNIMPLEMENTED_OPTIONS, on both
create paths; the values that change nothing (E2B's defaults, what its SDKs send) still create;
unknown fields are ignored; and E2B's unmodified SDK carries the message to its caller."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from trenvx.server.app import create_app
from trenvx.server.unimplemented import UNIMPLEMENTED_OPTIONS, UnimplementedOption

from .server_fakes import ThreadedServer, UpstreamState, fake_api, fake_manager, make_config, make_template, upstream_app

KEY = "options-key"


@pytest.fixture(scope="module")
def upstream():
    with ThreadedServer(upstream_app(UpstreamState())) as s:
        yield s


@pytest.fixture
async def api(tmp_path: Path, upstream):
    async with fake_api(tmp_path, upstream.port) as c:
        yield c


def body_with(path: str, value: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"templateID": "tpl"}
    where = body
    *parents, last = path.split(".")
    for part in parents:
        where = where.setdefault(part, {})
    where[last] = value
    return body


@pytest.mark.parametrize("opt", UNIMPLEMENTED_OPTIONS, ids=[o.path for o in UNIMPLEMENTED_OPTIONS])
@pytest.mark.parametrize("route", ["/sandboxes", "/v2/sandboxes"])
async def test_each_unimplemented_option_is_a_400_naming_it(api, opt: UnimplementedOption, route: str) -> None:
    assert opt.asks(opt.example), f"the example of {opt.path} must ask for it"
    r = await api.post(route, json=body_with(opt.path, opt.example))
    assert r.status_code == 400, r.text
    message = r.json()["message"]
    assert message == opt.message() and message.startswith(f"body field {opt.path}: ")
    assert "not implemented in trenvx yet" in message or "not supported by trenvx" in message
    assert api.manager.list() == []  # refused before any work


# What E2B's SDKs send by default, and the empty forms: none asks for anything trenvx lacks.
ACCEPTED: list[dict[str, Any]] = [
    {},
    # e2b 2.63's v1 NewSandbox model with its defaults (older SDKs send these on POST /sandboxes)
    {"timeout": 15, "autoPause": False, "autoPauseMemory": True},
    # e2b 2.63's lifecycle={"on_timeout": "kill"} and {"on_timeout": "pause", "auto_resume": True} (issue 14)
    {"autoPause": False}, {"autoPause": True, "autoResume": {"enabled": True}},
    {"autoPause": True, "autoPauseMemory": False},
    # e2b 2.63's Sandbox.create() with defaults on POST /v2/sandboxes
    {"metadata": {}, "envVars": {}},
    {"secure": True}, {"secure": False}, {"autoPauseMemory": False},
    {"autoResume": {"enabled": False}}, {"autoPause": None, "autoResume": None},
    {"mcp": None}, {"mcp": {}},
    {"iam": None}, {"iam": {}}, {"iam": {"tokens": {}}}, {"iam": {"tokens": None}},
    {"volumeMounts": []}, {"volumeMounts": None},
    {"network": {"rules": {}, "egressProxy": None, "httpsPorts": []}},
    {"someFieldE2bAddsLater": {"x": 1}},
]


@pytest.mark.parametrize("extra", ACCEPTED, ids=[str(sorted(b)) or "empty" for b in ACCEPTED])
async def test_defaults_and_empty_forms_still_create(api, extra: dict[str, Any]) -> None:
    r = await api.post("/v2/sandboxes", json={"templateID": "tpl", **extra})
    assert r.status_code == 201, r.text
    await api.delete(f"/sandboxes/{r.json()['sandboxID']}")


def test_leaving_an_option_out_never_asks_for_it() -> None:
    assert [o.path for o in UNIMPLEMENTED_OPTIONS if o.asks(None)] == []
    assert len({o.path for o in UNIMPLEMENTED_OPTIONS}) == len(UNIMPLEMENTED_OPTIONS)


@pytest.mark.parametrize("field, value", [
    ("autoPause", "true"), ("autoPause", 1), ("autoResume", {"enabled": "yes"}), ("autoResume", {}),
    ("mcp", "github"), ("volumeMounts", {"name": "x"}), ("secure", "yes"), ("iam", []),
])
async def test_wrong_types_are_400_naming_the_field(api, field: str, value: Any) -> None:
    r = await api.post("/sandboxes", json={"templateID": "tpl", field: value})
    assert r.status_code == 400 and f"body field {field}" in r.json()["message"], r.text


async def test_an_unknown_field_is_ignored_and_logged_once(api, caplog) -> None:
    caplog.set_level(logging.INFO, logger="trenvx.server.unimplemented")
    for _ in range(2):
        r = await api.post("/sandboxes", json={"templateID": "tpl", "brandNewE2bOption": True})
        assert r.status_code == 201, r.text
    assert sum("brandNewE2bOption" in rec.getMessage() for rec in caplog.records) == 1


async def test_put_network_refuses_the_networks_unimplemented_fields(api) -> None:
    sid = (await api.post("/sandboxes", json={"templateID": "tpl"})).json()["sandboxID"]
    r = await api.put(f"/sandboxes/{sid}/network", json={"egressProxy": {"address": "p:1080"}})
    assert r.status_code == 400 and r.json()["message"].startswith("body field egressProxy: "), r.text


def test_the_openapi_document_admits_only_the_harmless_values(tmp_path: Path, upstream) -> None:
    make_template(tmp_path, "tpl")
    cfg = make_config(tmp_path)
    schema = create_app(cfg, manager=fake_manager(cfg, upstream.port)).openapi()
    props = schema["components"]["schemas"]["NewSandbox"]["properties"]
    assert {"type": "object", "maxProperties": 0} in props["mcp"]["anyOf"]
    assert {"type": "array", "maxItems": 0, "items": {"type": "object"}} in props["volumeMounts"]["anyOf"]
    for opt in UNIMPLEMENTED_OPTIONS:
        top = opt.path.split(".")[0]
        assert top in props, opt.path


def test_unmodified_e2b_sdk_carries_the_refusal(tmp_path: Path, upstream, monkeypatch) -> None:
    e2b = pytest.importorskip("e2b")
    make_template(tmp_path, "tpl")
    cfg = make_config(tmp_path, api_key=KEY)
    m = fake_manager(cfg, upstream.port)
    with ThreadedServer(create_app(cfg, manager=m), lifespan="on") as srv:
        url = f"http://127.0.0.1:{srv.port}"
        for k, v in (("E2B_API_URL", url), ("E2B_SANDBOX_URL", url), ("E2B_API_KEY", KEY)):
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("E2B_DEBUG", raising=False)
        with pytest.raises(e2b.exceptions.SandboxException, match=r"body field volumeMounts: .*not implemented"):
            e2b.Sandbox.create("tpl", timeout=60, volume_mounts={"/mnt/data": "data"})
        with pytest.raises(e2b.exceptions.SandboxException, match=r"body field mcp: .*not implemented"):
            e2b.Sandbox.create("tpl", timeout=60, mcp={"exa": {"apiKey": "k"}})
        kept = e2b.Sandbox.create("tpl", timeout=60, lifecycle={"on_timeout": "kill"}, secure=True)
        kept.kill()
