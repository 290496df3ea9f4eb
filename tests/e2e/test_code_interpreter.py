"""The code interpreter on real VMs (issue 15): the shipped ``code-interpreter`` template, driven by
E2B's unmodified ``e2b_code_interpreter`` package (created by its default alias
``code-interpreter-v1``), and by trenvx's own SDK.

One server for the module, on the session's data root; sandboxes are created per test or shared
by a module fixture where the test only reads.
"""

from __future__ import annotations

import base64
import re
import struct
import time
from pathlib import Path

import pytest

from .server_helpers import e2b_pointed_at, running_server

pytestmark = pytest.mark.e2e

e2b_code_interpreter = pytest.importorskip("e2b_code_interpreter")

CHART = """
import matplotlib.pyplot as plt
fig = plt.figure(figsize=(4, 3), dpi=100)
plt.plot([1, 2, 3], [1, 4, 9])
plt.show()
"""


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def ci_server(tmp_path_factory, e2e_config, test_template, code_interpreter_template):
    with running_server(tmp_path_factory.mktemp("ci"), e2e_config, template=test_template, pools=False) as srv:
        yield srv


@pytest.fixture(scope="module")
def ci_env(ci_server):
    with e2b_pointed_at(ci_server.url) as url:
        yield url


@pytest.fixture(scope="module")
def sbx(ci_env):
    from e2b_code_interpreter import Sandbox

    s = Sandbox.create(timeout=600)  # the package's default template: code-interpreter-v1
    yield s
    s.kill()


def test_the_default_alias_gives_the_code_interpreter(sbx, code_interpreter_template) -> None:
    assert sbx.get_info().template_id == code_interpreter_template


def test_state_persists_between_cells(sbx) -> None:
    assert sbx.run_code("x = 40").error is None
    execution = sbx.run_code("x + 2")
    assert execution.error is None and execution.text == "42"
    assert execution.results[0].is_main_result and execution.execution_count >= 2


def test_a_dataframe_is_html(sbx) -> None:
    execution = sbx.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})")
    assert execution.error is None, execution.error
    main = execution.results[0]
    assert "<table" in main.html and ">x</td>" in main.html and ">y</td>" in main.html, main.html
    assert "a" in main.text and "b" in main.text
    assert main.data == {"a": [1, 2], "b": ["x", "y"]}  # E2B's data: the frame's columns


def test_a_matplotlib_chart_is_a_png_of_its_size(sbx) -> None:
    execution = sbx.run_code(CHART)
    assert execution.error is None, execution.error
    pngs = [r.png for r in execution.results if r.png]
    assert len(pngs) == 1, execution.results
    assert png_size(base64.b64decode(pngs[0])) == (400, 300)
    (chart,) = [r.chart for r in execution.results if getattr(r, "chart", None) is not None]
    assert chart.type == "line" and chart.elements[0].points == [(1.0, 1.0), (2.0, 4.0), (3.0, 9.0)], chart.to_dict()


def test_a_bar_chart_has_its_bars_as_data(sbx) -> None:
    execution = sbx.run_code("import matplotlib.pyplot as plt\nplt.figure()\nplt.bar(['north', 'south'], [12, 7], "
                             "label='sales')\nplt.title('Sales')\nplt.ylabel('units (k)')\nplt.show()")
    assert execution.error is None, execution.error
    (chart,) = [r.chart for r in execution.results if getattr(r, "chart", None) is not None]
    assert chart.type == "bar" and chart.title == "Sales" and chart.y_unit == "k"
    assert [(e.label, e.group, e.value) for e in chart.elements] == [("north", "sales", 12.0), ("south", "sales", 7.0)]


def test_an_exception_has_its_name_value_and_traceback(sbx) -> None:
    execution = sbx.run_code("def f():\n    raise ValueError('bad value')\nf()")
    assert execution.error is not None
    assert execution.error.name == "ValueError" and execution.error.value == "bad value"
    plain = re.sub(r"\x1b\[[0-9;]*m", "", execution.error.traceback)  # IPython colours it, as on E2B
    assert "f()" in plain and "ValueError: bad value" in plain, plain
    assert sbx.run_code("1 + 1").text == "2", "the kernel goes on after an error"


def test_stdout_streams_before_the_cell_ends(sbx) -> None:
    seen: list[tuple[str, float]] = []
    t0 = time.monotonic()
    execution = sbx.run_code(
        "import time, sys\nprint('first', flush=True)\ntime.sleep(3)\nprint('second', flush=True)",
        on_stdout=lambda m: seen.append((m.line, time.monotonic() - t0)),
    )
    assert execution.error is None and "".join(execution.logs.stdout) == "first\nsecond\n"
    assert [line.strip() for line, _ in seen] == ["first", "second"]
    assert seen[1][1] - seen[0][1] >= 2.0, f"'first' came only with the end of the cell: {seen}"


def test_a_timeout_interrupts_the_cell_and_the_kernel_goes_on(sbx) -> None:
    from e2b.exceptions import TimeoutException

    sbx.run_code("counter = 0")
    with pytest.raises(TimeoutException):
        sbx.run_code("import time\nwhile True:\n    counter += 1\n    time.sleep(0.01)", timeout=3)
    # the cell was interrupted, not left running: the counter stops moving
    first = int(sbx.run_code("counter", timeout=60).text)
    time.sleep(1)
    assert int(sbx.run_code("counter").text) == first
    assert sbx.run_code("'still here'").text == "'still here'"


def test_two_contexts_have_separate_state(sbx) -> None:
    """The default context and a new one (a kernel started on demand, its cwd as asked); a restart
    empties only the context restarted. (Not ``who``: that name is an IPython magic.)"""
    ctx = sbx.create_code_context(cwd="/tmp")
    try:
        sbx.run_code("owner = 'default'")
        sbx.run_code("owner = 'new'", context=ctx)
        assert sbx.run_code("owner").text == "'default'"
        assert sbx.run_code("owner", context=ctx).text == "'new'"
        assert sbx.run_code("import os; os.getcwd()", context=ctx).text == "'/tmp'"
        assert ctx.id in {c.id for c in sbx.list_code_contexts()}
        sbx.restart_code_context(ctx)
        assert sbx.run_code("owner", context=ctx).error.name == "NameError"
        assert sbx.run_code("owner").text == "'default'"
    finally:
        sbx.remove_code_context(ctx)
    assert ctx.id not in {c.id for c in sbx.list_code_contexts()}


def test_bash(sbx) -> None:
    execution = sbx.run_code("echo $((6 * 7)); whoami", language="bash")
    assert execution.error is None, execution.error
    assert "".join(execution.logs.stdout).split() == ["42", "user"]


def test_env_vars_for_one_run(sbx) -> None:
    code = "import os; os.environ.get('CI_TEST_VAR')"
    assert sbx.run_code(code, envs={"CI_TEST_VAR": "it's \"quoted\""}).text == "'it\\'s \"quoted\"'"
    assert sbx.run_code(code).text is None, "the variable was set for that one run only"


def test_an_unknown_language_is_a_clear_error(sbx) -> None:
    from e2b.exceptions import SandboxException

    with pytest.raises(SandboxException, match="cobol"):
        sbx.run_code("DISPLAY 'HI'", language="cobol")


def test_each_sandbox_has_its_own_kernel_and_random_numbers(ci_env) -> None:
    from e2b_code_interpreter import Sandbox

    a, b = Sandbox.create(timeout=300), Sandbox.create(timeout=300)
    try:
        a.run_code("secret = 'only in a'")
        assert b.run_code("secret").error.name == "NameError"
        draw = "import random, numpy as np; (random.random(), float(np.random.rand()))"
        assert a.run_code(draw).text != b.run_code(draw).text, "restored from one snapshot, yet the same numbers"
    finally:
        a.kill()
        b.kill()


async def test_the_async_sandbox_with_callbacks(ci_env) -> None:
    from e2b_code_interpreter import AsyncSandbox

    s = await AsyncSandbox.create(timeout=300)
    try:
        results, out, errors = [], [], []
        execution = await s.run_code("print('hi')\n6 * 7", on_stdout=out.append, on_result=results.append,
                                     on_error=errors.append)
        assert execution.text == "42" and [m.line for m in out] == ["hi\n"] and results and not errors
        await s.run_code("1/0", on_error=errors.append)
        assert errors and errors[0].name == "ZeroDivisionError"
    finally:
        await s.kill()


def test_trenvx_sdk_run_code_and_the_cli_saves_the_chart(ci_server, sbx, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from sandbox_sdk.e2b import Sandbox as TrenvxSandbox

    mine = TrenvxSandbox.connect(sbx.sandbox_id, api_url=ci_server.url)
    execution = mine.run_code("21 * 2")
    assert execution.text == "42"
    out = subprocess.run(
        [sys.executable, "-m", "trenvx.cli.sandbox_cli", "-i", "127.0.0.1", "-p", str(ci_server.port),
         "sandbox", "run-code", sbx.sandbox_id, CHART, "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    saved = sorted(tmp_path.glob("*.png"))
    assert len(saved) == 1 and png_size(saved[0].read_bytes()) == (400, 300), out.stdout
    r = subprocess.run(
        [sys.executable, "-m", "trenvx.cli.sandbox_cli", "-i", "127.0.0.1", "-p", str(ci_server.port), "--json",
         "sandbox", "run-code", sbx.sandbox_id, "1/0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["name"] == "ZeroDivisionError", r.stdout + r.stderr


async def test_trenvx_x_code_interpreter_exec_cell(ci_server) -> None:
    from sandbox_sdk.code_interpreter import CodeInterpreter

    ci = await CodeInterpreter.create(api_url=ci_server.url)
    try:
        out: list = []
        results: list = []
        await ci.notebook.exec_cell("y = 20")
        execution = await ci.notebook.exec_cell("print('streamed'); y + 22", on_stdout=out.append,
                                                on_result=results.append)
        assert execution.text == "42" and results
        assert any("streamed" in getattr(m, "line", str(m)) for m in out)
        chart = await ci.notebook.exec_cell(CHART)
        assert png_size(base64.b64decode(next(r.png for r in chart.results if r.png))) == (400, 300)
        failed = await ci.notebook.exec_cell("raise KeyError('k')")
        assert failed.error is not None and failed.error.name == "KeyError"
    finally:
        await ci.close() if hasattr(ci, "close") else await ci.kill()


def test_a_hot_pooled_sandbox_was_warmed_silently(tmp_path_factory, e2e_config, code_interpreter_template) -> None:
    """A server whose pool holds code-interpreter VMs: they ran one silent cell when warmed up, so
    a user's first cell is still execution 1, and two pooled sandboxes draw different numbers."""
    import httpx
    from e2b_code_interpreter import Sandbox

    from .server_helpers import wait_until

    def hot_ready(url: str) -> bool:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        m = re.search(rf'trenvx_pool_ready{{template="{code_interpreter_template}",tier="hot"}} (\S+)', text)
        return bool(m) and float(m.group(1)) >= 1

    with running_server(tmp_path_factory.mktemp("ci-pool"), e2e_config, template=code_interpreter_template) as srv, \
            e2b_pointed_at(srv.url):
        assert wait_until(lambda: hot_ready(srv.url), 300, 1.0), "no hot code-interpreter VM in the pool"
        a = Sandbox.create(timeout=120)
        try:
            source = httpx.get(f"{srv.url}/sandboxes/{a.sandbox_id}", timeout=30).json()["trenvx"]["startSource"]
            assert source == "hot"
            first = a.run_code("1+1")
            assert first.text == "2" and first.execution_count == 1, first
            assert wait_until(lambda: hot_ready(srv.url), 300, 1.0)
            b = Sandbox.create(timeout=120)
            try:
                draw = "import random, numpy as np; (random.random(), float(np.random.rand()))"
                assert a.run_code(draw).text != b.run_code(draw).text
            finally:
                b.kill()
        finally:
            a.kill()
