"""TrEnv-X's ``sandbox.terminal`` end to end (issue 13, item 2): a real backend, a real VM restored
from the test template, driven through ``sandbox_sdk`` as code written for TrEnv-X's SDK does."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Callable

import pytest

from sandbox_sdk import CurrentWorkingDirectoryDoesntExistException, Terminal, TerminalException, TerminalOutput
from sandbox_sdk.sandbox import Sandbox

pytestmark = pytest.mark.e2e


def _lines(data: str) -> list[str]:
    """The terminal's text as lines, without escape sequences (bash's bracketed paste mode)."""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", data)
    return [line for line in re.split(r"[\r\n]+", text) if line]


async def _until(pred: Callable[[], bool], term: Terminal, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen within {timeout}s; the terminal printed {term.data!r}")
        await asyncio.sleep(0.1)


@pytest.fixture
async def ci(sdk_backend: str, backend_port: int, test_template: str) -> AsyncIterator[Sandbox]:
    s = await Sandbox.create(
        template=test_template, target_addr="127.0.0.1", port=backend_port, env_vars={"SBX_G": "global"}
    )
    yield s
    await s.close()


async def test_terminal(ci: Sandbox) -> None:
    seen: list[str] = []
    exits: list[str] = []
    term = await ci.terminal.start(
        on_data=seen.append,
        cols=80,
        rows=24,
        cmd="/bin/bash",
        cwd=None,
        env_vars=None,
        on_exit=lambda: exits.append("exited"),
        timeout=120,
    )
    assert term.terminal_id == term.id and term.pid
    await term.send_data("echo $((6*7))\n")
    await _until(lambda: "42" in _lines("".join(seen)), term)

    await term.resize(cols=100, rows=30)
    await term.send_data("stty size\n")
    await _until(lambda: "30 100" in _lines(term.data), term)
    assert term.data == term.output.data == "".join(seen) and exits == []

    await term.kill()
    out = await term.wait(timeout=120)
    assert isinstance(out, TerminalOutput) and exits == ["exited"] and term.exit_code == -1
    with pytest.raises(TerminalException, match="has ended"):
        await term.send_data("echo again\n")

    # A terminal running a command ends with it; on_exit gets its exit code.
    codes: list[int] = []
    term = await ci.terminal.start(
        None, 90, 20, cwd="/srv", cmd="echo $SBX_G-$SBX_L; pwd; stty size; exit 3",
        env_vars={"SBX_L": "local"}, on_exit=codes.append, timeout=120,
    )
    out = await term.wait(timeout=120)
    assert _lines(out.data) == ["global-local", "/srv", "20 90"] and codes == [3] and term.exit_code == 3

    with pytest.raises(CurrentWorkingDirectoryDoesntExistException, match="/no/such/dir"):
        await ci.terminal.start(None, 80, 24, cwd="/no/such/dir", timeout=120)

    # The sandbox goes away under a running terminal: waiting for it says so.
    term = await ci.terminal.start(None, 80, 24, timeout=120)
    await ci.close()
    with pytest.raises(TerminalException, match="broke off"):
        await term.wait(timeout=120)
