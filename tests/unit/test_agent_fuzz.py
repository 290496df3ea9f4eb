"""Hostile input to the guest agent from a client that holds its access token (issue 18, item 4).

The agent runs on the host as a plain process (tests/unit/test_agent_harness.py) with an access
token set. Every test sends what a broken or malicious client could send on a raw socket:
Connect envelopes whose lengths and flags lie, gzip bombs, JSON that is not JSON or has the wrong
types or is nested or repeated into a memory bomb, messages at the size limit and one byte past,
slow clients, many connections. The agent must answer each with an error (a Connect error code,
an HTTP 4xx, or a closed connection when the framing itself is broken), never a 5xx or an
``internal`` code for a client's mistake, and must stay up: every test ends with a normal request
answered at once (:func:`assert_responsive`), and the agent's memory stays bounded.

Only methods that read, or that act on the agent's own processes and watchers, are fuzzed with
generated values: the agent runs as root on the host here, and a generated ``MakeDir``/``Remove``
or ``Start`` would act on the host.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.unit.test_agent_harness import AgentProcess, start_agent
from trenvx.guest.agent.connect import MAX_MESSAGE_BYTES, MAX_MESSAGE_VALUES

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the agent tests run as root (like the guest)")

TOKEN = "fuzz-token-7f3a"
STREAM_TYPE = "application/connect+json"
UNARY_TYPE = "application/json"
CONNECT_CODES = {"canceled", "unknown", "invalid_argument", "deadline_exceeded", "not_found", "already_exists",
                 "permission_denied", "resource_exhausted", "failed_precondition", "aborted", "out_of_range",
                 "unimplemented", "internal", "unavailable", "data_loss", "unauthenticated"}
SERVER_FAULT_CODES = {"internal", "unknown", "data_loss"}
"""Codes that say the agent failed, not the client: never the answer to a client's bad input."""
MEMORY_LIMIT_MB = 400
"""The agent's RSS after every test here: a 64 MiB message at the limit is parsed, no more."""

# Methods whose generated calls are harmless on the host: they read, or touch only what the agent started.
SAFE_UNARY = ["/filesystem.Filesystem/Stat", "/filesystem.Filesystem/ListDir", "/process.Process/List",
              "/process.Process/SendInput", "/process.Process/CloseStdin", "/process.Process/Update",
              "/filesystem.Filesystem/GetWatcherEvents", "/filesystem.Filesystem/RemoveWatcher"]
SAFE_STREAMS = ["/process.Process/Connect", "/process.Process/StreamInput"]


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """One agent for the module, its access token set by /init as the server sets it."""
    a = start_agent(tmp_path_factory.mktemp("agent-fuzz"), "--skip", "all")
    reply = exchange(a, request("/init", json.dumps({"accessToken": TOKEN}).encode(), UNARY_TYPE, token=None))
    assert reply.status == 204, reply
    yield a
    a.stop()


# ---------------------------------------------------------------------------------------- helpers


class Reply:
    """An HTTP answer read off a raw socket (``status`` 0 when the agent closed without one)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        try:
            self.status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            self.status = 0
        self.headers = {k.strip().lower(): v.strip() for k, _, v in
                        (line.decode("latin-1").partition(":") for line in lines[1:])}
        self.body = _dechunk(body) if self.headers.get("transfer-encoding") == "chunked" else body

    def envelopes(self) -> list[tuple[int, dict]]:
        out, data = [], self.body
        while len(data) >= 5:
            flags, length = struct.unpack(">BI", data[:5])
            out.append((flags, json.loads(data[5:5 + length])))
            data = data[5 + length:]
        return out

    def error_code(self) -> str | None:
        """The Connect error code of the answer: the end-stream envelope's, or the unary JSON's."""
        if self.headers.get("content-type") == STREAM_TYPE:
            envs = self.envelopes()
            assert envs and envs[-1][0] & 0x02, f"a stream must end with an end-stream envelope: {self.raw[:300]!r}"
            return (envs[-1][1].get("error") or {}).get("code")
        if self.status >= 400 and self.body:
            return json.loads(self.body).get("code")
        return None

    def __repr__(self) -> str:
        return f"Reply({self.raw[:300]!r})"


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line or b"0", 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return bytes(out)


def request(path: str, body: bytes, content_type: str, *, token: str | None = TOKEN, extra: str = "",
            length: int | None = None) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: agent\r\nContent-Type: {content_type}\r\nConnect-Protocol-Version: 1\r\n"
    if token is not None:
        head += f"X-Access-Token: {token}\r\n"
    head += f"{extra}Content-Length: {len(body) if length is None else length}\r\n\r\n"
    return head.encode() + body


def envelope(message: bytes | dict, flags: int = 0, length: int | None = None) -> bytes:
    data = message if isinstance(message, bytes) else json.dumps(message).encode()
    return struct.pack(">BI", flags, len(data) if length is None else length) + data


def exchange(agent: AgentProcess, payload: bytes, timeout: float = 20) -> Reply:
    """Send ``payload``, half-close, read the answer until the agent closes."""
    with socket.create_connection(("127.0.0.1", agent.port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                data = s.recv(1 << 20)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
    return Reply(b"".join(chunks))


def assert_responsive(agent: AgentProcess, within_s: float = 2.0) -> None:
    """The agent is up and answers an authorised normal request at once."""
    assert agent.alive(), agent.log()[-3000:]
    started = time.monotonic()
    reply = exchange(agent, request("/process.Process/List", b"{}", UNARY_TYPE))
    took = time.monotonic() - started
    assert reply.status == 200 and isinstance(json.loads(reply.body).get("processes", []), list), reply
    assert took < within_s, f"a normal request took {took:.2f} s"
    rss_mb = psutil.Process(agent.pid).memory_info().rss >> 20
    assert rss_mb < MEMORY_LIMIT_MB, f"agent RSS {rss_mb} MiB"


def assert_client_error(reply: Reply, *codes: str) -> None:
    """An error answer that blames the client: 4xx or a stream ending in a non-server Connect code."""
    assert reply.status != 0, "the agent closed the connection without an answer"
    assert reply.status < 500, reply
    code = reply.error_code()
    assert code is not None, f"expected an error, got {reply}"
    assert code in CONNECT_CODES or isinstance(code, int), reply
    assert code not in SERVER_FAULT_CODES, reply
    if codes:
        assert code in codes, reply


# ---------------------------------------------------------------------------------------- envelopes

START = "/process.Process/Start"
HARMLESS = {"process": {"cmd": "/bin/true"}}


@pytest.mark.parametrize(("name", "body", "extra", "codes"), [
    ("length past the body", envelope(b"{}", length=100), "", ("invalid_argument",)),
    ("length short of the body", envelope(b'{"process":{"cmd":"/bin/true"}}', length=5), "", ("invalid_argument",)),
    ("huge declared length", envelope(b"{}", length=0xFFFFFFFF), "", ("resource_exhausted",)),
    ("length one past the limit", envelope(b"{}", length=MAX_MESSAGE_BYTES + 1), "", ("resource_exhausted",)),
    ("truncated header", b"\x00\x00\x00", "", ("invalid_argument",)),
    ("no message", b"", "", ("invalid_argument",)),
    ("unknown flag bits", envelope(HARMLESS, flags=0x04), "", ("invalid_argument",)),
    ("every flag bit", envelope(HARMLESS, flags=0xFF), "", ("invalid_argument",)),
    ("compressed, no encoding", envelope(HARMLESS, flags=0x01), "", ()),
    ("compressed, not gzip", envelope(b"not gzip at all", flags=0x01), "Connect-Content-Encoding: gzip\r\n",
     ("invalid_argument",)),
    ("compressed, truncated gzip", envelope(gzip.compress(json.dumps(HARMLESS).encode())[:-6], flags=0x01),
     "Connect-Content-Encoding: gzip\r\n", ("invalid_argument",)),
    ("gzip bomb", envelope(gzip.compress(b" " * (MAX_MESSAGE_BYTES + (8 << 20)), 1), flags=0x01),
     "Connect-Content-Encoding: gzip\r\n", ("resource_exhausted",)),
    ("unknown encoding", envelope(HARMLESS, flags=0x01), "Connect-Content-Encoding: br\r\n", ()),
    ("not JSON", envelope(b"{nope"), "", ("invalid_argument",)),
    ("not an object", envelope(b"[1,2]"), "", ("invalid_argument",)),
    ("invalid UTF-8", envelope(b'{"process":{"cmd":"\xff\xfe"}}'), "", ("invalid_argument",)),
    ("lone surrogate", envelope(b'{"process":{"cmd":"/bin/\\ud800"}}'), "", ("invalid_argument",)),
    ("deep nesting", envelope(b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"), "", ("invalid_argument",)),
    ("wrong types", envelope({"process": {"cmd": ["x"], "args": {"a": 1}}}), "", ("invalid_argument",)),
    ("wrong nested types", envelope({"process": {"cmd": "/bin/true", "envs": {"A": 1}}}), "", ("invalid_argument",)),
    ("bad protocol version", envelope(HARMLESS), "Connect-Protocol-Version: 7\r\n", ("invalid_argument",)),
    ("bad timeout", envelope(HARMLESS), "Connect-Timeout-Ms: soon\r\n", ("invalid_argument",)),
], ids=lambda v: v if isinstance(v, str) and " " in v or v == "no message" else "")
def test_malformed_stream_requests_get_connect_errors(agent: AgentProcess, name: str, body: bytes, extra: str,
                                                      codes: tuple[str, ...]) -> None:
    if "Connect-Protocol-Version" in extra:  # the request() default would come first
        payload = request(START, body, STREAM_TYPE).replace(b"Connect-Protocol-Version: 1", extra.strip().encode())
    else:
        payload = request(START, body, STREAM_TYPE, extra=extra)
    reply = exchange(agent, payload)
    assert reply.status == 200 and reply.headers["content-type"] == STREAM_TYPE, reply
    if codes:
        assert_client_error(reply, *codes)
    else:  # a compressed message it cannot read: Connect says "internal" for an encoding never negotiated
        assert reply.error_code() in ("internal", "unimplemented", "invalid_argument"), reply
    assert_responsive(agent)


def test_unknown_fields_are_ignored(agent: AgentProcess) -> None:
    """Protobuf's JSON mapping: a field the agent does not know is skipped, not an error."""
    body = json.dumps({"process": {"cmd": "/bin/true", "futureField": {"x": [1, 2]}}, "alsoUnknown": 5}).encode()
    reply = exchange(agent, request(START, envelope(body), STREAM_TYPE))
    envs = reply.envelopes()
    assert envs[-1] == (2, {}), reply
    assert any("end" in m.get("event", {}) for _, m in envs)
    reply = exchange(agent, request("/process.Process/List", b'{"whatever": [1, {"a": null}]}', UNARY_TYPE))
    assert reply.status == 200, reply


def test_client_stream_cut_between_and_inside_envelopes(agent: AgentProcess) -> None:
    """StreamInput whose envelopes stop short (the client died): an error end, the thread goes."""
    start = envelope({"start": {"process": {"pid": 999_999}}})
    for tail in (b"", b"\x00\x00", envelope(b'{"data":{}}')[:9]):
        reply = exchange(agent, request("/process.Process/StreamInput", start + tail, STREAM_TYPE))
        assert_client_error(reply)
    assert_responsive(agent)


# ---------------------------------------------------------------------------------------- sizes


def padded_send_input(size: int) -> bytes:
    """A SendInput message of exactly ``size`` bytes (its stdin one big base64 string)."""
    prefix, suffix = b'{"process":{"pid":999999},"input":{"stdin":"', b'"}}'
    return prefix + b"A" * (size - len(prefix) - len(suffix)) + suffix


def test_unary_message_at_the_limit_is_read_and_one_byte_more_is_refused(agent: AgentProcess) -> None:
    reply = exchange(agent, request("/process.Process/SendInput", padded_send_input(MAX_MESSAGE_BYTES), UNARY_TYPE))
    assert_client_error(reply, "not_found")  # read and parsed: the pid does not exist
    reply = exchange(agent, request("/process.Process/SendInput", padded_send_input(MAX_MESSAGE_BYTES + 1),
                                    UNARY_TYPE))
    assert_client_error(reply, "resource_exhausted")
    assert_responsive(agent)


def test_stream_message_at_the_limit_is_read(agent: AgentProcess) -> None:
    prefix, suffix = b'{"start":{"process":{"pid":999999}},"padding":"', b'"}'
    body = prefix + b"A" * (MAX_MESSAGE_BYTES - len(prefix) - len(suffix)) + suffix
    reply = exchange(agent, request("/process.Process/StreamInput", envelope(body), STREAM_TYPE))
    assert_client_error(reply)
    assert reply.error_code() != "resource_exhausted"
    assert_responsive(agent)


@pytest.mark.parametrize("element", [b'"ab",', b"1.5,", b"{},", b'{"a":1},'])
def test_many_small_values_are_refused_before_they_take_memory(agent: AgentProcess, element: bytes) -> None:
    """A message of small values takes ~14x its size once parsed: past MAX_MESSAGE_VALUES it is refused."""
    count = MAX_MESSAGE_VALUES * 2
    body = b'{"path":"/","x":[' + element * count + b"0]}"
    reply = exchange(agent, request("/filesystem.Filesystem/Stat", body, UNARY_TYPE))
    assert_client_error(reply, "resource_exhausted")
    assert_responsive(agent)


# ---------------------------------------------------------------------------------------- generated input

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                         st.floats(allow_nan=False), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
FIELD_NAMES = ["process", "pid", "tag", "cmd", "args", "envs", "cwd", "path", "depth", "input", "stdin", "pty",
               "size", "cols", "rows", "signal", "watcherId", "start", "data", "keepalive", "recursive", "stdout"]
# Paths are kept to a directory of no interest, or to values that are not paths at all.
SAFE_PATHS = st.sampled_from(["/proc/self/fd", "/nonexistent/x", "", "relative/x", "/dev/null", "\x00"])
messages = st.recursive(
    st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=4),
    lambda inner: st.dictionaries(st.sampled_from(FIELD_NAMES), inner, max_size=3),
    max_leaves=8,
)


def _safe(message: dict) -> dict:
    if "path" in message and isinstance(message["path"], str):
        message["path"] = "/nonexistent/" + message["path"].lstrip("/")
    if "depth" in message:  # no walk of the host's filesystem
        message["path"] = "/nonexistent"
    return message


@seed(20261130)
@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(method=st.sampled_from(SAFE_UNARY), message=messages, path=SAFE_PATHS)
def test_generated_unary_messages_get_client_errors(agent: AgentProcess, method: str, message: dict,
                                                   path: str) -> None:
    message = _safe(message)
    if method.startswith("/filesystem.Filesystem/") and "path" not in message:
        message["path"] = path
    reply = exchange(agent, request(method, json.dumps(message).encode(), UNARY_TYPE))
    assert reply.status != 0 and reply.status < 500, (message, reply)
    if reply.status >= 400:
        assert_client_error(reply)


@seed(20261130)
@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(method=st.sampled_from(SAFE_STREAMS + SAFE_UNARY), body=st.binary(max_size=64),
       flags=st.integers(0, 255), declared=st.one_of(st.none(), st.integers(0, 2**32 - 1)))
def test_generated_frames_get_answers_not_crashes(agent: AgentProcess, method: str, body: bytes, flags: int,
                                                 declared: int | None) -> None:
    """Random bytes in envelopes whose flags and lengths are random: an error answer every time."""
    stream = method in SAFE_STREAMS
    data = envelope(body, flags, declared) if stream else body
    reply = exchange(agent, request(method, data, STREAM_TYPE if stream else UNARY_TYPE))
    assert reply.status != 0 and reply.status < 500, reply
    if stream:
        assert reply.error_code() not in SERVER_FAULT_CODES - {"internal"} or flags & 0x01, reply
        if not flags & 0x01:  # "internal" only for a compressed flag without an encoding (Connect's rule)
            assert reply.error_code() != "internal", reply


def test_agent_survives_the_generated_input(agent: AgentProcess) -> None:
    assert_responsive(agent)
    assert "Traceback" not in agent.log(), agent.log()[-4000:]


# ---------------------------------------------------------------------------------------- slow and many clients


def _drip(port: int, payload: bytes, interval_s: float, stop: threading.Event) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            for i in range(len(payload)):
                if stop.is_set():
                    return
                s.sendall(payload[i:i + 1])
                time.sleep(interval_s)
    except OSError:
        pass


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_slow_clients_do_not_hold_up_others(agent: AgentProcess, phase: str) -> None:
    """Slowloris: 30 clients send their head (or their body) a byte at a time; a normal request is
    answered at once meanwhile, and when they stop the agent's threads go back to what they were."""
    threads_before = psutil.Process(agent.pid).num_threads()
    body = json.dumps({"process": {"pid": 1}, "input": {"stdin": "QUJD"}}).encode()
    full = request("/process.Process/SendInput", body, UNARY_TYPE)
    head_len = full.index(b"\r\n\r\n") + 4
    stop = threading.Event()
    drippers = []
    for _ in range(30):
        if phase == "headers":
            t = threading.Thread(target=_drip, args=(agent.port, full, 0.05, stop), daemon=True)
        else:
            t = threading.Thread(target=_drip_body, args=(agent.port, full[:head_len], full[head_len:], stop),
                                 daemon=True)
        t.start()
        drippers.append(t)
    try:
        time.sleep(0.5)
        for _ in range(5):
            assert_responsive(agent, within_s=1.0)
    finally:
        stop.set()
        for t in drippers:
            t.join(10)
    deadline = time.monotonic() + 10
    while psutil.Process(agent.pid).num_threads() > threads_before + 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert psutil.Process(agent.pid).num_threads() <= threads_before + 4


def _drip_body(port: int, head: bytes, body: bytes, stop: threading.Event) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(head)
            for i in range(len(body)):
                if stop.is_set():
                    return
                s.sendall(body[i:i + 1])
                time.sleep(0.05)
    except OSError:
        pass


def test_many_idle_connections(agent: AgentProcess) -> None:
    """300 connections opened and left idle: the agent answers others at once, and its memory per
    idle connection (a thread each) stays small; closing them gives the threads back."""
    proc = psutil.Process(agent.pid)
    rss_before = proc.memory_info().rss
    socks = []
    try:
        for _ in range(300):
            socks.append(socket.create_connection(("127.0.0.1", agent.port), timeout=10))
        time.sleep(0.5)
        assert_responsive(agent, within_s=1.0)
        grew_kib = (proc.memory_info().rss - rss_before) >> 10
        print(f"\n300 idle connections: {proc.num_threads()} threads, RSS +{grew_kib} KiB")
        assert grew_kib < 300 * 256, f"{grew_kib} KiB for 300 idle connections"
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 10
    while proc.num_threads() > 40 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.num_threads() <= 40
    assert_responsive(agent)


def test_garbage_before_and_instead_of_http(agent: AgentProcess) -> None:
    for payload in (b"\x16\x03\x01\x02\x00" + os.urandom(200), b"GET / HTTP/9.9\r\n\r\n",
                    b"POST /process.Process/List HTTP/1.1\r\n" + b"X-Long: " + b"a" * 70_000 + b"\r\n\r\n",
                    b"POST /process.Process/List HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
                    b"POST /process.Process/List HTTP/1.1\r\nTransfer-Encoding: chunked\r\nX-Access-Token: "
                    + TOKEN.encode() + b"\r\nContent-Type: application/json\r\n\r\nfffffffffffffffffff\r\n"):
        reply = exchange(agent, payload)
        assert reply.status in (0, 400, 413, 414, 431, 505), reply
    assert_responsive(agent)


def test_the_token_is_still_required_for_hostile_requests(agent: AgentProcess) -> None:
    """The fuzzing above used the token; the same malformed input without it is a 401, unread."""
    reply = exchange(agent, request(START, envelope(b"{}", length=0xFFFFFFFF), STREAM_TYPE, token=None))
    assert reply.status == 401
    reply = exchange(agent, request(START, envelope(HARMLESS), STREAM_TYPE, token=TOKEN + "x"))
    assert reply.status == 401
    assert_responsive(agent)


def test_files_api_hostile_queries(agent: AgentProcess, tmp_path: Path) -> None:
    """/files with broken queries and bodies: 4xx, never a crash."""
    target = "/nonexistent/dir/f"
    cases = [
        f"GET /files HTTP/1.1\r\nX-Access-Token: {TOKEN}\r\n\r\n",
        f"GET /files?path=%ff%fe HTTP/1.1\r\nX-Access-Token: {TOKEN}\r\n\r\n",
        f"GET /files?path={target}&path=/x&username=%00 HTTP/1.1\r\nX-Access-Token: {TOKEN}\r\n\r\n",
        f"POST /files?path={target} HTTP/1.1\r\nX-Access-Token: {TOKEN}\r\nContent-Type: multipart/form-data; "
        f"boundary=zz\r\nContent-Length: 20\r\n\r\n--zz\r\nbroken\r\n\r\n\r\n",
        f"POST /files?path={target} HTTP/1.1\r\nX-Access-Token: {TOKEN}\r\nContent-Type: multipart/form-data"
        f"\r\nContent-Length: 4\r\n\r\nabcd",
        f"GET /files?path={target}&signature=v1_x&signature_expiration=-1 HTTP/1.1\r\n\r\n",
    ]
    for payload in cases:
        reply = exchange(agent, payload.encode("latin-1"))
        assert 400 <= reply.status < 500, (payload, reply)
    assert_responsive(agent)


def test_base64_stdin_garbage(agent: AgentProcess) -> None:
    for stdin in ("%%%", "QQ", base64.b64encode(b"x").decode() + "!", 12):
        body = json.dumps({"process": {"pid": 999_999}, "input": {"stdin": stdin}}).encode()
        assert_client_error(exchange(agent, request("/process.Process/SendInput", body, UNARY_TYPE)))
    assert_responsive(agent)
