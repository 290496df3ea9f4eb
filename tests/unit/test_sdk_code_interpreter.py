"""The clients of the code interpreter (issue 15 items 3 and 5), without VMs: sandbox_sdk's E2B-style
``run_code`` and code contexts (sync and async), TrEnv-X's ``CodeInterpreter.notebook``, and
``sandbox-cli sandbox run-code``, against the real server app and its proxy, with a fake code
interpreter standing for port 49999 of the fake sandboxes. The fake speaks E2B's protocol and plays
scripts: a cell whose code is ``#!script`` followed by a JSON list streams each object as a line,
sleeps for each number and sends each string as raw bytes. E2B's unmodified
``e2b_code_interpreter`` reads the same streams, through the same proxy, the same way.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from sandbox_sdk import exceptions
from sandbox_sdk._code_interpreter import INTERPRETER_PORT, apply_line
from sandbox_sdk.code_interpreter import CodeInterpreter, Error, KernelException, ProcessMessage
from sandbox_sdk.e2b import AsyncSandbox, Chart, Context, Execution, ExecutionError, OutputMessage, Result, Sandbox
from trenvx.server.app import create_app

from .server_fakes import ThreadedServer, UpstreamState, fake_manager, free_port, make_config, make_template, upstream_app

LANGUAGES = ("python", "javascript", "typescript", "r", "java", "bash")


def png(width: int, height: int) -> bytes:
    """A real (tiny, grey) PNG image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    assert zlib.decompress(data[41:41 + struct.unpack(">I", data[33:37])[0]])  # the IDAT inflates
    return struct.unpack(">II", data[16:24])


PNG = base64.b64encode(png(40, 30)).decode()
CHART = {"type": "line", "title": "squares", "x_label": "x", "y_label": "y", "x_unit": None, "y_unit": None,
         "x_ticks": [1, 2], "x_tick_labels": ["1", "2"], "x_scale": "linear", "y_ticks": [1, 4],
         "y_tick_labels": ["1", "4"], "y_scale": "linear",
         "elements": [{"label": "sq", "points": [[1, 1], [2, 4]]}]}
FULL_RESULT = {
    "type": "result", "text": "<Figure size 40x30>", "html": "<b>hi</b>", "markdown": "**hi**",
    "svg": "<svg xmlns='http://www.w3.org/2000/svg'/>", "png": PNG, "jpeg": "/9j/4AAQ", "pdf": "JVBERi0xLjQK",
    "latex": "$x^2$", "json": {"a": [1, 2]}, "javascript": "console.log(1)", "data": {"col": [1, 2]},
    "chart": CHART, "is_main_result": False, "extra": {"application/vnd.custom": "x"}, "a_future_key": 1,
}


def script(*steps: Any) -> str:
    return "#!script\n" + json.dumps(list(steps))


# -- the fake code interpreter ------------------------------------------------------------------------


class Interpreter:
    """What the fake saw and holds: requests, contexts, restarts, interrupted cells."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.contexts: dict[str, dict[str, str]] = {}
        self.restarts: list[str] = []
        self.interrupted = 0
        self.finished = 0
        self.n = 0
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.restarts.clear()
            self.contexts = {"ctx-python": {"id": "ctx-python", "language": "python", "cwd": "/home/user"},
                             "ctx-javascript": {"id": "ctx-javascript", "language": "javascript", "cwd": "/home/user"}}
            self.interrupted = self.finished = 0

    def last(self, path: str) -> dict[str, Any]:
        return [r for r in self.requests if r["path"] == path][-1]

    def app(self) -> Starlette:
        async def record(request: Request) -> dict[str, Any]:
            raw = await request.body()
            entry = {"path": request.url.path, "method": request.method, "headers": dict(request.headers),
                     "body": json.loads(raw) if raw else None}
            self.requests.append(entry)
            return entry

        async def execute(request: Request) -> Response:
            body = (await record(request))["body"]
            if body.get("context_id") and body.get("language"):
                return PlainTextResponse("Only one of context_id or language can be provided", 400)
            language = body.get("language")
            if language is not None and language not in LANGUAGES:
                return PlainTextResponse(f"Unsupported language {language!r}: use one of {', '.join(LANGUAGES)}", 400)
            cid = body.get("context_id")
            if cid is not None and cid not in self.contexts:
                return PlainTextResponse(f"Context {cid} not found", 404)
            code = body["code"]
            if code.startswith("#!script\n"):
                steps = json.loads(code.split("\n", 1)[1])
            else:  # a cell that says where it ran
                where = cid or f"ctx-{language or 'python'}"
                steps = [{"type": "result", "text": f"{where}:{code}", "is_main_result": True},
                         {"type": "number_of_executions", "execution_count": 1}]
            steps.append({"type": "end_of_execution"})

            async def lines() -> Any:
                try:
                    for step in steps:
                        if isinstance(step, (int, float)):
                            await asyncio.sleep(step)
                        elif isinstance(step, str):
                            yield step.encode()
                        else:
                            yield (json.dumps(step) + "\n").encode()
                    self.finished += 1
                except (asyncio.CancelledError, GeneratorExit):
                    self.interrupted += 1  # the client went away: a real server interrupts the cell
                    raise

            return StreamingResponse(lines(), media_type="application/x-ndjson")

        async def contexts(request: Request) -> Response:
            if request.method == "GET":
                await record(request)
                return JSONResponse(list(self.contexts.values()))
            body = (await record(request))["body"] or {}
            language = body.get("language") or "python"
            if language not in LANGUAGES:
                return PlainTextResponse(f"Unsupported language {language!r}", 400)
            self.n += 1
            ctx = {"id": f"ctx-{self.n}", "language": language, "cwd": body.get("cwd") or "/home/user"}
            self.contexts[ctx["id"]] = ctx
            return JSONResponse(ctx)

        async def one(request: Request) -> Response:
            await record(request)
            cid = request.path_params["cid"]
            if cid not in self.contexts:
                return PlainTextResponse(f"Context {cid} not found", 404)
            if request.url.path.endswith("/restart"):
                self.restarts.append(cid)
            else:
                del self.contexts[cid]
            return Response(status_code=204)

        return Starlette(routes=[
            Route("/execute", execute, methods=["POST"]), Route("/contexts", contexts, methods=["GET", "POST"]),
            Route("/contexts/{cid}", one, methods=["DELETE"]), Route("/contexts/{cid}/restart", one, methods=["POST"]),
        ])


class Backend:
    def __init__(self, url: str, manager: Any, interp: Interpreter) -> None:
        self.url = url
        self.manager = manager
        self.interp = interp
        self.port = int(url.rsplit(":", 1)[1])

    @property
    def c(self) -> dict[str, Any]:
        return {"api_url": self.url}

    def new(self, template: str = "tpl") -> str:
        r = httpx.post(f"{self.url}/sandboxes", json={"templateID": template, "timeout": 300})
        assert r.status_code == 201, r.text
        sid = r.json()["sandboxID"]
        if template == "plain":  # its port 49999 is forwarded, but nothing listens there (no interpreter)
            self.manager.get(sid).ports[INTERPRETER_PORT] = free_port()
        return sid

    def alive(self, sid: str) -> bool:
        return any(s.id == sid for s in self.manager.list())

    def wait_for(self, what: Any, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, "timed out waiting"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    root = tmp_path_factory.mktemp("ci")
    make_template(root, "tpl")
    make_template(root, "plain")
    interp = Interpreter()
    with ThreadedServer(upstream_app(UpstreamState())) as agent, ThreadedServer(interp.app()) as ci:
        cfg = make_config(root)
        m = fake_manager(cfg, agent.port, forwards={INTERPRETER_PORT: ci.port})
        with ThreadedServer(create_app(cfg, manager=m), lifespan="on") as srv:
            yield Backend(f"http://127.0.0.1:{srv.port}", m, interp)


@pytest.fixture
def b(backend: Backend) -> Backend:
    backend.interp.reset()
    return backend


@pytest.fixture
def sbx(b: Backend) -> Iterator[Sandbox]:
    s = Sandbox.connect(b.new(), **b.c)
    yield s
    s.kill()


STREAM = [
    {"type": "stdout", "text": "first\n", "timestamp": 1_700_000_000_000_000_000},
    {"type": "stderr", "text": "careful\n", "timestamp": 1_700_000_000_100_000_000},
    0.5,
    FULL_RESULT,
    {"type": "stdout", "text": "second", "timestamp": 1_700_000_001_000_000_000},
    {"type": "result", "text": "42", "is_main_result": True},
    {"type": "error", "name": "ValueError", "value": "bad", "traceback": "Traceback...\nValueError: bad"},
    {"type": "number_of_executions", "execution_count": 7},
]


def check_stream_execution(execution: Execution) -> None:
    assert execution.logs.stdout == ["first\n", "second"] and execution.logs.stderr == ["careful\n"]
    assert [r.text for r in execution.results] == ["<Figure size 40x30>", "42"]
    assert execution.text == "42" and execution.execution_count == 7
    assert execution.error == ExecutionError("ValueError", "bad", "Traceback...\nValueError: bad")


# -- E2B's shape, synchronous ------------------------------------------------------------------------


def test_sync_run_code_streams_in_order_and_calls_back_in_the_callers_thread(b: Backend, sbx: Sandbox) -> None:
    seen: list[tuple[str, Any, float, str]] = []
    t0 = time.monotonic()

    def note(kind: str) -> Any:
        return lambda v: seen.append((kind, v, time.monotonic() - t0, threading.current_thread().name))

    execution = sbx.run_code(script(*STREAM), on_stdout=note("out"), on_stderr=note("err"), on_result=note("res"),
                             on_error=note("error"))
    done = time.monotonic() - t0
    check_stream_execution(execution)
    assert [(k, str(v)) for k, v, _, _ in seen] == [
        ("out", "first\n"), ("err", "careful\n"), ("res", "Result(<Figure size 40x30>)"), ("out", "second"),
        ("res", "Result(42)"), ("error", "ValueError: bad")]
    assert {thread for *_, thread in seen} == {threading.current_thread().name}
    assert done - seen[0][2] >= 0.4, f"the first line came only with the end of the stream: {seen}"
    first = seen[0][1]
    assert isinstance(first, OutputMessage) and first.timestamp == 1_700_000_000_000_000_000 and not first.error
    assert seen[1][1].error and seen[1][1].line == "careful\n"
    assert seen[2][1] is execution.results[0] and seen[5][1] is execution.error


def test_the_request_goes_through_the_proxy_with_the_protocols_body_and_token(b: Backend, sbx: Sandbox) -> None:
    sbx.run_code("x = 1", envs={"A": "1", "B": 2})  # type: ignore[dict-item]
    req = b.interp.last("/execute")
    assert req["body"] == {"code": "x = 1", "context_id": None, "language": None, "env_vars": {"A": "1", "B": "2"}}
    assert req["headers"]["x-access-token"] == sbx.envd_access_token
    assert "e2b-sandbox-id" not in req["headers"]  # the proxy's routing headers stay outside the sandbox
    assert sbx.run_code("1", language="javascript").text == "ctx-javascript:1"
    assert b.interp.last("/execute")["body"]["language"] == "javascript"
    ctx = sbx.create_code_context(cwd="/tmp")
    assert sbx.run_code("2", context=ctx).text == f"{ctx.id}:2"
    assert sbx.run_code("3", context=ctx.id).text == f"{ctx.id}:3"
    before = len(b.interp.requests)
    with pytest.raises(exceptions.InvalidArgumentError, match="language or context, not both"):
        sbx.run_code("4", language="python", context=ctx)
    with pytest.raises(exceptions.InvalidArgumentError, match="timeout"):
        sbx.run_code("5", timeout=-1)
    assert len(b.interp.requests) == before, "refused before anything was sent"


def test_contexts(b: Backend, sbx: Sandbox) -> None:
    ctx = sbx.create_code_context(cwd="/srv", language="r")
    assert isinstance(ctx, Context) and ctx.language == "r" and ctx.cwd == "/srv"
    assert b.interp.last("/contexts")["body"] == {"language": "r", "cwd": "/srv"}
    assert sbx.create_code_context().language == "python"
    assert b.interp.last("/contexts")["body"] == {}
    listed = sbx.list_code_contexts()
    assert [c.id for c in listed][:2] == ["ctx-python", "ctx-javascript"] and ctx in listed
    sbx.restart_code_context(ctx)
    sbx.restart_code_context("ctx-python")
    assert b.interp.restarts == [ctx.id, "ctx-python"]
    sbx.remove_code_context(ctx)
    assert ctx.id not in {c.id for c in sbx.list_code_contexts()}
    with pytest.raises(exceptions.NotFoundError, match=rf"code context '{ctx.id}' was not found.*list_code_contexts"):
        sbx.remove_code_context(ctx.id)
    with pytest.raises(exceptions.NotFoundError, match="'nope' was not found"):
        sbx.restart_code_context("nope")
    with pytest.raises(exceptions.NotFoundError, match="'gone' was not found"):
        sbx.run_code("1", context="gone")
    with pytest.raises(exceptions.InvalidArgumentError, match="a Context or a context id"):
        sbx.remove_code_context("")


def test_an_unknown_language_is_a_clear_error(b: Backend, sbx: Sandbox) -> None:
    with pytest.raises(exceptions.InvalidArgumentError, match=r"refused the request \(language 'cobol'\).*cobol"):
        sbx.run_code("DISPLAY 'HI'", language="cobol")
    with pytest.raises(ValueError, match="cobol"):  # also a ValueError
        sbx.create_code_context(language="cobol")


def test_every_result_field(b: Backend, sbx: Sandbox) -> None:
    r = sbx.run_code(script(FULL_RESULT)).results[0]
    for key, value in FULL_RESULT.items():
        if key in ("type", "a_future_key"):
            continue
        got = r.chart.to_dict() if key == "chart" else getattr(r, key)
        assert got == value, key
    assert isinstance(r.chart, Chart) and r.chart.type == "line" and r.chart.title == "squares"
    assert r.chart.x_label == "x" and r.chart.elements[0]["points"] == [[1, 2 - 1], [2, 4]]
    with pytest.raises(AttributeError, match="no 'z_label'"):
        r.chart.z_label
    assert r.formats() == ["text", "html", "markdown", "svg", "png", "jpeg", "pdf", "latex", "json", "javascript",
                           "data", "chart", "application/vnd.custom"]
    assert r["png"] == PNG and r["application/vnd.custom"] == "x"
    assert (r._repr_html_(), r._repr_markdown_(), r._repr_svg_(), r._repr_png_(), r._repr_jpeg_(), r._repr_pdf_(),
            r._repr_latex_(), r._repr_json_(), r._repr_javascript_()) == (
        r.html, r.markdown, r.svg, r.png, r.jpeg, r.pdf, r.latex, r.json, r.javascript)
    assert r.raw["image/png"] == PNG and r.raw["text/plain"] == r.text and r.raw["application/vnd.custom"] == "x"
    assert png_size(base64.b64decode(r.png)) == (40, 30)
    assert Result(**r.to_dict()) == r
    assert repr(Result(png=PNG)) == "Result(formats: png)"


def test_to_json(b: Backend, sbx: Sandbox) -> None:
    execution = sbx.run_code(script(*STREAM))
    data = json.loads(execution.to_json())
    assert data["logs"] == {"stdout": ["first\n", "second"], "stderr": ["careful\n"]}
    assert data["error"] == {"name": "ValueError", "value": "bad", "traceback": "Traceback...\nValueError: bad"}
    assert data["execution_count"] == 7 and data["results"][1] == {"text": "42", "is_main_result": True}
    assert data["results"][0]["chart"] == CHART


def test_a_timeout_ends_the_request_and_the_server_interrupts_the_cell(b: Backend, sbx: Sandbox) -> None:
    out: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(exceptions.TimeoutError, match=r"timeout of 0.5 s.*larger timeout") as ei:
        sbx.run_code(script({"type": "stdout", "text": "started\n"}, 30, {"type": "stdout", "text": "never"}),
                     timeout=0.5, on_stdout=lambda m: out.append(m.line))
    assert isinstance(ei.value, TimeoutError)  # the built-in too
    assert time.monotonic() - t0 < 5 and out == ["started\n"]
    b.wait_for(lambda: b.interp.interrupted == 1)
    assert b.interp.finished == 0
    assert sbx.run_code("1").text == "ctx-python:1", "the sandbox object goes on"


def test_timeout_zero_means_no_limit(b: Backend, sbx: Sandbox) -> None:
    execution = sbx.run_code(script(0.3, {"type": "stdout", "text": "late"}), timeout=0)
    assert execution.logs.stdout == ["late"]


def test_a_callback_that_raises_stops_the_execution(b: Backend, sbx: Sandbox) -> None:
    def boom(message: OutputMessage) -> None:
        raise KeyError("from the callback")

    with pytest.raises(KeyError, match="from the callback"):
        sbx.run_code(script({"type": "stdout", "text": "x"}, 30), on_stdout=boom)
    b.wait_for(lambda: b.interp.interrupted == 1)


def test_lines_split_across_chunks_and_odd_lines(b: Backend, sbx: Sandbox) -> None:
    line = json.dumps({"type": "stdout", "text": "joined", "timestamp": 1})
    execution = sbx.run_code(script(line[:10], 0.1, line[10:] + "\n", "\n", {"type": "brand_new_type", "x": 1},
                                    {"type": "stdout", "text": None}, {"type": "result"}))
    assert execution.logs.stdout == ["joined", ""] and execution.results == [Result()]
    with pytest.raises(exceptions.StreamError, match="not JSON.*garbage"):
        sbx.run_code(script("garbage\n"))
    with pytest.raises(exceptions.StreamError, match="not a JSON object"):
        sbx.run_code(script("[1, 2]\n"))


# -- clear errors ----------------------------------------------------------------------------------


def test_a_sandbox_without_a_code_interpreter_names_the_template_to_use(b: Backend) -> None:
    plain = Sandbox.connect(b.new("plain"), **b.c)
    try:
        with pytest.raises(exceptions.CodeInterpreterNotAvailableError) as ei:
            plain.run_code("1 + 1")
        msg = str(ei.value)
        assert "template ('plain') has no code interpreter" in msg
        assert "create it from template 'code-interpreter'" in msg and "port 49999" in msg
        assert ei.value.status_code == 502
        with pytest.raises(exceptions.CodeInterpreterNotAvailableError):
            plain.list_code_contexts()
    finally:
        plain.kill()


def test_a_killed_sandbox_is_not_found(b: Backend) -> None:
    s = Sandbox.connect(b.new(), **b.c)
    Sandbox.kill(s.sandbox_id, **b.c)
    with pytest.raises(exceptions.SandboxNotFoundError, match="was not found"):
        s.run_code("1")
    with pytest.raises(exceptions.SandboxNotFoundError):
        s.create_code_context()


def test_a_sandbox_killed_while_the_code_runs(b: Backend) -> None:
    s = Sandbox.connect(b.new(), **b.c)
    killer = threading.Timer(0.5, lambda: Sandbox.kill(s.sandbox_id, **b.c))
    killer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(exceptions.SandboxNotFoundError, match="stopped while the code ran|was not found"):
            s.run_code(script({"type": "stdout", "text": "x"}, 30))
        assert time.monotonic() - t0 < 10
    finally:
        killer.join()


def test_a_private_sandbox_needs_its_traffic_token(b: Backend) -> None:
    sid = b.new()
    sb = b.manager.get(sid)
    sb.allow_public_traffic, sb.traffic_access_token = False, "traffic-secret"
    s = Sandbox.connect(sid, **b.c)
    try:
        assert s.traffic_access_token == "traffic-secret"
        assert s.run_code("1").text == "ctx-python:1"
        assert "e2b-traffic-access-token" not in b.interp.last("/execute")["headers"]
        s.async_sandbox._info.traffic_access_token = None
        s.async_sandbox._interpreter_client = None
        with pytest.raises(exceptions.AuthenticationError, match="traffic access token.*private"):
            s.run_code("1")
    finally:
        s.kill()


def test_a_direct_sandbox_object_says_it_needs_the_backend(b: Backend) -> None:
    s = Sandbox.connect_direct("http://127.0.0.1:9")
    with pytest.raises(exceptions.SandboxError, match="needs the backend's proxy"):
        s.run_code("1")
    s.close()


# -- E2B's shape, asynchronous -----------------------------------------------------------------------


async def test_async_run_code_with_sync_and_async_callbacks(b: Backend) -> None:
    s = await AsyncSandbox.connect(b.new(), **b.c)
    try:
        seen: list[tuple[str, str]] = []

        async def on_stdout(m: OutputMessage) -> None:
            await asyncio.sleep(0.01)
            seen.append(("out", m.line))

        execution = await s.run_code(script(*STREAM), on_stdout=on_stdout, on_stderr=lambda m: seen.append(("err", m.line)),
                                     on_result=lambda r: seen.append(("res", str(r))),
                                     on_error=lambda e: seen.append(("error", e.name)))
        check_stream_execution(execution)
        assert seen == [("out", "first\n"), ("err", "careful\n"), ("res", "Result(<Figure size 40x30>)"),
                        ("out", "second"), ("res", "Result(42)"), ("error", "ValueError")]
        ctx = await s.create_code_context(language="bash")
        assert ctx in await s.list_code_contexts()
        await s.restart_code_context(ctx)
        await s.remove_code_context(ctx)
        assert ctx not in await s.list_code_contexts()
        with pytest.raises(exceptions.TimeoutError):
            await s.run_code(script(30), timeout=0.3)
        await asyncio.to_thread(b.wait_for, lambda: b.interp.interrupted == 1)
    finally:
        await s.kill()


async def test_cancelling_run_code_interrupts_the_cell(b: Backend) -> None:
    s = await AsyncSandbox.connect(b.new(), **b.c)
    try:
        task = asyncio.ensure_future(s.run_code(script({"type": "stdout", "text": "x"}, 30), timeout=0))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(b.wait_for, lambda: b.interp.interrupted == 1)
    finally:
        await s.kill()


# -- TrEnv-X's CodeInterpreter -----------------------------------------------------------------------


async def test_trenvx_code_interpreter_notebook(b: Backend) -> None:
    ci = await CodeInterpreter.create(template="tpl", **b.c)
    try:
        assert CodeInterpreter.template == "default-code-interpreter"
        assert ci.notebook.default_kernel_id == "ctx-python"
        out: list[ProcessMessage] = []
        err: list[ProcessMessage] = []
        results: list[Result] = []
        execution = await ci.notebook.exec_cell(script(*STREAM), on_stdout=out.append, on_stderr=err.append,
                                                on_result=results.append)
        check_stream_execution(execution)
        assert [type(m) for m in out + err] == [ProcessMessage] * 3
        assert [(m.line, m.error, m.timestamp) for m in out] == [("first\n", False, 1_700_000_000_000_000_000),
                                                                 ("second", False, 1_700_000_001_000_000_000)]
        assert err[0].error and err[0].line == "careful\n" and len(results) == 2
        assert isinstance(execution.error, Error) and execution.error.traceback_raw == ["Traceback...", "ValueError: bad"]
        # kernels
        kid = await ci.notebook.create_kernel(cwd="/tmp", kernel_name="ir")
        assert b.interp.last("/contexts")["body"] == {"language": "r", "cwd": "/tmp"}
        assert (await ci.notebook.exec_cell("1", kernel_id=kid)).text == f"{kid}:1"
        assert await ci.notebook.list_kernels() == ["ctx-python", "ctx-javascript", kid]
        await ci.notebook.restart_kernel()
        await ci.notebook.restart_kernel(kid)
        assert b.interp.restarts == ["ctx-python", kid]
        await ci.notebook.shutdown_kernel(kid)
        assert kid not in await ci.notebook.list_kernels()
        with pytest.raises(KernelException, match="was not found"):
            await ci.notebook.shutdown_kernel(kid)
        # TrEnv-X's timeouts: None waits as long as the cell runs
        assert (await ci.notebook.exec_cell(script(0.2, {"type": "stdout", "text": "ok"}), timeout=None)).logs.stdout == ["ok"]
        with pytest.raises(exceptions.TimeoutError):
            await ci.notebook.exec_cell(script(30), timeout=0.3)
        # the rest of the TrEnv-X sandbox is there
        assert ci.process is not None and ci.id == ci.sandbox_id
    finally:
        await ci.close()
    assert not b.alive(ci.id)


async def test_trenvx_connect_finds_the_default_kernel_when_needed(b: Backend) -> None:
    sid = b.new()
    ci = await CodeInterpreter.connect(sid, **b.c)
    try:
        with pytest.raises(KernelException, match="default kernel's id is not known"):
            ci.notebook.default_kernel_id
        await ci.notebook.restart_kernel()
        assert b.interp.restarts == ["ctx-python"] and ci.notebook.default_kernel_id == "ctx-python"
    finally:
        await ci.close()


async def test_trenvx_create_on_a_template_without_interpreter_fails_and_kills_it(b: Backend) -> None:
    before = {s.id for s in b.manager.list()}

    async def create() -> None:
        # A "plain" sandbox's port 49999 leads nowhere: as `Backend.new` does, once the backend made it.
        original = b.manager.create

        async def create_plain(*args: Any, **kwargs: Any) -> Any:
            sb = await original(*args, **kwargs)
            sb.ports[INTERPRETER_PORT] = free_port()
            return sb

        b.manager.create = create_plain
        try:
            await CodeInterpreter.create(template="plain", **b.c)
        finally:
            del b.manager.create

    with pytest.raises(exceptions.CodeInterpreterNotAvailableError, match="'plain'.*'code-interpreter'"):
        await create()
    await asyncio.to_thread(b.wait_for, lambda: {s.id for s in b.manager.list()} == before)


# -- the CLI ------------------------------------------------------------------------------------------


def cli(b: Backend, *args: str, input: str | None = None) -> Any:
    from typer.testing import CliRunner

    from trenvx.cli import sandbox_cli

    sandbox_cli._target.as_json = False  # the CLI keeps its options in a module-level target
    return CliRunner().invoke(
        sandbox_cli.app, ["-i", "127.0.0.1", "-p", str(b.port), *args], input=input, catch_exceptions=False)


def test_cli_run_code_saves_images_prints_results_and_streams(b: Backend, sbx: Sandbox, tmp_path: Path) -> None:
    code = script({"type": "stdout", "text": "hello\n"}, {"type": "stderr", "text": "warn\n"},
                  {"type": "result", "text": "<Figure size 40x30>", "png": PNG},
                  {"type": "result", "svg": "<svg/>", "pdf": base64.b64encode(b"%PDF-1.4").decode(),
                   "html": "<table>" + "x" * 100 + "</table>", "markdown": "**m**"},
                  {"type": "result", "text": "42", "is_main_result": True})
    (tmp_path / f"{sbx.sandbox_id}-1.png").write_bytes(b"older")  # never overwritten
    r = cli(b, "sandbox", "run-code", sbx.sandbox_id, code, "--out-dir", str(tmp_path))
    assert r.exit_code == 0, r.stdout + r.stderr
    sid = sbx.sandbox_id
    assert png_size((tmp_path / f"{sid}-2.png").read_bytes()) == (40, 30)
    assert (tmp_path / f"{sid}-3.svg").read_text() == "<svg/>"
    assert (tmp_path / f"{sid}-4.pdf").read_bytes() == b"%PDF-1.4"
    assert (tmp_path / f"{sid}-1.png").read_bytes() == b"older"
    lines = r.stdout.splitlines()
    assert lines[0] == "hello" and f"saved png to {tmp_path / f'{sid}-2.png'}" in lines
    assert "<Figure size 40x30>" in lines and "[html: 115 characters]" in lines and "[markdown: 5 characters]" in lines
    assert lines[-1] == "42" and r.stderr == "warn\n"


def test_cli_run_code_error_json_language_context_and_stdin(b: Backend, sbx: Sandbox, tmp_path: Path) -> None:
    failing = script({"type": "stdout", "text": "before\n"},
                     {"type": "error", "name": "ZeroDivisionError", "value": "division by zero",
                      "traceback": "Traceback (most recent call last):\n  1/0\nZeroDivisionError: division by zero"})
    r = cli(b, "sandbox", "run-code", sbx.sandbox_id, failing, "-o", str(tmp_path))
    assert r.exit_code == 1 and r.stdout == "before\n"
    assert r.stderr.endswith("ZeroDivisionError: division by zero\n") and "1/0" in r.stderr
    r = cli(b, "--json", "sandbox", "run-code", sbx.sandbox_id, failing, "-o", str(tmp_path))
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert data["error"]["name"] == "ZeroDivisionError" and data["logs"]["stdout"] == ["before\n"]
    assert data["files"] == []
    r = cli(b, "--json", "sandbox", "run-code", sbx.sandbox_id, script({"type": "result", "png": PNG}), "-o",
            str(tmp_path))
    assert r.exit_code == 0 and json.loads(r.stdout)["files"] == [str(tmp_path / f"{sbx.sandbox_id}-1.png")]
    r = cli(b, "sandbox", "run-code", sbx.sandbox_id, "1", "--language", "javascript", "--timeout", "5",
            "-e", "A=1")
    assert r.exit_code == 0 and r.stdout == "ctx-javascript:1\n"
    assert b.interp.last("/execute")["body"]["env_vars"] == {"A": "1"}
    r = cli(b, "sandbox", "run-code", sbx.sandbox_id, "-", "--context", "ctx-python", input="from stdin")
    assert r.stdout == "ctx-python:from stdin\n"
    r = cli(b, "sandbox", "run-code", sbx.sandbox_id, "1", "--language", "r", "--context", "ctx-python")
    assert r.exit_code == 2 and "not both" in r.stderr


def test_cli_run_code_clear_errors(b: Backend, tmp_path: Path) -> None:
    plain = b.new("plain")
    r = cli(b, "sandbox", "run-code", plain, "1")
    assert r.exit_code == 1 and "create it from template 'code-interpreter'" in r.stderr
    r = cli(b, "sandbox", "run-code", "no-such-sandbox", "1")
    assert r.exit_code == 1 and "no-such-sandbox' does not exist" in r.stderr
    sid = b.new()
    r = cli(b, "sandbox", "run-code", sid, script(30), "--timeout", "0.3")
    assert r.exit_code == 1 and "timeout of 0.3 s" in r.stderr
    for s in (plain, sid):
        Sandbox.kill(s, **b.c)


# -- E2B's own client reads the same -----------------------------------------------------------------


def e2b_lines() -> list[str]:
    lines = [json.dumps(s) for s in STREAM if not isinstance(s, (int, float))]
    return lines + [json.dumps({"type": "result", "png": PNG}), json.dumps({"type": "end_of_execution"}),
                    json.dumps({"type": "something_new"})]


def test_e2b_code_interpreters_models_and_ours_read_lines_the_same() -> None:
    models = pytest.importorskip("e2b_code_interpreter.models")
    theirs, ours = models.Execution(), Execution()
    their_calls: list[Any] = []
    our_calls: list[Any] = []
    for line in e2b_lines():
        models.parse_output(theirs, line, on_stdout=their_calls.append, on_stderr=their_calls.append,
                            on_result=their_calls.append, on_error=their_calls.append)
        kind, value = apply_line(ours, line)
        if kind is not None:
            our_calls.append(value)
    assert_same_execution(theirs, ours)
    assert len(their_calls) == len(our_calls)
    for t, o in zip(their_calls, our_calls):
        assert type(t).__name__ == type(o).__name__
        if isinstance(o, OutputMessage):
            assert (t.line, t.timestamp, t.error) == (o.line, o.timestamp, o.error)


def assert_same_execution(theirs: Any, ours: Execution) -> None:
    assert theirs.logs.stdout == ours.logs.stdout and theirs.logs.stderr == ours.logs.stderr
    assert theirs.execution_count == ours.execution_count and theirs.text == ours.text
    assert (theirs.error.name, theirs.error.value, theirs.error.traceback) == (
        ours.error.name, ours.error.value, ours.error.traceback)
    assert len(theirs.results) == len(ours.results)
    for t, o in zip(theirs.results, ours.results):
        assert list(t.formats()) == o.formats()
        for name in ("text", "html", "markdown", "svg", "png", "jpeg", "pdf", "latex", "json", "javascript", "data",
                     "is_main_result", "extra"):
            assert getattr(t, name) == getattr(o, name), name
        assert (t.chart.to_dict() if t.chart else None) == (o.chart.to_dict() if o.chart else None)


def test_unmodified_e2b_code_interpreter_through_the_same_proxy(b: Backend, monkeypatch) -> None:
    e2b_ci = pytest.importorskip("e2b_code_interpreter")
    for k, v in (("E2B_API_URL", b.url), ("E2B_SANDBOX_URL", b.url), ("E2B_API_KEY", "any")):
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("E2B_DEBUG", raising=False)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    sid = b.new()
    theirs = e2b_ci.Sandbox.connect(sid)
    mine = Sandbox.connect(sid, **b.c)
    try:
        code = script(*STREAM[:3], *STREAM[4:], {"type": "result", "png": PNG})
        assert_same_execution(theirs.run_code(code), mine.run_code(code))
        assert b.interp.last("/execute")["body"] == b.interp.requests[-2]["body"]
        ctx = theirs.create_code_context(cwd="/tmp")
        assert Context(ctx.id, ctx.language, ctx.cwd) in mine.list_code_contexts()
        assert mine.run_code("1", context=ctx.id).text == theirs.run_code("1", context=ctx).text
    finally:
        mine.kill()
