"""The config schema: defaults, the example config, and errors that name the key, template and file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from trenvx.config import ConfigError, VmmType, load_config

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, dockerfile: bool = True) -> Path:
    if dockerfile:
        (tmp_path / "x.Dockerfile").write_text("FROM debian:bookworm\n")
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_example_config_loads_with_the_shipped_templates() -> None:
    cfg = load_config(REPO / "configs" / "example_config.toml")
    assert {"default-sandbox", "code-interpreter", "claude-code"} <= set(cfg.template)
    t = cfg.get_template("default-sandbox")
    assert t.vmm_type is VmmType.qemu and t.mem_mb >= 64
    assert Path(t.dockerfile).is_file() and Path(t.context).is_dir()
    ci = cfg.get_template("code-interpreter")
    assert ci.code_interpreter and {"code-interpreter-v1", "default-code-interpreter"} <= set(ci.aliases)
    assert cfg.canonical_template("code-interpreter-v1") == "code-interpreter"


def test_example_config_claude_code_template() -> None:
    """TrEnv-X's claude-code template: 2 vCPU, 4 GiB, as `user`, code-server started before the
    snapshot on 0.0.0.0:8080 without a password of its own, and ide-ready from its own build
    context (so that edits elsewhere in configs/ do not rebuild it)."""
    cfg = load_config(REPO / "configs" / "example_config.toml")
    t = cfg.get_template("claude-code")
    assert (t.vcpu, t.mem_mb, t.user) == (2, 4096, "user")
    assert Path(t.dockerfile).name == "claude-code.Dockerfile" and Path(t.dockerfile).is_file()
    assert Path(t.context) == REPO / "configs" / "claude-code"
    cmd = t.start_cmd.cmd
    assert cmd.startswith("exec runuser -u user -- ") and "code-server " in cmd
    for flag in ("--bind-addr 0.0.0.0:8080", "--auth none", "--disable-telemetry", "--disable-update-check"):
        assert flag in cmd
    assert cmd.split(">", 1)[0].rstrip().endswith("/home/user/workspace")
    assert t.ready_cmd == "ide-ready" and t.ready_timeout_s >= 300
    ready = Path(t.context) / "ide-ready"
    assert ready.is_file() and os.access(ready, os.X_OK)
    settings = json.loads((Path(t.context) / "settings.json").read_text())
    assert settings["security.workspace.trust.enabled"] is False
    assert settings["workbench.startupEditor"] == "none"
    dockerfile = Path(t.dockerfile).read_text()
    for pinned in ("CODE_SERVER_VERSION=", "CLAUDE_CODE_VERSION=", "NODE_VERSION=", "NODE_SHA512=", "NPM_SHA512="):
        assert f"ARG {pinned}" in dockerfile


def test_defaults_live_in_the_schema(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[template."a"]\n', dockerfile=False))
    t = cfg.get_template("a")
    assert (t.vcpu, t.mem_mb, t.vmm_type, t.start_cmd.cmd) == (1, 256, VmmType.qemu, "")
    assert cfg.orchestrator.port == 5000 and cfg.default_template == "default-sandbox"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('[template."t1"]\nmemory = 5\n', ['[template."t1"] key memory', "unknown key"]),
        ('[template."t1"]\nmem_mb = 0\n', ['[template."t1"] key mem_mb', "greater than or equal to 64"]),
        ('[template."t1"]\nvmm_type = "xen"\n', ['[template."t1"] key vmm_type', "'xen'"]),
        ('[template."t1"]\ndockerfile = "missing.Dockerfile"\n', ['[template."t1"] key dockerfile', "missing.Dockerfile", "does not exist"]),
        ('[orchestrator]\nport = "x"\n', ["key orchestrator.port"]),
        ('bogus = 1\n', ["key bogus", "unknown key"]),
        ('[template."t1"]\ndockerfile = "x.Dockerfile"\ndocker_img = "debian"\n', ["either docker_img or dockerfile"]),
    ],
)
def test_bad_config_names_key_template_and_file(tmp_path: Path, body: str, expected: list[str]) -> None:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    msg = str(ei.value)
    assert str(path) in msg
    for part in expected:
        assert part in msg


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[template\n"))


def test_unknown_template_lists_known_ones(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[template."a"]\n', dockerfile=False))
    with pytest.raises(ConfigError, match=r"'b' is not defined.*defined: a"):
        cfg.get_template("b")


def test_data_root_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRENVX_DATA_ROOT", str(tmp_path / "dr"))
    cfg = load_config(write(tmp_path, "", dockerfile=False))
    assert cfg.data_root == tmp_path / "dr"
