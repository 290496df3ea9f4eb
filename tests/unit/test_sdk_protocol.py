"""sandbox_sdk: the transport-independent pieces (Connect framing, error mapping, models, config)."""

from __future__ import annotations

import builtins
import json
import struct

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox_sdk import _connect, exceptions
from sandbox_sdk._config import ConnectionConfig, resolve_api_key, resolve_api_url
from sandbox_sdk._errors import connect_error, http_error, transport_error
from sandbox_sdk.models import (
    EntryInfo,
    FilesystemEvent,
    FilesystemEventType,
    FileType,
    ProcessEvent,
    ProcessInfo,
    SandboxInfo,
    _parse_time,
)

# ----------------------------------------------------------------------------- framing


def test_envelope_layout() -> None:
    env = _connect.encode_envelope({"a": 1})
    assert env[0] == 0
    assert struct.unpack(">I", env[1:5])[0] == len(env) - 5
    assert json.loads(env[5:]) == {"a": 1}
    end = _connect.encode_envelope({}, flags=_connect.FLAG_END_STREAM)
    assert end[0] == 0x02


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)


@given(
    messages=st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=4), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
)
def test_decoder_reassembles_any_split(messages: list[dict], cuts: list[int]) -> None:
    wire = b"".join(_connect.encode_envelope(m) for m in messages)
    wire += _connect.encode_envelope({}, flags=_connect.FLAG_END_STREAM)
    points = sorted({c for c in cuts if c < len(wire)})
    pieces = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    dec = _connect.EnvelopeDecoder()
    out = [frame for piece in pieces for frame in dec.feed(piece)]
    assert [_connect.decode_message(p, f) for f, p in out[:-1]] == messages
    assert out[-1][0] == _connect.FLAG_END_STREAM
    assert dec.pending == 0


def test_decoder_limits_and_bad_payloads() -> None:
    dec = _connect.EnvelopeDecoder(max_message_bytes=10)
    with pytest.raises(_connect.ProtocolError):
        list(dec.feed(struct.pack(">BI", 0, 11) + b"x" * 11))
    with pytest.raises(_connect.ProtocolError):
        _connect.decode_message(b"[1]")
    with pytest.raises(_connect.ProtocolError):
        _connect.decode_message(b"{", 0)
    with pytest.raises(_connect.ProtocolError, match="compressed"):
        _connect.decode_message(b"{}", _connect.FLAG_COMPRESSED)


def test_end_stream_and_unary_errors() -> None:
    assert _connect.end_stream_error({}) is None
    assert _connect.end_stream_error({"error": {"code": "not_found", "message": "x"}}) == ("not_found", "x")
    assert _connect.unary_error(b'{"code": "invalid_argument", "message": "bad"}') == ("invalid_argument", "bad")
    # The backend's REST errors carry a numeric code: not a Connect error.
    assert _connect.unary_error(b'{"code": 404, "message": "no"}') is None
    assert _connect.unary_error(b"plain text") is None
    assert _connect.timeout_header(None) == {}
    assert _connect.timeout_header(0) == {}
    assert _connect.timeout_header(1.5) == {"Connect-Timeout-Ms": "1500"}


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "code, context, cls, builtin",
    [
        ("not_found", "files", exceptions.PathNotFoundError, builtins.FileNotFoundError),
        ("not_found", "process", exceptions.ProcessNotFoundError, None),
        ("invalid_argument", "envd", exceptions.InvalidArgumentError, builtins.ValueError),
        ("already_exists", "files", exceptions.AlreadyExistsError, builtins.FileExistsError),
        ("permission_denied", "files", exceptions.PermissionDeniedError, builtins.PermissionError),
        ("unauthenticated", "envd", exceptions.AuthenticationError, None),
        ("resource_exhausted", "files", exceptions.NotEnoughSpaceError, None),
        ("deadline_exceeded", "process", exceptions.TimeoutError, builtins.TimeoutError),
        ("internal", "envd", exceptions.RpcError, None),
    ],
)
def test_connect_error_mapping(code: str, context: str, cls: type, builtin: type | None) -> None:
    err = connect_error(code, "boom", context=context)
    assert isinstance(err, cls) and isinstance(err, exceptions.SandboxError)
    if builtin is not None:
        assert isinstance(err, builtin)
    assert "boom" in str(err)
    assert err.code == code


@pytest.mark.parametrize(
    "status, context, cls",
    [
        (400, "api", exceptions.InvalidArgumentError),
        (401, "api", exceptions.AuthenticationError),
        (403, "sandbox", exceptions.AuthenticationError),
        (404, "create", exceptions.TemplateNotFoundError),
        (404, "sandbox", exceptions.SandboxNotFoundError),
        (404, "files", exceptions.PathNotFoundError),
        (404, "api", exceptions.NotFoundError),
        (403, "files", exceptions.PermissionDeniedError),
        (401, "process", exceptions.AuthenticationError),
        (409, "api", exceptions.ConflictError),
        (429, "create", exceptions.RateLimitError),
        (503, "create", exceptions.InsufficientCapacityError),
        (504, "api", exceptions.TimeoutError),
        (507, "files", exceptions.NotEnoughSpaceError),
        (500, "api", exceptions.SandboxError),
    ],
)
def test_http_error_mapping(status: int, context: str, cls: type) -> None:
    body = json.dumps({"code": status, "message": "detail here"}).encode()
    err = http_error(status, body, context=context, sandbox_id="sbx1", template="tpl")
    assert type(err) is cls
    assert err.status_code == status
    assert "detail here" in str(err)


def test_http_error_messages_say_what_to_do() -> None:
    assert "TRENVX_API_KEY" in str(http_error(401, b'{"code":401,"message":"invalid key"}'))
    assert "template-manager" in str(http_error(404, b'{"code":404,"message":"x"}', context="create", template="t"))
    nf = http_error(404, b'{"code":404,"message":"x"}', context="sandbox", sandbox_id="abc")
    assert "abc" in str(nf) and "Sandbox.create()" in str(nf)
    assert "Kill" in str(http_error(429, b'{"code":429,"message":"limit"}', context="create"))


def test_proxy_502_for_a_gone_sandbox_is_sandbox_not_found() -> None:
    body = json.dumps({"code": 502, "message": "The sandbox abc was not found: killed", "sandboxId": "abc"}).encode()
    assert isinstance(http_error(502, body, context="process", sandbox_id="abc"), exceptions.SandboxNotFoundError)
    body = json.dumps({"code": 502, "message": "The sandbox abc is running but port 1 is not open"}).encode()
    err = http_error(502, body, context="envd", sandbox_id="abc")
    assert type(err) is exceptions.SandboxError


def test_connect_error_bodies_take_precedence_over_status() -> None:
    err = http_error(404, b'{"code":"not_found","message":"no such process"}', context="process")
    assert isinstance(err, exceptions.ProcessNotFoundError)


def test_transport_errors() -> None:
    req = httpx.Request("GET", "http://10.9.9.9:5000/x")
    e = transport_error(httpx.ConnectError("refused", request=req), url="http://10.9.9.9:5000")
    assert isinstance(e, exceptions.BackendUnreachableError) and isinstance(e, builtins.ConnectionError)
    assert "SANDBOX_BACKEND_ADDR" in str(e) and "10.9.9.9" in str(e)
    e = transport_error(httpx.ReadTimeout("slow", request=req), url="u")
    assert isinstance(e, exceptions.TimeoutError) and isinstance(e, builtins.TimeoutError)
    e = transport_error(httpx.RemoteProtocolError("cut", request=req), url="u")
    assert isinstance(e, exceptions.StreamError)


def test_command_exit_error_carries_the_result() -> None:
    e = exceptions.CommandExitError(2, "out", "bad things\n", "exit status 2", cmd="ls /x")
    assert (e.exit_code, e.stdout, e.stderr) == (2, "out", "bad things\n")
    assert "ls /x" in str(e) and "bad things" in str(e) and "2" in str(e)
    assert exceptions.CommandExitException is exceptions.CommandExitError


# ----------------------------------------------------------------------------- models


def test_process_events() -> None:
    assert ProcessEvent.from_json({"event": {"start": {"pid": 42}}}).pid == 42
    assert ProcessEvent.from_json({"event": {"data": {"stdout": "aGk="}}}).stdout == b"hi"
    assert ProcessEvent.from_json({"event": {"data": {"stderr": "aGk"}}}).stderr == b"hi"  # unpadded
    assert ProcessEvent.from_json({"event": {"data": {"pty": "AAE="}}}).pty == b"\x00\x01"
    end = ProcessEvent.from_json(
        {"event": {"end": {"exitCode": -1, "exited": False, "status": "signal: killed", "error": "signal: killed"}}}
    ).end
    assert end is not None and end.exit_code == -1 and end.error == "signal: killed"
    ok = ProcessEvent.from_json({"event": {"end": {"exited": True, "status": "exit status 0"}}}).end
    assert ok is not None and ok.exit_code == 0 and ok.error is None  # defaults omitted in proto3 JSON
    assert ProcessEvent.from_json({"event": {"keepalive": {}}}).keepalive


def test_entry_info_and_events() -> None:
    e = EntryInfo.from_json(
        {
            "name": "a",
            "type": "FILE_TYPE_DIRECTORY",
            "path": "/a",
            "size": "123",
            "mode": 493,
            "permissions": "drwxr-xr-x",
            "owner": "root",
            "group": "root",
            "modifiedTime": "2024-05-06T07:08:09.123456789Z",
        }
    )
    assert e.type == FileType.DIR and e.is_dir and e.size == 123
    assert e.modified_time is not None and e.modified_time.microsecond == 123456
    assert FilesystemEvent.from_json({"name": "x", "type": "EVENT_TYPE_WRITE"}).type == FilesystemEventType.WRITE
    p = ProcessInfo.from_json({"pid": 7, "tag": "t", "config": {"cmd": "/bin/bash", "args": ["-c", "x"], "cwd": "/"}})
    assert (p.pid, p.tag, p.cmd, p.args, p.envs, p.cwd) == (7, "t", "/bin/bash", ["-c", "x"], {}, "/")


def test_sandbox_info() -> None:
    s = SandboxInfo.from_json(
        {
            "sandboxID": "s1",
            "templateID": "t",
            "alias": "t",
            "metadata": {"k": "v"},
            "startedAt": "2024-01-01T00:00:00Z",
            "endAt": "2024-01-01T00:05:00+00:00",
            "cpuCount": 1,
            "memoryMB": 256,
            "state": "running",
        }
    )
    assert (s.id, s.alias, s.metadata, s.memory_mb) == ("s1", "t", {"k": "v"}, 256)
    assert s.end_at is not None and s.started_at is not None
    assert (s.end_at - s.started_at).total_seconds() == 300
    assert _parse_time("garbage") is None


# ----------------------------------------------------------------------------- config


def test_address_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SANDBOX_BACKEND_ADDR", "SANDBOX_BACKEND_PORT", "TRENVX_API_URL"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_api_url() == "http://127.0.0.1:5000"
    assert resolve_api_url("10.1.2.3") == "http://10.1.2.3:5000"
    assert resolve_api_url("10.1.2.3", port=8000) == "http://10.1.2.3:8000"
    assert resolve_api_url("host:7000") == "http://host:7000"
    assert resolve_api_url("https://api.example/") == "https://api.example"
    assert resolve_api_url("::1") == "http://[::1]:5000"
    monkeypatch.setenv("SANDBOX_BACKEND_ADDR", "192.0.2.1")
    assert resolve_api_url() == "http://192.0.2.1:5000"
    monkeypatch.setenv("SANDBOX_BACKEND_PORT", "5555")
    assert resolve_api_url() == "http://192.0.2.1:5555"
    assert resolve_api_url("127.0.0.1") == "http://127.0.0.1:5555"
    monkeypatch.setenv("TRENVX_API_URL", "http://u:1")
    assert resolve_api_url() == "http://u:1"
    assert resolve_api_url(api_url="http://v:2") == "http://v:2"


def test_api_key_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRENVX_API_KEY", raising=False)
    monkeypatch.delenv("E2B_API_KEY", raising=False)
    assert resolve_api_key() is None
    monkeypatch.setenv("E2B_API_KEY", "e2b")
    assert resolve_api_key() == "e2b"
    monkeypatch.setenv("TRENVX_API_KEY", "tx")
    assert resolve_api_key() == "tx"
    assert resolve_api_key("arg") == "arg"


def test_timeouts() -> None:
    c = ConnectionConfig.resolve(request_timeout=12)
    assert c.timeout(None) == 12 and c.timeout(3) == 3 and c.timeout(0) is None


def test_sdk_does_not_import_trenvx() -> None:
    import subprocess
    import sys

    code = (
        "import sys, sandbox_sdk, sandbox_sdk.e2b, sandbox_sdk.sandbox;"
        "bad=[m for m in sys.modules if m == 'trenvx' or m.startswith('trenvx.')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
