"""``claude-coder`` (issue 16 item 2): its arguments, the environment and Claude Code files it puts in
the sandbox, the URL it prints and when it kills the sandbox, with a fake SDK class; and once with the
real SDK against the real server and proxy (fake VMs): the printed URL opens the IDE stand-in."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from sandbox_sdk import claude_coder as cc
from sandbox_sdk.exceptions import NotFoundError, SandboxError, SandboxNotFoundError, TemplateNotFoundError

KEY = "sk-ant-api03-0123456789abcdefghijklmnopqrstuvwxyz"


# -- arguments ---------------------------------------------------------------------------------


def test_arguments_and_their_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_BACKEND_ADDR", "10.0.0.5:3000")
    monkeypatch.delenv("TRENVX_API_URL", raising=False)
    o = cc.parse_args(["--api-key", KEY])
    assert o == cc.Options(api_key=KEY, kimi=False, template="claude-code", timeout=3600, kill=False, port=8080,
                           url_form="auto", api_url="http://10.0.0.5:3000")
    o = cc.parse_args(["--kimi", "--api-key", KEY, "--template", "cc2", "--timeout", "60", "--kill", "--port", "9000",
                       "--url-form", "path", "--backend", "https://sbx.example.org"])
    assert (o.kimi, o.template, o.timeout, o.kill, o.port, o.url_form, o.api_url) == \
        (True, "cc2", 60, True, 9000, "path", "https://sbx.example.org")
    monkeypatch.delenv("SANDBOX_BACKEND_ADDR")
    monkeypatch.delenv("SANDBOX_BACKEND_PORT", raising=False)
    assert cc.parse_args(["--api-key", KEY]).api_url == "http://127.0.0.1:5000"


@pytest.mark.parametrize("argv, says", [
    (["--api-key", "  "], "--api-key is empty"),
    (["--api-key", "a b"], "whitespace"),
    (["--api-key", KEY, "--timeout", "0"], "--timeout 0"),
    (["--api-key", KEY, "--port", "70000"], "--port 70000"),
    (["--api-key", KEY, "--template", " "], "--template is empty"),
    (["--api-key", KEY, "--backend", "host:port"], "--backend"),
])
def test_bad_arguments_are_named(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(cc.UsageError, match=says.replace("-", r"\-")):
        cc.parse_args(argv)
    assert cc.main(argv) == 2
    assert says in capsys.readouterr().err


def test_the_api_key_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        cc.parse_args([])
    assert ei.value.code == 2 and "--api-key" in capsys.readouterr().err


# -- what goes into the sandbox ----------------------------------------------------------------


def test_the_environment_for_anthropic_and_for_kimi() -> None:
    assert cc.claude_env(KEY, kimi=False) == {"ANTHROPIC_API_KEY": KEY}
    kimi = cc.claude_env(KEY, kimi=True)
    assert kimi == {
        "ANTHROPIC_API_KEY": KEY,
        "ANTHROPIC_BASE_URL": "https://api.moonshot.ai/anthropic",
        "ANTHROPIC_MODEL": "kimi-k2-0711-preview",
        "ANTHROPIC_SMALL_FAST_MODEL": "kimi-k2-0711-preview",
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": "kimi-k2-0711-preview",
        "ANTHROPIC_DEFAULT_SONNET_MODEL": "kimi-k2-0711-preview",
        "ANTHROPIC_DEFAULT_OPUS_MODEL": "kimi-k2-0711-preview",
    }


def test_claude_json_answers_the_first_run_questions_and_keeps_the_rest() -> None:
    fresh = cc.claude_json({}, KEY)
    assert fresh == {
        "hasCompletedOnboarding": True,
        "customApiKeyResponses": {"approved": [KEY[-20:]], "rejected": []},
        "projects": {"/home/user/workspace": {"hasTrustDialogAccepted": True, "hasCompletedProjectOnboarding": True}},
    }
    existing = {"userID": "u1", "hasCompletedOnboarding": False, "numStartups": 3,
                "customApiKeyResponses": {"approved": ["older-key-suffix-xxxx", KEY[-20:]], "rejected": [KEY[-20:]]},
                "projects": {"/home/user/workspace": {"allowedTools": ["Bash"]}, "/tmp": {"x": 1}}}
    merged = cc.claude_json(existing, KEY)
    assert merged["userID"] == "u1" and merged["numStartups"] == 3 and merged["hasCompletedOnboarding"] is True
    assert merged["customApiKeyResponses"] == {"approved": ["older-key-suffix-xxxx", KEY[-20:]], "rejected": []}
    assert merged["projects"]["/home/user/workspace"] == {
        "allowedTools": ["Bash"], "hasTrustDialogAccepted": True, "hasCompletedProjectOnboarding": True}
    assert merged["projects"]["/tmp"] == {"x": 1}
    assert existing["hasCompletedOnboarding"] is False  # not changed in place


def test_settings_json_carries_the_environment() -> None:
    env = cc.claude_env(KEY, kimi=True)
    assert cc.claude_settings({}, env) == {"env": env}
    merged = cc.claude_settings({"theme": "dark", "env": {"FOO": "1", "ANTHROPIC_MODEL": "old"}}, env)
    assert merged["theme"] == "dark" and merged["env"] == {"FOO": "1", **env}


# -- the URL -----------------------------------------------------------------------------------


@pytest.mark.parametrize("api_url, domain, form, expected", [
    # a real domain (wildcard DNS): the host form, with the backend's scheme
    ("http://10.0.0.5:3000", "sbx.example.org", "auto", "http://8080-sid.sbx.example.org/?Q"),
    ("https://api.example.org", "sbx.example.org:8443", "auto", "https://8080-sid.sbx.example.org:8443/?Q"),
    # localhost announced, backend on loopback: browsers on this machine resolve *.localhost
    ("http://127.0.0.1:3000", "localhost:3000", "auto", "http://8080-sid.localhost:3000/?Q"),
    # localhost announced but the backend is reached from elsewhere: the path form, on the backend's address
    ("http://10.0.0.5:3000", "localhost:3000", "auto", "http://10.0.0.5:3000/sandboxes/sid/ports/8080/?Q"),
    ("http://[fd00::5]:3000", "localhost:3000", "auto", "http://[fd00::5]:3000/sandboxes/sid/ports/8080/?Q"),
    ("http://10.0.0.5:3000", "", "auto", "http://10.0.0.5:3000/sandboxes/sid/ports/8080/?Q"),
    # forced
    ("http://127.0.0.1:3000", "localhost:3000", "path", "http://127.0.0.1:3000/sandboxes/sid/ports/8080/?Q"),
    ("http://10.0.0.5:3000", "localhost:3000", "host", "http://8080-sid.localhost:3000/?Q"),
])
def test_the_ide_url(api_url: str, domain: str, form: str, expected: str) -> None:
    q = "folder=/home/user/workspace&trenvx_token=t%2Bk%2Fn%3D"
    assert cc.ide_url(api_url, "sid", domain, 8080, "t+k/n=", form=form) == expected.replace("Q", q)


def test_the_url_parameter_is_the_proxys() -> None:
    """The SDK cannot import the server; the name it puts in the URL must be the one the proxy takes."""
    from trenvx.server.traffic_auth import TOKEN_PARAM

    assert cc.TOKEN_PARAM == TOKEN_PARAM


# -- running it with a fake SDK ----------------------------------------------------------------


class FakeFiles:
    def __init__(self, files: dict[str, str]) -> None:
        self.files = files
        self.writes: list[tuple[str, str, str | None]] = []
        self.fail: Exception | None = None

    def read(self, path: str, user: str | None = None) -> str:
        if path not in self.files:
            raise NotFoundError(f"path '{path}' does not exist")
        return self.files[path]

    def write(self, path: str, data: str, user: str | None = None) -> None:
        if self.fail is not None:
            raise self.fail
        self.writes.append((path, data, user))
        self.files[path] = data


class FakeCommands:
    def __init__(self) -> None:
        self.runs: list[tuple[str, str | None]] = []

    def run(self, cmd: str, user: str | None = None) -> None:
        self.runs.append((cmd, user))


class FakeInfo:
    end_at = None


class FakeSandbox:
    """Stands for ``sandbox_sdk.e2b.Sandbox``: records what claude-coder asks of it."""

    created: list["FakeSandbox"] = []
    token: str | None = "traffic+tok/en="
    create_error: Exception | None = None
    existing_files: dict[str, str] = {}
    write_error: Exception | None = None
    ends_after_polls: int | None = None

    def __init__(self, template: str, kwargs: dict[str, Any]) -> None:
        self.template, self.kwargs = template, kwargs
        self.sandbox_id = "isbx0123456789abcdef"
        self.sandbox_domain = "localhost:3000"
        self.traffic_access_token = type(self).token
        self.files = FakeFiles(dict(type(self).existing_files))
        self.files.fail = type(self).write_error
        self.commands = FakeCommands()
        self.killed = 0
        self.info_calls = 0
        self.closed = False

    @classmethod
    def create(cls, template: str, **kwargs: Any) -> "FakeSandbox":
        if cls.create_error is not None:
            raise cls.create_error
        sb = cls(template, kwargs)
        cls.created.append(sb)
        return sb

    def get_info(self) -> FakeInfo:
        self.info_calls += 1
        if self.ends_after_polls is not None and self.info_calls > self.ends_after_polls:
            raise SandboxNotFoundError("sandbox not found")
        return FakeInfo()

    def kill(self) -> bool:
        self.killed += 1
        return True

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake() -> Iterator[type[FakeSandbox]]:
    cls = type("Fake", (FakeSandbox,), {"created": []})
    yield cls


def go(cls: type[FakeSandbox], *argv: str, sleep: Any = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    opts = cc.parse_args(["--api-key", KEY, "--backend", "127.0.0.1:3000", *argv])

    def no_sleep(s: float) -> None:
        raise AssertionError("claude-coder waited without --kill")

    code = cc.run(opts, sandbox_class=cls, out=out, err=err, sleep=sleep or no_sleep)
    return code, out.getvalue(), err.getvalue()


def test_without_kill_it_prints_the_url_and_leaves_the_sandbox_running(fake: type[FakeSandbox]) -> None:
    code, out, err = go(fake, "--kimi")
    assert code == 0
    [sb] = fake.created
    assert sb.template == "claude-code"
    assert sb.kwargs["timeout"] == 3600 and sb.kwargs["api_url"] == "http://127.0.0.1:3000"
    assert sb.kwargs["network"] == {"allow_public_traffic": False}  # private: nobody guessing the id gets in
    assert sb.kwargs["envs"] == cc.claude_env(KEY, kimi=True)
    # Claude Code's files, for user "user", readable by that user alone
    written = {path: (json.loads(data), user) for path, data, user in sb.files.writes}
    assert written["/home/user/.claude.json"] == (cc.claude_json({}, KEY), "user")
    assert written["/home/user/.claude/settings.json"] == ({"env": cc.claude_env(KEY, kimi=True)}, "user")
    assert sb.commands.runs == [("chmod 600 /home/user/.claude.json /home/user/.claude/settings.json", "user")]
    # stdout: the URL alone
    assert out == ("http://8080-isbx0123456789abcdef.localhost:3000/?folder=/home/user/workspace"
                   "&trenvx_token=traffic%2Btok%2Fen%3D\n")
    assert "keeps running until its timeout" in err and "sandbox-cli sandbox kill isbx0123456789abcdef" in err
    assert KEY not in err and KEY not in out
    assert sb.killed == 0 and sb.closed


def test_existing_claude_files_are_merged(fake: type[FakeSandbox]) -> None:
    fake.existing_files = {"/home/user/.claude.json": json.dumps({"userID": "abc", "installMethod": "global"}),
                           "/home/user/.claude/settings.json": "not json"}
    assert go(fake)[0] == 0
    [sb] = fake.created
    cj = json.loads(sb.files.files["/home/user/.claude.json"])
    assert cj["userID"] == "abc" and cj["installMethod"] == "global" and cj["hasCompletedOnboarding"] is True
    assert json.loads(sb.files.files["/home/user/.claude/settings.json"]) == {"env": {"ANTHROPIC_API_KEY": KEY}}


def test_with_kill_ctrl_c_kills_the_sandbox(fake: type[FakeSandbox]) -> None:
    polls = []

    def sleep(s: float) -> None:
        polls.append(s)
        if len(polls) == 3:
            raise KeyboardInterrupt

    code, out, err = go(fake, "--kill", sleep=sleep)
    [sb] = fake.created
    assert code == 0 and sb.killed == 1 and out.startswith("http://")
    assert "Press Ctrl-C" in err and "killed" in err and len(polls) == 3


def test_with_kill_a_sandbox_that_ends_by_itself_ends_the_command(fake: type[FakeSandbox]) -> None:
    fake.ends_after_polls = 3  # one get_info for the end time, then two polls that find it
    code, _, err = go(fake, "--kill", sleep=lambda s: None)
    [sb] = fake.created
    assert code == 0 and sb.killed == 0 and "has ended" in err


def test_ctrl_c_during_the_setup_kills_the_sandbox(fake: type[FakeSandbox]) -> None:
    fake.write_error = KeyboardInterrupt()
    code, out, _ = go(fake)
    [sb] = fake.created
    assert code == 130 and sb.killed == 1 and out == ""


def test_failures_end_the_sandbox_and_say_why(fake: type[FakeSandbox]) -> None:
    fake.write_error = SandboxError("invalid user 'user': no such user in the sandbox")
    code, out, err = go(fake, "--template", "base")
    [sb] = fake.created
    assert code == 1 and out == "" and sb.killed == 1
    assert "could not set up Claude Code for user 'user'" in err and "no such user" in err and "'base'" in err

    public = type("Public", (FakeSandbox,), {"created": [], "token": None})
    code, out, err = go(public)
    assert code == 1 and out == "" and public.created[0].killed == 1 and "did not make sandbox" in err

    missing = type("Missing", (FakeSandbox,), {"created": [], "create_error": TemplateNotFoundError(
        "template 'claude-code' is not built")})
    code, out, err = go(missing)
    assert code == 1 and out == "" and "could not create a sandbox of template 'claude-code'" in err
    assert "is not built" in err


# -- packaging -----------------------------------------------------------------------------------


def test_it_is_a_console_script_of_the_distribution() -> None:
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["claude-coder"] == "sandbox_sdk.claude_coder:main"


def test_the_sdk_command_imports_nothing_of_trenvx() -> None:
    code = ("import sys, sandbox_sdk.claude_coder, sandbox_sdk.e2b; "
            "bad = sorted(m for m in sys.modules if m == 'trenvx' or m.startswith('trenvx.')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    help_text = subprocess.run([sys.executable, "-m", "sandbox_sdk.claude_coder", "--help"], capture_output=True,
                               text=True, timeout=60)
    assert help_text.returncode == 0 and "--kimi" in help_text.stdout and "SANDBOX_BACKEND_ADDR" in help_text.stdout


# -- the real SDK, server and proxy (fake VMs) -----------------------------------------------------


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from trenvx.server.app import create_app

    from .ide_upstream import ide_upstream_app
    from .server_fakes import ThreadedServer, UpstreamState, fake_manager, make_config, make_template, upstream_app

    root = tmp_path_factory.mktemp("coder")
    with ThreadedServer(upstream_app(UpstreamState())) as agent, ThreadedServer(ide_upstream_app()) as ide:
        make_template(root, "claude-code")
        cfg = make_config(root)  # the default domain: localhost, announced with the API's port
        m = fake_manager(cfg, agent.port, forwards={8080: ide.port}, network=True)
        with ThreadedServer(create_app(cfg, manager=m), lifespan="on") as s:
            s.manager = m  # type: ignore[attr-defined]
            yield s


def real_sdk_class() -> type:
    """The SDK's own Sandbox class; only the guest's files and commands are stand-ins (the fake VMs'
    agent is no envd)."""
    from sandbox_sdk.e2b import Sandbox

    class Real(Sandbox):  # type: ignore[misc]
        @classmethod
        def create(cls, *a: Any, **kw: Any) -> Any:
            sb = super().create(*a, **kw)
            sb.files, sb.commands = FakeFiles({}), FakeCommands()
            return sb

    return Real


@pytest.mark.parametrize("form", ["host", "path"])
def test_the_printed_url_opens_the_ide_through_the_proxy(backend: Any, form: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    opts = cc.parse_args(["--api-key", KEY, "--backend", f"127.0.0.1:{backend.port}", "--url-form", form])
    assert cc.run(opts, sandbox_class=real_sdk_class(), out=out, err=err) == 0, err.getvalue()
    url = out.getvalue().strip()
    parts = urlsplit(url)
    token = parse_qs(parts.query)["trenvx_token"][0]
    sid = next(sb.id for sb in backend.manager.list() if sb.traffic_access_token == token)
    sb = backend.manager.get(sid)
    assert sb.allow_public_traffic is False and sb.env_vars["ANTHROPIC_API_KEY"] == KEY
    if form == "host":
        assert parts.netloc == f"8080-{sid}.localhost:{backend.port}"
    else:
        assert parts.netloc == f"127.0.0.1:{backend.port}" and parts.path == f"/sandboxes/{sid}/ports/8080/"
    # a browser: *.localhost is loopback, so it connects to the backend with the URL's Host
    with httpx.Client(base_url=f"http://127.0.0.1:{backend.port}", headers={"Host": parts.netloc}) as browser:
        first = browser.get(f"{parts.path}?{parts.query}")
        assert first.status_code == 303 and first.headers["location"] == f"{parts.path}?folder=/home/user/workspace"
        page = browser.get(first.headers["location"])  # the client keeps the cookie, as a browser does
        assert page.status_code == 200 and page.json()["query"] == "folder=/home/user/workspace"
        assert page.json()["path"] == "/"
    # nobody who only knows the id gets in
    guess = httpx.get(f"http://127.0.0.1:{backend.port}{parts.path}", headers={"Host": parts.netloc})
    assert guess.status_code == 403
    assert httpx.delete(f"http://127.0.0.1:{backend.port}/sandboxes/{sid}").status_code == 204
