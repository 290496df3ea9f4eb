"""sandbox_sdk against a fake backend (httpx.MockTransport): request shapes, errors, retries."""

from __future__ import annotations

import base64
import json
import socket
import threading
from typing import Any, Callable

import httpx
import pytest

from sandbox_sdk import _connect, exceptions
from sandbox_sdk.e2b import AsyncSandbox, Sandbox
from sandbox_sdk.sandbox import Sandbox as TrenvxSandbox

API = "http://backend.test:5000"


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def stream_body(*messages: dict, end: dict | None = None) -> bytes:
    out = b"".join(_connect.encode_envelope(m) for m in messages)
    if end is not False:  # type: ignore[comparison-overlap]
        out += _connect.encode_envelope(end or {}, flags=_connect.FLAG_END_STREAM)
    return out


def process_stream(pid: int, *events: dict, exit_code: int = 0) -> bytes:
    msgs = [{"event": {"start": {"pid": pid}}}, *({"event": e} for e in events)]
    end = {"exited": True, "status": f"exit status {exit_code}"}
    if exit_code:
        end["exitCode"] = exit_code
    msgs.append({"event": {"end": end}})
    return stream_body(*msgs)


class FakeBackend:
    """Records requests; routes them to handlers keyed by (method, path)."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.routes: dict[tuple[str, str], Callable[[httpx.Request], httpx.Response]] = {}
        self.sandbox = {
            "sandboxID": "sbx1",
            "templateID": "default-sandbox",
            "clientID": "c",
            "envdVersion": "0.5.7",
            "envdAccessToken": "tok",
            "domain": "sandbox.test",
        }
        self.route("POST", "/sandboxes", lambda r: httpx.Response(201, json=self.sandbox))
        self.route("GET", "/sandboxes/sbx1", lambda r: httpx.Response(200, json={**self.sandbox, "state": "running"}))
        self.route("DELETE", "/sandboxes/sbx1", lambda r: httpx.Response(204))
        self.route("POST", "/sandboxes/sbx1/connect", lambda r: httpx.Response(200, json=self.sandbox))

    def route(self, method: str, path: str, handler: Callable[[httpx.Request], httpx.Response]) -> None:
        self.routes[(method, path)] = handler

    def handler(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        fn = self.routes.get((request.method, request.url.path))
        if fn is None:
            return httpx.Response(404, json={"code": 404, "message": f"no route {request.method} {request.url.path}"})
        return fn(request)

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)

    def last(self, path: str) -> httpx.Request:
        return [r for r in self.requests if r.url.path == path][-1]


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend()


def conn(fake: FakeBackend, **kw: Any) -> dict[str, Any]:
    return {"api_url": API, "transport": fake.transport, "api_key": "k-123", **kw}


# ----------------------------------------------------------------------------- REST


async def test_create_request_shape(fake: FakeBackend) -> None:
    sbx = await AsyncSandbox.create("tpl", timeout=120, metadata={"a": "1"}, envs={"X": "y"}, **conn(fake))
    req = fake.last("/sandboxes")
    assert req.headers["X-API-Key"] == "k-123"
    assert json.loads(req.content) == {
        "templateID": "tpl",
        "timeout": 120,
        "metadata": {"a": "1"},
        "envVars": {"X": "y"},
    }
    assert sbx.sandbox_id == "sbx1" and sbx.envd_access_token == "tok"
    assert sbx.get_host(8080) == "8080-sbx1.sandbox.test"
    await sbx.close()


async def test_create_without_template_lets_the_backend_choose(fake: FakeBackend) -> None:
    sbx = await AsyncSandbox.create(**conn(fake, api_key=None))
    body = json.loads(fake.last("/sandboxes").content)
    assert "templateID" not in body
    assert "X-API-Key" not in fake.last("/sandboxes").headers
    await sbx.close()


async def test_create_errors_are_typed(fake: FakeBackend) -> None:
    cases = [
        (404, exceptions.TemplateNotFoundError),
        (401, exceptions.AuthenticationError),
        (429, exceptions.RateLimitError),
        (503, exceptions.InsufficientCapacityError),
        (400, exceptions.InvalidArgumentError),
    ]
    for status, cls in cases:
        fake.route("POST", "/sandboxes", lambda r, s=status: httpx.Response(s, json={"code": s, "message": "nope"}))
        with pytest.raises(cls):
            await AsyncSandbox.create("missing", **conn(fake))


async def test_connect_get_info_list_timeout_kill(fake: FakeBackend) -> None:
    fake.route(
        "GET",
        "/sandboxes",
        lambda r: httpx.Response(
            200, json=[{**fake.sandbox, "metadata": {"a": "1"}, "startedAt": "2024-01-01T00:00:00Z"}]
        ),
    )
    fake.route("POST", "/sandboxes/sbx1/timeout", lambda r: httpx.Response(204))
    sbx = await AsyncSandbox.connect("sbx1", **conn(fake))
    assert sbx.envd_access_token == "tok"
    info = await sbx.get_info()
    assert info.sandbox_id == "sbx1" and info.state == "running"
    assert (await AsyncSandbox.get_info("sbx1", **conn(fake))).template_id == "default-sandbox"
    listed = await AsyncSandbox.list(metadata={"a": "1 2"}, **conn(fake))
    assert [s.sandbox_id for s in listed] == ["sbx1"]
    assert fake.last("/sandboxes").url.params["metadata"] == "a=1%25202"  # E2B's double encoding
    await sbx.set_timeout(600)
    assert json.loads(fake.last("/sandboxes/sbx1/timeout").content) == {"timeout": 600}
    await AsyncSandbox.set_timeout("sbx1", 60, **conn(fake))
    assert await sbx.kill() is True
    fake.route("DELETE", "/sandboxes/sbx1", lambda r: httpx.Response(404, json={"code": 404, "message": "gone"}))
    assert await AsyncSandbox.kill("sbx1", **conn(fake)) is False
    with pytest.raises(exceptions.SandboxNotFoundError, match="nope"):
        await AsyncSandbox.connect("nope", **conn(fake))


async def test_list_with_state_pages_through_v2(fake: FakeBackend) -> None:
    def v2(r: httpx.Request) -> httpx.Response:
        if "nextToken" not in r.url.params:
            return httpx.Response(200, json=[{**fake.sandbox, "sandboxID": "a"}], headers={"x-next-token": "T"})
        assert r.url.params["nextToken"] == "T"
        return httpx.Response(200, json=[{**fake.sandbox, "sandboxID": "b", "state": "exited"}])

    fake.route("GET", "/v2/sandboxes", v2)
    got = await AsyncSandbox.list(state=["running", "exited"], **conn(fake))
    assert [s.sandbox_id for s in got] == ["a", "b"]
    assert fake.last("/v2/sandboxes").url.params["state"] == "running,exited"


# ----------------------------------------------------------------------------- retries


async def test_connect_errors_are_retried_even_for_post(fake: FakeBackend) -> None:
    attempts = {"n": 0}

    def flaky(request: httpx.Request) -> httpx.Response:
        attempts["n"] += 1
        if attempts["n"] < 3:
            raise httpx.ConnectError("refused", request=request)
        return fake.handler(request)

    sbx = await AsyncSandbox.create(api_url=API, transport=httpx.MockTransport(flaky))
    assert attempts["n"] == 3
    await sbx.close()


async def test_a_post_that_may_have_been_sent_is_not_retried(fake: FakeBackend) -> None:
    attempts = {"n": 0}

    def broken(request: httpx.Request) -> httpx.Response:
        attempts["n"] += 1
        raise httpx.ReadError("connection reset", request=request)

    with pytest.raises(exceptions.StreamError):
        await AsyncSandbox.create(api_url=API, transport=httpx.MockTransport(broken))
    assert attempts["n"] == 1


async def test_idempotent_gets_are_retried(fake: FakeBackend) -> None:
    attempts = {"n": 0}

    def flaky(request: httpx.Request) -> httpx.Response:
        attempts["n"] += 1
        if attempts["n"] == 1:
            raise httpx.ReadError("reset", request=request)
        if attempts["n"] == 2:
            return httpx.Response(502, json={"code": 502, "message": "bad gateway"})
        return httpx.Response(200, json=[])

    assert await AsyncSandbox.list(api_url=API, transport=httpx.MockTransport(flaky)) == []
    assert attempts["n"] == 3


async def test_wrong_address_is_backend_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(exceptions.BackendUnreachableError, match=f"127.0.0.1:{port}"):
        await AsyncSandbox.create(target_addr="127.0.0.1", port=port, retries=0)
    with pytest.raises(ConnectionError):
        await TrenvxSandbox.list(target_addr=f"127.0.0.1:{port}", retries=0)


# ----------------------------------------------------------------------------- envd through the proxy


async def test_a_kill_by_the_agents_deadline_is_a_timeout(fake: FakeBackend) -> None:
    """The agent enforces the command's timeout too, and its clock started first: its kill (an
    end by signal) may arrive before the SDK's own timer fires; it is a TimeoutError all the same."""
    import time as _time

    def start(r: httpx.Request) -> httpx.Response:
        _time.sleep(0.15)  # the agent killed the command at its deadline; its end event arrives now
        end = {"event": {"end": {"exitCode": -1, "exited": False, "status": "signal: killed", "error": "signal: killed"}}}
        return httpx.Response(200, headers={"content-type": "application/connect+json"},
                              content=stream_body({"event": {"start": {"pid": 9}}}, end))

    fake.route("POST", "/process.Process/Start", start)
    sbx = await AsyncSandbox.create(**conn(fake))
    with pytest.raises(exceptions.TimeoutError, match="did not finish within 0.1s"):
        await sbx.commands.run("sleep 30", timeout=0.1)
    fake.route("POST", "/process.Process/Start", lambda r: httpx.Response(
        200, headers={"content-type": "application/connect+json"},
        content=stream_body({"event": {"start": {"pid": 9}}}, {"event": {"end": {
            "exitCode": -1, "exited": False, "status": "signal: killed"}}})))
    with pytest.raises(exceptions.CommandExitError):  # killed by someone else, well before the deadline
        await sbx.commands.run("sleep 30", timeout=30)
    await sbx.close()


async def test_envd_requests_go_through_the_proxy_with_identity(fake: FakeBackend) -> None:
    seen: dict[str, httpx.Request] = {}

    def start(r: httpx.Request) -> httpx.Response:
        seen["start"] = r
        return httpx.Response(
            200,
            headers={"content-type": "application/connect+json"},
            content=process_stream(7, {"data": {"stdout": _b64("hi\n")}}, {"data": {"stderr": _b64("err")}}),
        )

    fake.route("POST", "/process.Process/Start", start)
    sbx = await AsyncSandbox.create(**conn(fake))
    got: list[str] = []
    result = await sbx.commands.run("echo hi", envs={"A": "b"}, cwd="/tmp", on_stdout=got.append, timeout=5)
    assert (result.stdout, result.stderr, result.exit_code) == ("hi\n", "err", 0)
    assert got == ["hi\n"]
    r = seen["start"]
    assert r.url == httpx.URL(f"{API}/process.Process/Start")
    assert r.headers["E2b-Sandbox-Id"] == "sbx1"
    assert r.headers["E2b-Sandbox-Port"] == "49983"
    assert r.headers["X-Access-Token"] == "tok"
    assert "Authorization" not in r.headers  # no user named: the template's default user, as with E2B's SDK
    assert r.headers["Content-Type"] == "application/connect+json"
    assert r.headers["Connect-Protocol-Version"] == "1"
    assert r.headers["Connect-Timeout-Ms"] == "5000"
    frames = list(_connect.EnvelopeDecoder().feed(r.content))
    assert len(frames) == 1
    assert _connect.decode_message(frames[0][1]) == {
        "process": {"cmd": "/bin/bash", "args": ["-l", "-c", "echo hi"], "envs": {"A": "b"}, "cwd": "/tmp"}
    }
    await sbx.close()


async def test_nonzero_exit_raises_command_exit_error(fake: FakeBackend) -> None:
    fake.route(
        "POST",
        "/process.Process/Start",
        lambda r: httpx.Response(
            200, content=process_stream(3, {"data": {"stderr": _b64("no such file\n")}}, exit_code=2)
        ),
    )
    sbx = await AsyncSandbox.create(**conn(fake))
    with pytest.raises(exceptions.CommandExitError) as ei:
        await sbx.commands.run("ls /nope")
    assert ei.value.exit_code == 2 and ei.value.stderr == "no such file\n"
    await sbx.close()


async def test_stream_errors(fake: FakeBackend) -> None:
    sbx = await AsyncSandbox.create(**conn(fake))
    # The agent refuses the start: an end-of-stream error.
    fake.route(
        "POST",
        "/process.Process/Start",
        lambda r: httpx.Response(
            200, content=stream_body(end={"error": {"code": "invalid_argument", "message": "bad cwd"}})
        ),
    )
    with pytest.raises(exceptions.InvalidArgumentError, match="bad cwd"):
        await sbx.commands.run("true")
    # The connection is cut after the start: no end event.
    fake.route(
        "POST",
        "/process.Process/Start",
        lambda r: httpx.Response(200, content=stream_body({"event": {"start": {"pid": 1}}}, end=False)),  # type: ignore[arg-type]
    )
    with pytest.raises(exceptions.StreamError):
        await sbx.commands.run("true")
    # The proxy says the sandbox is gone.
    fake.route(
        "POST",
        "/process.Process/Start",
        lambda r: httpx.Response(502, json={"code": 502, "message": "The sandbox sbx1 was not found"}),
    )
    with pytest.raises(exceptions.SandboxNotFoundError):
        await sbx.commands.run("true")
    await sbx.close()


async def test_unary_rpcs_and_file_shapes(fake: FakeBackend) -> None:
    fake.route(
        "POST",
        "/filesystem.Filesystem/Stat",
        lambda r: httpx.Response(404, json={"code": "not_found", "message": "no such file"}),
    )
    fake.route(
        "POST",
        "/filesystem.Filesystem/MakeDir",
        lambda r: httpx.Response(409, json={"code": "already_exists", "message": "exists"}),
    )
    fake.route(
        "POST",
        "/filesystem.Filesystem/ListDir",
        lambda r: httpx.Response(
            200, json={"entries": [{"name": "a", "type": "FILE_TYPE_FILE", "path": "/a", "size": "3"}]}
        ),
    )
    fake.route(
        "POST",
        "/process.Process/SendSignal",
        lambda r: httpx.Response(404, json={"code": "not_found", "message": "no process"}),
    )
    fake.route("GET", "/files", lambda r: httpx.Response(200, content=b"data"))
    fake.route("POST", "/files", lambda r: httpx.Response(200, json=[{"name": "a", "type": "file", "path": "/a"}]))
    sbx = await AsyncSandbox.create(**conn(fake))
    assert await sbx.files.exists("/x") is False
    with pytest.raises(FileNotFoundError):
        await sbx.files.get_info("/x")
    assert await sbx.files.make_dir("/d") is False
    entries = await sbx.files.list("/", depth=2)
    assert entries[0].size == 3
    assert json.loads(fake.last("/filesystem.Filesystem/ListDir").content) == {"path": "/", "depth": 2}
    with pytest.raises(exceptions.InvalidArgumentError):
        await sbx.files.list("/", depth=0)
    assert await sbx.commands.kill(99) is False
    assert json.loads(fake.last("/process.Process/SendSignal").content) == {
        "process": {"pid": 99},
        "signal": "SIGNAL_SIGKILL",
    }
    assert await sbx.files.read("/a", user="root") == "data"
    assert fake.last("/files").url.params["username"] == "root"
    assert fake.last("/files").url.params["path"] == "/a"
    info = await sbx.files.write("/a", "xyz")
    up = fake.last("/files")
    assert up.method == "POST" and up.url.params["path"] == "/a" and "username" not in up.url.params
    assert b'name="file"; filename="/a"' in up.content and b"xyz" in up.content
    assert info.path == "/a"
    await sbx.close()


# ----------------------------------------------------------------------------- sync facade and TrEnv-X surface


def test_sync_facade_runs_callbacks_in_the_calling_thread(fake: FakeBackend) -> None:
    fake.route(
        "POST",
        "/process.Process/Start",
        lambda r: httpx.Response(
            200, content=process_stream(5, {"data": {"stdout": _b64("a\n")}}, {"data": {"stdout": _b64("b\n")}})
        ),
    )
    threads: list[int] = []
    out: list[str] = []

    def cb(text: str) -> None:
        threads.append(threading.get_ident())
        out.append(text)

    with Sandbox.create(**conn(fake)) as sbx:
        r = sbx.commands.run("x", on_stdout=cb)
        assert r.stdout == "a\nb\n" and out == ["a\n", "b\n"]
        assert set(threads) == {threading.get_ident()}
        h = sbx.commands.run("x", background=True)
        assert [t for t in h] == [("a\n", None, None), ("b\n", None, None)]
        assert h.wait().exit_code == 0
    assert fake.requests[-1].method == "DELETE"  # the context manager killed it


def test_dual_methods(fake: FakeBackend) -> None:
    assert Sandbox.kill("sbx1", **conn(fake)) is True
    sbx = Sandbox.connect("sbx1", **conn(fake))
    assert sbx.kill() is True
    assert fake.requests[-1].method == "DELETE" and fake.requests[-1].url.path == "/sandboxes/sbx1"


async def test_trenvx_surface_over_the_fake(fake: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.route(
        "POST",
        "/process.Process/Start",
        lambda r: httpx.Response(
            200, content=process_stream(5, {"data": {"stdout": _b64("Hello ")}}, {"data": {"stdout": _b64("World\n")}})
        ),
    )
    fake.route("POST", "/sandboxes/sbx1/refreshes", lambda r: httpx.Response(204))
    ci = await TrenvxSandbox.create(template="default-sandbox", cwd="/root", env_vars={"K": "V"}, **conn(fake))
    body = json.loads(fake.last("/sandboxes").content)
    assert body["templateID"] == "default-sandbox" and body["envVars"] == {"K": "V"} and "timeout" not in body
    p = await ci.process.start("echo hi")
    out = await p.wait()
    assert p.stdout == "Hello World" and out.exit_code == 0 and p.exit_code == 0 and p.error is False
    start = _connect.decode_message(
        list(_connect.EnvelopeDecoder().feed(fake.last("/process.Process/Start").content))[0][1]
    )
    assert start["process"]["cwd"] == "/root" and start["process"]["envs"] == {"K": "V"} and start["stdin"] is True
    assert (
        fake.last("/process.Process/Start").headers["Authorization"] == "Basic " + base64.b64encode(b"root:").decode()
    )
    assert ci.id == "sbx1" and ci.get_hostname(3000) == "3000-sbx1.sandbox.test"
    await ci.keep_alive(900)
    assert json.loads(fake.last("/sandboxes/sbx1/refreshes").content) == {"duration": 900}
    await ci.close()
    assert fake.requests[-1].method == "DELETE"


async def test_pause_and_connect_in_e2b_shapes(fake: FakeBackend) -> None:
    """pause(): POST /pause {memory}, True, or False when already paused (409); connect() resumes
    (POST /connect, memory false for on_resume="reboot"); bad modes are refused before any request."""
    answers = [httpx.Response(204), httpx.Response(409, json={"code": 409, "message": "sandbox sbx1 is already paused"})]
    fake.route("POST", "/sandboxes/sbx1/pause", lambda r: answers.pop(0))
    sbx = await AsyncSandbox.connect("sbx1", **conn(fake))
    assert json.loads(fake.last("/sandboxes/sbx1/connect").content) == {}
    assert await sbx.pause() is True
    assert json.loads(fake.last("/sandboxes/sbx1/pause").content) == {"memory": True}
    assert await AsyncSandbox.pause("sbx1", mode="filesystem", strict=True, **conn(fake)) is False
    assert json.loads(fake.last("/sandboxes/sbx1/pause").content) == {"memory": False, "requireHealthyGuest": True}
    fake.route("POST", "/sandboxes/sbx1/connect", lambda r: httpx.Response(201, json=fake.sandbox))
    assert await sbx.connect(600, on_resume="reboot") is sbx
    assert json.loads(fake.last("/sandboxes/sbx1/connect").content) == {"timeout": 600, "memory": False}
    again = await AsyncSandbox.connect("sbx1", 60, **conn(fake))
    assert again.envd_access_token == "tok" and json.loads(fake.last("/sandboxes/sbx1/connect").content) == {"timeout": 60}
    n = len(fake.requests)
    with pytest.raises(exceptions.InvalidArgumentError, match="mode"):
        await sbx.pause(mode="disk")
    with pytest.raises(exceptions.InvalidArgumentError, match="not both"):
        await sbx.pause(False, mode="full")
    with pytest.raises(exceptions.InvalidArgumentError, match="on_resume"):
        await sbx.connect(on_resume="later")
    assert len(fake.requests) == n
    # a 409 that is not "already paused" (a VMM that cannot pause) is an error, not False
    fake.route("POST", "/sandboxes/sbx1/pause", lambda r: httpx.Response(
        409, json={"code": 409, "message": "pausing to disk is not supported by this VMM yet (firecracker)"}))
    with pytest.raises(exceptions.ConflictError, match="not supported"):
        await sbx.pause()
    fake.route("POST", "/sandboxes/sbx1/pause", lambda r: httpx.Response(404, json={"code": 404, "message": "gone"}))
    with pytest.raises(exceptions.SandboxNotFoundError):
        await sbx.pause()


def test_sync_pause_and_connect(fake: FakeBackend) -> None:
    fake.route("POST", "/sandboxes/sbx1/pause", lambda r: httpx.Response(204))
    sbx = Sandbox.connect("sbx1", **conn(fake))
    assert sbx.pause(keep_memory=False) is True
    assert json.loads(fake.last("/sandboxes/sbx1/pause").content) == {"memory": False}
    assert Sandbox.pause("sbx1", **conn(fake)) is True
    assert sbx.connect() is sbx and Sandbox.connect("sbx1", 30, **conn(fake)).sandbox_id == "sbx1"


async def test_trenvx_surface_pause_and_resume(fake: FakeBackend) -> None:
    fake.route("POST", "/sandboxes/sbx1/pause", lambda r: httpx.Response(204))
    ci = await TrenvxSandbox.connect("sbx1", **conn(fake))
    assert await ci.pause(keep_memory=False) is True
    assert json.loads(fake.last("/sandboxes/sbx1/pause").content) == {"memory": False}
    await ci.resume(keep_alive=300, reboot=True)
    assert json.loads(fake.last("/sandboxes/sbx1/connect").content) == {"timeout": 300, "memory": False}
