"""Issue 13, items 1 and 9, against the real server app (fake VMs): a create without a template
gets the server's default, through HTTP and through every SDK surface (sandbox_sdk's TrEnv-X,
E2B-style async and sync ones, and E2B's own unmodified ``e2b``); and E2B's ``Sandbox.list()``
paginator walks GET /v2/sandboxes newest first through its opaque cursor, with time filters."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from sandbox_sdk.e2b import AsyncSandbox, Sandbox
from sandbox_sdk.sandbox import Sandbox as TrenvxSandbox
from trenvx.server.app import create_app

from .server_fakes import ThreadedServer, UpstreamState, fake_manager, make_config, make_template, upstream_app

KEY = "defaults-key"


@pytest.fixture(scope="module")
def upstream():
    with ThreadedServer(upstream_app(UpstreamState())) as s:
        yield s


@pytest.fixture
def server(tmp_path: Path, upstream):
    make_template(tmp_path, "tpl")
    make_template(tmp_path, "other")
    cfg = make_config(tmp_path, api_key=KEY)  # the default template is "tpl"
    m = fake_manager(cfg, upstream.port)
    with ThreadedServer(create_app(cfg, manager=m), lifespan="on") as srv:
        yield f"http://127.0.0.1:{srv.port}", m


async def test_sdk_create_without_template_gets_the_default(server) -> None:
    url, m = server
    c = {"api_url": url, "api_key": KEY}
    a = await AsyncSandbox.create(**c)
    assert a.template_id == "tpl" and m.get(a.sandbox_id).template == "tpl"
    t = await TrenvxSandbox.create(**c)
    assert t.template_id == "tpl" and m.get(t.id).template == "tpl"
    o = await AsyncSandbox.create("other", **c)  # a named template still wins
    assert o.template_id == "other"
    for s in (a, o):
        await s.kill()
    await t.close()


def test_sync_sdk_create_without_template_gets_the_default(server) -> None:
    url, m = server
    s = Sandbox.create(api_url=url, api_key=KEY)
    try:
        assert s.template_id == "tpl" and m.get(s.sandbox_id).template == "tpl"
    finally:
        s.kill()


def test_unmodified_e2b_create_default_and_list_paginator(server, monkeypatch) -> None:
    e2b = pytest.importorskip("e2b")
    url, m = server
    for k, v in (("E2B_API_URL", url), ("E2B_SANDBOX_URL", url), ("E2B_API_KEY", KEY)):
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    first = e2b.Sandbox.create(timeout=60)  # no template: e2b sends its default alias "base"
    assert first.get_info().template_id == "tpl"
    made = [first.sandbox_id] + [e2b.Sandbox.create(timeout=60).sandbox_id for _ in range(3)]
    try:
        pager = e2b.Sandbox.list(limit=2)
        seen: list[str] = []
        while pager.has_next:
            seen += [s.sandbox_id for s in pager.next_items()]
            if len(seen) == 2:  # created between pages: newer than the cursor, so not seen again
                made.append(e2b.Sandbox.create(timeout=60).sandbox_id)
        assert seen == made[3::-1]  # newest first, each once
        asc = e2b.Sandbox.list(order="asc", limit=100).next_items()
        assert [s.sandbox_id for s in asc] == made
        second = m.get(made[1]).created_at
        after = dt.datetime.fromtimestamp(second, dt.UTC)
        q = e2b.SandboxQuery(started_after=after)
        assert [s.sandbox_id for s in e2b.Sandbox.list(query=q).next_items()] == made[:0:-1]
    finally:
        for sid in made:
            e2b.Sandbox.kill(sid)
