"""Template aliases: E2B's code-interpreter SDK creates ``code-interpreter-v1`` and TrEnv-X's
``default-code-interpreter``; a configured template answers to its aliases everywhere a template
is named (create, GET /templates/{id}, GET /templates/aliases/{alias}, the list)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from trenvx.config import Config, TemplateConfig
from trenvx.server.app import create_app

from .server_fakes import ThreadedServer, UpstreamState, fake_manager, make_config, make_template, upstream_app


@pytest.fixture(scope="module")
def upstream():
    with ThreadedServer(upstream_app(UpstreamState())) as s:
        yield s


def test_aliases_resolve_and_must_be_unique(tmp_path: Path) -> None:
    cfg = Config(data_root=tmp_path, template={"ci": TemplateConfig(aliases=["code-interpreter-v1", "ci-old"]),
                                                "other": TemplateConfig()})
    assert cfg.canonical_template("code-interpreter-v1") == "ci" and cfg.canonical_template("ci") == "ci"
    assert cfg.canonical_template("unknown") == "unknown"
    with pytest.raises(ValidationError, match="already the name or an alias of template 'other'"):
        Config(data_root=tmp_path, template={"ci": TemplateConfig(aliases=["other"]), "other": TemplateConfig()})
    with pytest.raises(ValidationError, match="already the name or an alias of template 'a'"):
        Config(data_root=tmp_path, template={"a": TemplateConfig(aliases=["x"]), "b": TemplateConfig(aliases=["x"])})
    with pytest.raises(ValidationError, match="is not a template name"):
        Config(data_root=tmp_path, template={"a": TemplateConfig(aliases=["bad/alias"])})


def test_aliases_are_not_an_input_of_the_build(tmp_path: Path) -> None:
    from trenvx.template.builder import TemplateBuilder

    plain = Config(data_root=tmp_path, template={"t": TemplateConfig(docker_img="debian:bookworm")})
    aliased = Config(data_root=tmp_path, template={"t": TemplateConfig(docker_img="debian:bookworm", aliases=["u"])})
    assert (TemplateBuilder(plain).input_digest(plain.get_template("t"))[0]
            == TemplateBuilder(aliased).input_digest(aliased.get_template("t"))[0])


async def test_create_and_lookups_by_alias(tmp_path: Path, upstream) -> None:
    make_template(tmp_path, "tpl")
    base = make_config(tmp_path)
    cfg = base.model_copy(update={"template": {"tpl": TemplateConfig(name="tpl", aliases=["code-interpreter-v1"])}})
    m = fake_manager(cfg, upstream.port)
    await m.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(cfg, manager=m)),
                                     base_url="http://testserver") as c:
            r = await c.post("/sandboxes", json={"templateID": "code-interpreter-v1"})
            assert r.status_code == 201, r.text
            assert r.json()["templateID"] == "tpl" and m.get(r.json()["sandboxID"]).template == "tpl"
            assert (await c.get("/templates/aliases/code-interpreter-v1")).json()["templateID"] == "tpl"
            r = await c.get("/templates/code-interpreter-v1")
            assert r.status_code == 200 and r.json()["templateID"] == "tpl"
            listed = {t["templateID"]: t for t in (await c.get("/templates")).json()}
            assert listed["tpl"]["aliases"] == ["tpl", "code-interpreter-v1"]
            assert (await c.post("/sandboxes", json={"templateID": "nope"})).status_code == 404
    finally:
        await m.close()


async def test_a_server_without_the_templates_table_knows_the_aliases_its_build_recorded(tmp_path: Path,
                                                                                         upstream) -> None:
    """Servers that only serve a data root (no [template] tables) read the aliases from the build."""
    import json

    build = make_template(tmp_path, "ci")
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["config"]["aliases"] = ["code-interpreter-v1"]
    (build / "manifest.json").write_text(json.dumps(manifest))
    make_template(tmp_path, "tpl")
    cfg = make_config(tmp_path)
    assert "ci" not in cfg.template
    m = fake_manager(cfg, upstream.port)
    await m.start()
    try:
        assert m.template_name("code-interpreter-v1") == "ci" and m.template_name("tpl") == "tpl"
        assert m.template_name("nothing") == "nothing"
        sb = await m.create("code-interpreter-v1")
        assert sb.template == "ci"
        await m.kill(sb.id)
    finally:
        await m.close()
