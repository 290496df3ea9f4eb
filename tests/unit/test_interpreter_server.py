"""The guest's code-interpreter server (src/trenvx/guest/interpreter), run on the host.

The server runs as a subprocess (``python -m trenvx.guest.interpreter``, the same code the guest
runs as ``trenvx_interpreter``) with real Jupyter kernels: ipykernel for python, bash_kernel for
bash (its kernel spec installed by this module into a temporary prefix). The tests drive it
over HTTP as E2B's code-interpreter client does, and parse its lines with that client's own
parser when the package is installed. The reseed logic (a restore from a snapshot) is also
unit-tested with fakes, and through a real kernel by changing the machine-id file the server
watches.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import pwd
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from trenvx.guest.interpreter import identity, languages, outputs
from trenvx.guest.interpreter.identity import IdentityWatch, reseed_if_identity_changed
from trenvx.guest.interpreter.kernel import Execution, Kernel, LaunchSettings
from trenvx.guest.interpreter.users import resolve_user

SRC = Path(__file__).resolve().parents[2] / "src"
HAVE_BASH_KERNEL = importlib.util.find_spec("bash_kernel") is not None
START_TIMEOUT_S = 120


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    machine_id: Path
    home: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kernel_pids(self) -> list[int]:
        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def bash_kernel_prefix(tmp: Path) -> Path | None:
    """Install bash_kernel's kernel spec into ``tmp`` (JUPYTER_PATH points there); None without it."""
    if not HAVE_BASH_KERNEL:
        return None
    subprocess.run([sys.executable, "-m", "bash_kernel.install", "--prefix", str(tmp)], check=True,
                   capture_output=True, timeout=120)
    return tmp / "share" / "jupyter"


def start_server(tmp: Path, *extra: str, python: str = sys.executable, jupyter_path: Path | None = None,
                 wait: bool = True) -> Server:
    port = free_port()
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    machine_id = tmp / "machine-id"
    if not machine_id.exists():
        machine_id.write_text("0" * 32 + "\n")
    log_path = tmp / f"interpreter-{port}.log"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    if jupyter_path is not None:
        env["JUPYTER_PATH"] = str(jupyter_path)
    argv = [python, "-m", "trenvx.guest.interpreter", "--host", "127.0.0.1", "--port", str(port),
            "--runtime-dir", str(tmp / "runtime"), "--cwd", str(home), "--machine-id-file", str(machine_id),
            "--log-level", "DEBUG", *extra]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, port, log_path, machine_id, home)
    if not wait:
        return server
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"interpreter exited early ({proc.returncode}):\n{server.log()}")
        try:
            health = httpx.get(server.url + "/health", timeout=2)
            if health.status_code == 200:
                return server
            if "did not start" in health.text:
                server.stop()
                raise RuntimeError(f"interpreter's kernel did not start: {health.text}\n{server.log()}")
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"interpreter did not become healthy:\n{server.log()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("interpreter")
    s = start_server(tmp, jupyter_path=bash_kernel_prefix(tmp / "jupyter"))
    yield s
    pids = s.kernel_pids()
    s.stop()
    assert s.proc.returncode == 0, s.log()
    # The server stops its kernels when it stops (they do not watch their parent).
    time.sleep(0.2)
    assert [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE] == []


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def execute(http: httpx.Client, code: str, **fields: Any) -> list[dict[str, Any]]:
    """POST /execute and the parsed lines (asserting the stream's shape)."""
    with http.stream("POST", "/execute", json={"code": code, **fields}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("application/x-ndjson")
        assert response.headers.get("transfer-encoding") == "chunked"
        lines = [json.loads(line) for line in response.iter_lines() if line.strip()]
    assert lines and lines[-1] == {"type": "end_of_execution"}
    assert [line for line in lines if line["type"] == "end_of_execution"] == [lines[-1]]
    return lines


def of_type(lines: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["type"] == kind]


def stdout(lines: list[dict[str, Any]]) -> str:
    return "".join(line["text"] for line in of_type(lines, "stdout"))


def main_result(lines: list[dict[str, Any]]) -> dict[str, Any]:
    results = [line for line in of_type(lines, "result") if line["is_main_result"]]
    assert len(results) == 1, lines
    return results[0]


def value(http: httpx.Client, expression: str, **fields: Any) -> Any:
    """The value of a python expression, through JSON on stdout (IPython pretty-prints long values)."""
    lines = execute(http, f"import json as _json\nprint(_json.dumps({expression}))", **fields)
    assert not of_type(lines, "error"), lines
    return json.loads(stdout(lines))


def png_size(data_b64: str) -> tuple[int, int]:
    data = base64.b64decode(data_b64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# ---------------------------------------------------------------------------------- over HTTP

def test_health(http: httpx.Client) -> None:
    response = http.get("/health")
    assert response.status_code == 200
    assert response.text == "OK"


def test_state_across_cells_stdout_and_value(http: httpx.Client) -> None:
    lines = execute(http, "x = 41\nprint('hello')\nx + 1")
    assert stdout(lines) == "hello\n"
    assert main_result(lines)["text"] == "42"
    stamp = of_type(lines, "stdout")[0]["timestamp"]
    assert isinstance(stamp, int) and abs(stamp - time.time_ns()) < 60e9  # Unix nanoseconds, as E2B's
    counts = of_type(lines, "number_of_executions")
    lines = execute(http, "print(x * 2)")
    assert stdout(lines) == "82\n"
    assert of_type(lines, "number_of_executions")[0]["execution_count"] == counts[0]["execution_count"] + 1


def test_a_silent_cell_runs_without_output_or_count(http: httpx.Client) -> None:
    """trenvx's pools warm a sandbox's request path with a silent cell: it runs, gives no result
    and no execution count (what it prints still streams), and the user's first cell still
    counts as the next one."""
    before = of_type(execute(http, "1"), "number_of_executions")[0]["execution_count"]
    lines = execute(http, "warmed = 6 * 7\nwarmed", silent=True)
    assert lines == [{"type": "end_of_execution"}], lines
    after = execute(http, "warmed")
    assert main_result(after)["text"] == "42", "the silent cell ran"
    assert of_type(after, "number_of_executions")[0]["execution_count"] == before + 1


def test_the_default_kernel_has_numpy_pandas_and_matplotlib_loaded(http: httpx.Client, server: Server) -> None:
    loaded = value(http, "[sorted(m for m in ('numpy', 'pandas', 'matplotlib.pyplot') "
                         "if m in __import__('sys').modules), __import__('os').getcwd()]")
    assert loaded == [["matplotlib.pyplot", "numpy", "pandas"], str(server.home)]


def test_stdout_arrives_while_the_cell_runs(http: httpx.Client) -> None:
    code = "import time\nprint('first', flush=True)\ntime.sleep(2)\nprint('second')"
    arrivals: list[tuple[float, dict[str, Any]]] = []
    with http.stream("POST", "/execute", json={"code": code}) as response:
        assert response.status_code == 200
        for raw in response.iter_lines():
            if raw.strip():
                arrivals.append((time.monotonic(), json.loads(raw)))
    texts = [(at, line["text"]) for at, line in arrivals if line["type"] == "stdout"]
    assert [t for _, t in texts] == ["first\n", "second\n"]
    assert texts[1][0] - texts[0][0] > 1.5, "the first line came only with the end of the cell"


def test_dataframe_gives_html_and_text(http: httpx.Client) -> None:
    lines = execute(http, "import pandas as pd\npd.DataFrame({'alpha': [1, 2], 'beta': ['x', 'y']})")
    result = main_result(lines)
    assert "<table" in result["html"] and "alpha" in result["html"] and "beta" in result["html"]
    assert "alpha" in result["text"]
    assert "png" not in result


def test_matplotlib_show_gives_a_png_of_the_figure_size(http: httpx.Client) -> None:
    lines = execute(http, "import matplotlib.pyplot as plt\nplt.figure(figsize=(4, 3), dpi=100)\n"
                          "plt.plot([1, 3, 2])\nplt.show()")
    results = of_type(lines, "result")
    assert len(results) == 1 and results[0]["is_main_result"] is False
    assert png_size(results[0]["png"]) == (400, 300)
    assert results[0]["text"].startswith("<Figure size 400x300")


def test_a_figure_as_the_cell_value_is_a_png(http: httpx.Client) -> None:
    lines = execute(http, "fig, ax = plt.subplots(figsize=(2, 1.5), dpi=100)\nax.bar([1, 2], [3, 4])\nfig")
    main = main_result(lines)
    assert png_size(main["png"]) == (200, 150)


def test_a_charts_data_and_a_dataframes_data(http: httpx.Client) -> None:
    """E2B's ``chart`` of a matplotlib figure and ``data`` of a DataFrame (kernel_charts, registered
    in every python kernel at its start), beside the PNG and the html."""
    lines = execute(http, "import matplotlib.pyplot as plt\nplt.figure()\nplt.bar(['a', 'b'], [3, 5], label='n')\nplt.title('counts')\nplt.show()")
    (figure,) = of_type(lines, "result")
    assert figure["png"] and figure["chart"]["type"] == "bar" and figure["chart"]["title"] == "counts"
    assert figure["chart"]["elements"] == [{"label": "a", "group": "n", "value": 3.0}, {"label": "b", "group": "n", "value": 5.0}]
    table = main_result(execute(http, "import pandas as pd\npd.DataFrame({'k': ['x', 'y'], 'v': [1.5, None]})"))
    assert table["data"] == {"k": ["x", "y"], "v": [1.5, None]} and "<table" in table["html"]
    assert "data" not in main_result(execute(http, "1 + 1")) and "chart" not in main_result(execute(http, "1 + 1"))


def test_other_mime_types_and_extra(http: httpx.Client) -> None:
    code = ("from IPython.display import display\n"
            "display({'text/markdown': '# hi', 'image/svg+xml': '<svg/>', 'application/json': {'a': 1},\n"
            "         'text/latex': '$x$', 'application/x-custom': 'c', 'text/plain': 'plain'}, raw=True)")
    (result,) = of_type(execute(http, code), "result")
    assert result["markdown"] == "# hi" and result["svg"] == "<svg/>" and result["json"] == {"a": 1}
    assert result["latex"] == "$x$" and result["text"] == "plain"
    assert result["extra"] == {"application/x-custom": "c"}
    assert result["is_main_result"] is False


def test_an_exception_gives_name_value_traceback(http: httpx.Client) -> None:
    lines = execute(http, "def f():\n    raise ValueError('bad value 7')\nf()")
    (error,) = of_type(lines, "error")
    assert error["name"] == "ValueError"
    assert error["value"] == "bad value 7"
    assert isinstance(error["traceback"], str)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", error["traceback"])  # ANSI colours, as Jupyter sends them
    assert "ValueError: bad value 7" in plain and "----> 3 f()" in plain and "raise ValueError" in plain
    assert of_type(lines, "number_of_executions")


def test_stderr(http: httpx.Client) -> None:
    lines = execute(http, "import sys\nprint('to stderr', file=sys.stderr)")
    assert [line["text"] for line in of_type(lines, "stderr")] == ["to stderr\n"]


def test_timeout_interrupts_a_busy_loop_and_the_kernel_keeps_its_state(http: httpx.Client) -> None:
    execute(http, "kept = 'still here'")
    started = time.monotonic()
    lines = execute(http, "while True: pass", timeout=1)
    assert time.monotonic() - started < 8
    (error,) = of_type(lines, "error")
    assert error["name"] == "KeyboardInterrupt"
    assert "1 s" in of_type(lines, "stderr")[0]["text"]
    assert main_result(execute(http, "kept"))["text"] == "'still here'"


def test_a_client_that_disconnects_interrupts_its_cell(http: httpx.Client, server: Server) -> None:
    execute(http, "import time\nmarker = 0")
    code = "print('looping', flush=True)\nwhile True:\n    marker += 1"
    with httpx.Client(base_url=server.url, timeout=30) as other:
        with other.stream("POST", "/execute", json={"code": code}) as response:
            for raw in response.iter_lines():
                if raw.strip():
                    assert json.loads(raw)["text"] == "looping\n"
                    break
        # leaving the block closed the connection mid-cell
    started = time.monotonic()
    lines = execute(http, "m1 = marker; time.sleep(0.5); marker == m1")  # served once the loop stopped
    assert time.monotonic() - started < 10
    assert main_result(lines)["text"] == "True"
    assert "interrupting a cell: the client disconnected" in server.log()


def test_cells_on_one_context_run_one_after_the_other(http: httpx.Client, server: Server) -> None:
    import threading

    execute(http, "import time\norder = []")
    results: list[list[dict[str, Any]]] = []

    def run(tag: str, delay: float) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            results.append(execute(client, f"order.append('{tag}-start'); time.sleep({delay}); order.append('{tag}-end')"))

    first = threading.Thread(target=run, args=("a", 1.0))
    first.start()
    time.sleep(0.3)
    second = threading.Thread(target=run, args=("b", 0.1))
    second.start()
    first.join(30)
    second.join(30)
    assert main_result(execute(http, "order"))["text"] == repr(["a-start", "a-end", "b-start", "b-end"])


def test_a_queued_cell_whose_client_left_does_not_run(http: httpx.Client, server: Server) -> None:
    import threading

    execute(http, "import time\nran = False")
    busy = threading.Thread(target=lambda: execute(httpx.Client(base_url=server.url, timeout=60), "time.sleep(2)"))
    busy.start()
    time.sleep(0.3)
    with httpx.Client(base_url=server.url, timeout=30) as other:
        with other.stream("POST", "/execute", json={"code": "ran = True"}) as response:
            assert response.status_code == 200  # queued behind the sleep; the client leaves now
    busy.join(30)
    time.sleep(0.5)
    assert main_result(execute(http, "ran"))["text"] == "False"


def test_env_vars_hold_for_one_execution_only(http: httpx.Client, server: Server) -> None:
    canary = server.home / "pwned"
    tricky = f"x'); open({str(canary)!r}, 'w'); ('\"\n\\u2028 ü"
    execute(http, "import os")
    seen = value(http, "[os.environ.get('TRENVX_A'), os.environ.get('TRENVX_B'), os.environ.get('HOME')]",
                 env_vars={"TRENVX_A": "one", "TRENVX_B": tricky, "HOME": "/elsewhere"})
    assert seen == ["one", tricky, "/elsewhere"]
    assert not canary.exists()
    seen = value(http, "[os.environ.get('TRENVX_A'), os.environ.get('TRENVX_B'), os.environ.get('HOME') != '/elsewhere']")
    assert seen == [None, None, True]
    # A subprocess of the cell sees them too (they are the kernel's environment for that cell).
    lines = execute(http, "import subprocess\nprint(subprocess.run(['sh', '-c', 'echo $TRENVX_C'], capture_output=True, "
                          "text=True).stdout, end='')", env_vars={"TRENVX_C": "from-env"})
    assert stdout(lines) == "from-env\n"


def test_env_vars_survive_a_user_who_removes_the_helper(http: httpx.Client) -> None:
    execute(http, "import sys\ndel sys.modules['_trenvx_kernel']")
    lines = execute(http, "import os\nos.environ['TRENVX_D']", env_vars={"TRENVX_D": "d"})
    assert main_result(lines)["text"] == "'d'"
    assert not of_type(execute(http, "os.environ.get('TRENVX_D')"), "result")


def test_contexts_have_separate_state_restart_and_delete(http: httpx.Client, server: Server) -> None:
    created = http.post("/contexts", json={"language": "python", "cwd": "/tmp"})
    assert created.status_code == 201, created.text
    ctx = created.json()
    assert set(ctx) == {"id", "language", "cwd"} and ctx["language"] == "python" and ctx["cwd"] == "/tmp"
    execute(http, "shared = 'default'")
    execute(http, "shared = 'other'", context_id=ctx["id"])
    assert main_result(execute(http, "shared"))["text"] == "'default'"
    assert main_result(execute(http, "import os\nshared, os.getcwd()", context_id=ctx["id"]))["text"] == "('other', '/tmp')"
    listed = http.get("/contexts").json()
    assert ctx in listed and any(c["id"] != ctx["id"] and c["language"] == "python" for c in listed)

    assert http.post(f"/contexts/{ctx['id']}/restart").status_code == 204
    lines = execute(http, "shared", context_id=ctx["id"])
    assert of_type(lines, "error")[0]["name"] == "NameError"

    assert http.delete(f"/contexts/{ctx['id']}").status_code == 204
    assert ctx["id"] not in [c["id"] for c in http.get("/contexts").json()]
    response = http.post("/execute", json={"code": "1", "context_id": ctx["id"]})
    assert response.status_code == 404 and ctx["id"] in response.json()["error"]
    assert http.delete(f"/contexts/{ctx['id']}").status_code == 404
    assert http.post(f"/contexts/{ctx['id']}/restart").status_code == 404


def test_a_missing_cwd_falls_back_to_home(http: httpx.Client, server: Server) -> None:
    created = http.post("/contexts", json={"cwd": "/no/such/dir"}).json()
    try:
        assert created["language"] == "python"
        home = pwd.getpwuid(os.getuid()).pw_dir
        assert created["cwd"] == (home if os.path.isdir(home) else "/")
    finally:
        assert http.delete(f"/contexts/{created['id']}").status_code == 204


def test_restart_stops_a_running_cell(http: httpx.Client, server: Server) -> None:
    import threading

    ctx = http.post("/contexts", json={}).json()
    got: list[list[dict[str, Any]]] = []
    runner = threading.Thread(target=lambda: got.append(execute(httpx.Client(base_url=server.url, timeout=60),
                                                                "import time\ntime.sleep(60)", context_id=ctx["id"])))
    runner.start()
    time.sleep(1.0)
    started = time.monotonic()
    assert http.post(f"/contexts/{ctx['id']}/restart").status_code == 204
    runner.join(30)
    assert time.monotonic() - started < 30
    assert of_type(got[0], "error")[0]["name"] == "ContextRestarted"
    assert main_result(execute(http, "2 + 2", context_id=ctx["id"]))["text"] == "4"
    http.delete(f"/contexts/{ctx['id']}")


def test_a_dead_kernel_is_reported_and_restarted(http: httpx.Client) -> None:
    ctx = http.post("/contexts", json={}).json()
    execute(http, "doomed = 1", context_id=ctx["id"])
    lines = execute(http, "import os\nos._exit(3)", context_id=ctx["id"])
    assert of_type(lines, "error")[0]["name"] == "KernelDied"
    lines = execute(http, "'doomed' in globals()", context_id=ctx["id"])
    assert main_result(lines)["text"] == "False"
    http.delete(f"/contexts/{ctx['id']}")


@pytest.mark.parametrize(("body", "status", "words"), [
    (b"{not json", 400, "invalid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b"", 400, "needs a JSON object"),
    (json.dumps({"language": "python"}).encode(), 400, "code is required"),
    (json.dumps({"code": 5}).encode(), 400, "code is required"),
    (json.dumps({"code": "1", "language": "python", "context_id": "abc"}).encode(), 400, "not both"),
    (json.dumps({"code": "1", "language": "cobol"}).encode(), 400, "'cobol' is not supported; supported: python"),
    (json.dumps({"code": "1", "language": ""}).encode(), 400, "language must not be empty"),
    (json.dumps({"code": "1", "context_id": "nope"}).encode(), 404, "'nope' not found"),
    (json.dumps({"code": "1", "env_vars": {"A=B": "x"}}).encode(), 400, "invalid name 'A=B'"),
    (json.dumps({"code": "1", "env_vars": {"A": 1}}).encode(), 400, "must be a string"),
    (json.dumps({"code": "1", "env_vars": ["A"]}).encode(), 400, "env_vars must be an object"),
    (json.dumps({"code": "1", "env_vars": {"A": "x\u0000"}}).encode(), 400, "NUL"),
    (json.dumps({"code": "1", "timeout": -1}).encode(), 400, "timeout must be a number"),
    (json.dumps({"code": "1", "silent": "yes"}).encode(), 400, "silent must be true or false"),
])
def test_bad_execute_requests(http: httpx.Client, body: bytes, status: int, words: str) -> None:
    response = http.post("/execute", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_bad_requests_elsewhere(http: httpx.Client, server: Server) -> None:
    assert http.get("/nowhere").status_code == 404
    assert "no such endpoint" in http.get("/nowhere").json()["error"]
    assert http.get("/contexts/abc/other").status_code == 404
    response = http.get("/execute")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert http.put("/contexts").status_code == 405
    assert http.post("/health").status_code == 405
    head = http.head("/health")  # answered without a body; the connection goes on
    assert head.status_code == 405 and head.content == b""
    assert http.get("/health").text == "OK"
    response = http.post("/contexts", json={"language": "fortran"})
    assert response.status_code == 400 and "fortran" in response.json()["error"]
    response = http.post("/contexts", json={"cwd": "relative/dir"})
    assert response.status_code == 400 and "absolute path" in response.json()["error"]
    # A body over the bound is refused unread, on its own connection.
    with httpx.Client(base_url=server.url, timeout=60) as client:
        response = client.post("/execute", content=b"x" * (16 * 1024 * 1024 + 1))
        assert response.status_code == 413 and "larger than" in response.json()["error"]
    assert http.get("/health").status_code == 200


def test_lines_parse_with_e2bs_own_client(http: httpx.Client) -> None:
    models = pytest.importorskip("e2b_code_interpreter.models", reason="e2b-code-interpreter is not installed")
    execution = models.Execution()
    with http.stream("POST", "/execute", json={"code": "print('a')\nimport pandas as pd\n"
                                                       "pd.DataFrame({'c': [1]})"}) as response:
        for line in response.iter_lines():
            if line.strip():
                models.parse_output(execution, line)
    assert execution.logs.stdout == ["a\n"]
    assert execution.results[0].is_main_result and "<table" in execution.results[0].html
    assert execution.error is None and isinstance(execution.execution_count, int)
    execution = models.Execution()
    with http.stream("POST", "/execute", json={"code": "raise KeyError('k')"}) as response:
        for line in response.iter_lines():
            if line.strip():
                models.parse_output(execution, line)
    assert execution.error.name == "KeyError"


# ---------------------------------------------------------------------------------- bash

needs_bash = pytest.mark.skipif(not HAVE_BASH_KERNEL, reason="bash_kernel is not installed (pip install bash_kernel)")


@needs_bash
def test_bash_state_env_and_errors(http: httpx.Client, server: Server) -> None:
    lines = execute(http, "cd /tmp\nGREETING=hi\necho $GREETING", language="bash")
    assert stdout(lines).strip() == "hi"
    canary = server.home / "bash-pwned"
    tricky = f"a b'\"$(touch {canary})`touch {canary}`\n;x \\ ü"
    lines = execute(http, 'printf "%s|" "$GREETING" "$(pwd)" "$TRENVX_E"', language="sh",
                    env_vars={"TRENVX_E": tricky})
    assert stdout(lines).rstrip("\n") == f"hi|/tmp|{tricky}|"
    assert not canary.exists()
    lines = execute(http, 'echo "[${TRENVX_E-unset}]"', language="bash")
    assert stdout(lines).strip() == "[unset]"
    lines = execute(http, "false", language="bash")
    assert of_type(lines, "error")[0]["value"] == "1"


@needs_bash
def test_bash_env_restores_a_previous_value(http: httpx.Client) -> None:
    execute(http, "export TRENVX_F=before", language="bash")
    assert stdout(execute(http, "echo $TRENVX_F", language="bash", env_vars={"TRENVX_F": "during"})).strip() == "during"
    assert stdout(execute(http, "echo $TRENVX_F; env | grep -c ^TRENVX_F=", language="bash")).split() == ["before", "1"]


@needs_bash
def test_bash_timeout_interrupts_and_the_shell_keeps_going(http: httpx.Client) -> None:
    execute(http, "KEEP=yes", language="bash")
    started = time.monotonic()
    lines = execute(http, "sleep 60", language="bash", timeout=1)
    assert time.monotonic() - started < 10
    assert of_type(lines, "error")[0]["name"] == "KeyboardInterrupt"
    assert stdout(execute(http, "echo $KEEP", language="bash")).strip() == "yes"


@needs_bash
def test_bash_context(http: httpx.Client) -> None:
    ctx = http.post("/contexts", json={"language": "bash", "cwd": "/"}).json()
    assert ctx["language"] == "bash" and ctx["cwd"] == "/"
    assert stdout(execute(http, "pwd", context_id=ctx["id"])).strip() == "/"
    assert http.delete(f"/contexts/{ctx['id']}").status_code == 204


def test_bash_without_its_kernel_is_a_400_naming_it(tmp_path: Path) -> None:
    """A server whose Jupyter finds no bash kernel spec answers 400 naming it and how to install it."""
    empty = tmp_path / "jupyter"
    (empty / "kernels").mkdir(parents=True)
    s = start_server(tmp_path, "--no-preload", jupyter_path=empty)
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
        try:
            KernelSpecManager().get_kernel_spec("bash")
            pytest.skip("a bash kernel spec is installed system-wide here")
        except NoSuchKernel:
            pass
        response = httpx.post(s.url + "/execute", json={"code": "echo", "language": "bash"}, timeout=30)
        assert response.status_code == 400
        assert "bash_kernel" in response.json()["error"] and "'bash'" in response.json()["error"]
    finally:
        s.stop()


# ---------------------------------------------------------------------------------- reseeding

def test_a_new_machine_id_reseeds_the_kernels(http: httpx.Client, server: Server) -> None:
    """Restored sandboxes share the kernels' memory, RNG state included; a changed machine id
    (each restore gets its own) reseeds random and numpy before the next cell."""
    expected = (random.Random(7).random(), __import__("numpy").random.RandomState(7).random_sample())
    seed = "import random, numpy as np\nrandom.seed(7); np.random.seed(7)"
    draw = "random.random(), np.random.random_sample()"
    execute(http, seed)
    assert main_result(execute(http, draw))["text"] == repr(expected)  # same machine: no reseed
    execute(http, seed)
    server.machine_id.write_text("1" * 32 + "\n")  # as /init writes a restored sandbox's
    after = value(http, f"[{draw}]")
    assert len(after) == 2 and after != list(expected)


class FakeKernel:
    def __init__(self) -> None:
        self.reseeds = 0

    def request_reseed(self) -> None:
        self.reseeds += 1


def test_reseed_only_when_the_machine_id_changes(tmp_path: Path) -> None:
    path = tmp_path / "machine-id"
    path.write_text("aaaa\n")
    watch = IdentityWatch(path)
    kernels = [FakeKernel(), FakeKernel()]
    assert not reseed_if_identity_changed(watch, kernels)
    assert [k.reseeds for k in kernels] == [0, 0]
    path.write_text("bbbb\n")
    assert reseed_if_identity_changed(watch, kernels)
    assert [k.reseeds for k in kernels] == [1, 1]
    assert not reseed_if_identity_changed(watch, kernels)  # once per change
    path.unlink()
    assert reseed_if_identity_changed(watch, kernels)  # gone counts as a change too
    path.write_text("bbbb\n")
    assert reseed_if_identity_changed(watch, kernels)
    assert [k.reseeds for k in kernels] == [3, 3]
    assert identity.DEFAULT_MACHINE_ID == Path("/etc/machine-id")


class RecordingKernel(Kernel):
    """A Kernel whose jupyter side is replaced by a recorder (logic only)."""

    def __init__(self, language: languages.Language, identity_file: str | None = None) -> None:
        launch = LaunchSettings(run_as=resolve_user(None), runtime_dir=Path("/nonexistent"), base_env={},
                                identity_file=identity_file)
        super().__init__(language, "/", launch, "recorder")
        self.sent: list[str] = []

    def _ensure_running(self) -> None:
        pass

    def _run_silent(self, code: str, timeout: float) -> dict[str, Any] | None:
        self.sent.append(code)
        return {"status": "ok"}

    def _run_cell(self, ex: Execution) -> None:
        self.sent.append(f"CELL {ex.code}")


@pytest.mark.parametrize("language", [languages.PYTHON, languages.BASH])
def test_a_marked_kernel_sends_the_reseed_code_before_its_next_cell(language: languages.Language, tmp_path: Path) -> None:
    kernel = RecordingKernel(language)
    try:
        path = tmp_path / "machine-id"
        path.write_text("one")
        watch = IdentityWatch(path)

        def run(code: str, env: dict[str, str] | None = None) -> None:
            ex = Execution(code, env or {}, None)
            kernel.submit(ex)
            while ex.lines.get(timeout=10) is not None:
                pass

        reseed_if_identity_changed(watch, [kernel])
        run("a")
        assert kernel.sent == ["CELL a"]
        path.write_text("two")
        reseed_if_identity_changed(watch, [kernel])
        run("b", {"K": "v"})
        assert kernel.sent[2:] == [language.apply_env({"K": "v"}), "CELL b", language.restore_env({"K": "v"})]
        if language is languages.PYTHON:
            assert kernel.sent[1] == "__import__('_trenvx_kernel').reseed()\n"
        else:
            assert kernel.sent[1].startswith("RANDOM=") and kernel.sent[1][7:].strip().isdigit()
        run("c")
        assert kernel.sent[-1] == "CELL c" and len(kernel.sent) == 6  # reseeded once only
    finally:
        kernel.shutdown()


def test_a_kernel_that_reseeds_itself_gets_no_reseed_cell(tmp_path: Path) -> None:
    """A python kernel watching the identity file reseeds in its own pre_execute hook: the
    server sends no silent cell (a round trip) before a restored sandbox's first cell; bash
    has no such hook and still gets its reseed cell."""
    path = tmp_path / "machine-id"
    path.write_text("one")
    for language, expected in ((languages.PYTHON, ["CELL a"]), (languages.BASH, None)):
        kernel = RecordingKernel(language, identity_file=str(path))
        try:
            kernel.request_reseed()
            ex = Execution("a", {}, None)
            kernel.submit(ex)
            while ex.lines.get(timeout=10) is not None:
                pass
            if expected is not None:
                assert kernel.sent == expected
            else:
                assert kernel.sent[0].startswith("RANDOM=") and kernel.sent[1:] == ["CELL a"]
        finally:
            kernel.shutdown()
    assert "'" + str(path) + "'" in languages.PYTHON.bootstrap(True, str(path))


def test_the_identity_hook_reseeds_when_the_file_changes(tmp_path: Path) -> None:
    """kernelside.watch_identity, in a real IPython shell: the hook reseeds on the first
    execution after the file changed, once, and a second setup replaces the hook."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        module: dict[str, Any] = {"__name__": "_trenvx_kernel_test"}
        exec(compile((SRC / "trenvx/guest/interpreter/kernelside.py").read_text(), "kernelside", "exec"), module)
        path = tmp_path / "machine-id"
        path.write_text("one")
        assert module["watch_identity"](str(path)) and module["watch_identity"](str(path))
        hooks = [h for h in shell.events.callbacks["pre_execute"] if h.__name__ == "trenvx_identity_check"]
        assert len(hooks) == 1
        shell.run_cell("import random; random.seed(7)")
        shell.run_cell("_a = random.random()")
        assert shell.user_ns["_a"] == random.Random(7).random()  # same machine: no reseed
        shell.run_cell("random.seed(7)")
        path.write_text("two")
        shell.run_cell("_b = random.random()")
        assert shell.user_ns["_b"] != random.Random(7).random()
    finally:
        InteractiveShell.clear_instance()


def test_the_reseed_helper_changes_random_state() -> None:
    """kernelside.reseed, run here as the kernel runs it: random and numpy draw anew."""
    import numpy as np

    module: dict[str, Any] = {"__name__": "_trenvx_kernel_test"}
    exec(compile((SRC / "trenvx/guest/interpreter/kernelside.py").read_text(), "kernelside", "exec"), module)
    random.seed(7)
    np.random.seed(7)
    module["reseed"]()
    assert (random.random(), np.random.random_sample()) != (random.Random(7).random(),
                                                           np.random.RandomState(7).random_sample())


# ---------------------------------------------------------------------------------- pure logic

def test_bash_quote_is_data_to_bash(tmp_path: Path) -> None:
    for value in ["plain", "", "a b", "it's", 'dq"', "$(touch x)", "`id`", "new\nline", "back\\slash", "ü€😀",
                  "\t\x01\x7f", "-n", "$'x'", "\\x41"]:
        out = subprocess.run(["bash", "-c", f"printf %s {languages.bash_quote(value)}"], capture_output=True,
                             cwd=tmp_path, timeout=10)
        assert out.stdout.decode("utf-8") == value, value
        assert "\n" not in languages.bash_quote(value)
    assert list(tmp_path.iterdir()) == []


def test_python_env_code_is_a_literal() -> None:
    value = "'); import os; os.system('x') #\"\n"
    code = languages.PYTHON.apply_env({"A": value})
    # The only call in it is the helper's; the value is one string literal.
    import ast

    call = ast.parse(code).body[0].value
    assert isinstance(call, ast.Call) and call.func.attr == "apply_env"
    assert json.loads(ast.literal_eval(call.args[0])) == {"A": value}


def test_check_env() -> None:
    assert languages.check_env(None) == {}
    assert languages.check_env({"A_1": "x"}) == {"A_1": "x"}
    for bad, words in [({"1A": "x"}, "invalid name"), ({"A-B": "x"}, "invalid name"), ({"": "x"}, "invalid name"),
                       ({"A": None}, "must be a string"), ("A=1", "must be an object")]:
        with pytest.raises(ValueError, match=words):
            languages.check_env(bad)


def test_language_names() -> None:
    assert languages.language_named(None) is languages.PYTHON
    assert languages.language_named("Python3") is languages.PYTHON
    assert languages.language_named("sh") is languages.BASH
    with pytest.raises(languages.UnknownLanguage, match="'r' is not supported; supported: python"):
        languages.language_named("r")


def test_outputs_from_iopub() -> None:
    assert outputs.from_iopub({"msg_type": "status", "content": {"execution_state": "busy"}}) is None
    line = outputs.from_iopub({"msg_type": "execute_result", "content": {"data": {
        "text/plain": "t", "text/html": ["<b>", "x</b>"], "image/png": "iVBOR", "image/jpeg": "/9j/",
        "application/pdf": "JVBER", "application/javascript": "1", "application/vnd.custom+json": {"k": 1}}}})
    assert line == {"type": "result", "text": "t", "html": "<b>x</b>", "png": "iVBOR", "jpeg": "/9j/", "pdf": "JVBER",
                    "javascript": "1", "extra": {"application/vnd.custom+json": {"k": 1}}, "is_main_result": True}
    assert outputs.from_iopub({"msg_type": "display_data", "content": {"data": {"text/plain": "d"}}})["is_main_result"] is False
    error = outputs.from_iopub({"msg_type": "error", "content": {"ename": "E", "evalue": "v", "traceback": ["a", "b"]}})
    assert error == {"type": "error", "name": "E", "value": "v", "traceback": "a\nb"}
    stream = outputs.from_iopub({"msg_type": "stream", "content": {"name": "stderr", "text": "x"}})
    assert stream["type"] == "stderr" and stream["text"] == "x"


# ---------------------------------------------------------------------------------- as another user

def _debian_python_with_jupyter() -> str | None:
    python = "/usr/bin/python3"
    if not os.path.exists(python):
        return None
    probe = subprocess.run([python, "-c", "import jupyter_client, ipykernel; print(jupyter_client.__version__)"],
                           capture_output=True, text=True, timeout=60)
    return python if probe.returncode == 0 else None


def test_kernels_run_as_the_given_user() -> None:
    """As in the guest: the server as root, the kernel as another account (here ``nobody``), on the
    system's Python (Debian's python3-jupyter-client 7.4 and python3-ipykernel, as the template has)."""
    if os.geteuid() != 0:
        pytest.skip("starting kernels as another user needs root")
    python = _debian_python_with_jupyter()
    if python is None:
        pytest.skip("/usr/bin/python3 has no jupyter_client/ipykernel (apt-get install python3-ipykernel "
                    "python3-jupyter-client)")
    with tempfile.TemporaryDirectory(prefix="trenvx-interpreter-") as tmp:
        os.chmod(tmp, 0o755)  # the kernel, as nobody, reaches its connection file and cwd through it
        _run_as_nobody(Path(tmp), python)


def _run_as_nobody(tmp_path: Path, python: str) -> None:
    s = start_server(tmp_path, "--user", "nobody", "--no-preload", python=python)
    try:
        nobody = pwd.getpwnam("nobody")
        with httpx.Client(base_url=s.url, timeout=60) as client:
            execute(client, "import os")
            seen = value(client, "[os.getuid(), os.getgid(), os.environ['HOME'], os.environ['USER'], "
                                 "'PYTHONPATH' in os.environ, os.getcwd()]")
            assert seen == [nobody.pw_uid, nobody.pw_gid, nobody.pw_dir, "nobody", False, str(s.home)]
            lines = execute(client, "while True: pass", timeout=1)
            assert of_type(lines, "error")[0]["name"] == "KeyboardInterrupt"
            lines = execute(client, "import os\nos.environ['V']", env_vars={"V": "w"})
            assert main_result(lines)["text"] == "'w'"
        runtime = tmp_path / "runtime"
        assert [p.stat().st_uid for p in runtime.iterdir()] == [nobody.pw_uid]  # its connection file
    finally:
        s.stop()
    assert list((tmp_path / "runtime").iterdir()) == []
