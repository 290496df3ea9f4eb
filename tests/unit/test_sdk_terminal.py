"""TrEnv-X's ``sandbox.terminal`` (issue 13, item 2): its pure logic, then the whole API against
the real guest agent run on the host in direct mode (``tests/e2e/test_sdk_terminal.py`` repeats
it through the backend with real VMs)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Callable

import pytest

import sandbox_sdk
from sandbox_sdk import exceptions
from sandbox_sdk.sandbox import Sandbox
from sandbox_sdk.sandbox.terminal import Terminal, TerminalFinished, TerminalOutput, _size, _terminal_errors
from tests.unit.test_sdk_agent import TOKEN, USER, agent_url  # noqa: F401 - the real agent, as a fixture

# -- pure logic


def test_names_are_importable_where_trenvx_code_imports_them() -> None:
    from sandbox_sdk import Terminal as T1
    from sandbox_sdk import TerminalException, TerminalManager, TerminalOutput as O1
    from sandbox_sdk.sandbox import Terminal as T2
    from sandbox_sdk.sandbox import TerminalException as E2
    from sandbox_sdk.sandbox.exception import CurrentWorkingDirectoryDoesntExistException as C3
    from sandbox_sdk.sandbox.exception import TerminalException as E3
    from sandbox_sdk.sandbox.terminal import TerminalManager as M3

    assert T1 is T2 is Terminal and O1 is TerminalOutput and TerminalManager is M3
    # One class each, whichever path it is imported from (an alias to SandboxError would
    # make `except TerminalException` catch every error).
    assert TerminalException is E2 is E3 is exceptions.TerminalException
    assert TerminalException is not exceptions.SandboxError
    assert C3 is exceptions.CurrentWorkingDirectoryDoesntExistException
    for name in ("Terminal", "TerminalManager", "TerminalOutput"):
        assert name in sandbox_sdk.__all__ and name in sandbox_sdk.sandbox.__all__


@pytest.mark.parametrize(
    ("cols", "rows", "bad"),
    [(0, 24, "cols"), (80, -1, "rows"), (70000, 24, "cols"), (80, 24.5, "rows"), ("80", 24, "cols"), (True, 24, "cols")],
)
def test_size_is_checked_before_anything_is_sent(cols: object, rows: object, bad: str) -> None:
    with pytest.raises(exceptions.InvalidArgumentError, match=rf"terminal {bad} must be a whole number from 1 to 65535"):
        _size(cols, rows)  # type: ignore[arg-type]
    assert _size(1, 65535).cols == 1 and _size(132, 40).rows == 40


def test_output_accumulates_text() -> None:
    out = TerminalOutput()
    out._add_data("a")
    out._add_data("b\r\n")
    assert out.data == "ab\r\n"


@pytest.mark.parametrize(
    ("error", "kind", "text"),
    [
        (exceptions.ProcessNotFoundError("process with pid 7 not found", code="not_found"), exceptions.TerminalException,
         "doing it: the terminal is not running any more (process with pid 7 not found)"),
        (exceptions.RpcError("boom", code="internal"), exceptions.TerminalException, "doing it: boom"),
        (exceptions.InvalidArgumentError("bad size", code="invalid_argument"), exceptions.TerminalException,
         "doing it: bad size"),
        (exceptions.TimeoutError("slow"), exceptions.TimeoutError, "slow"),
        (exceptions.SandboxNotFoundError("gone"), exceptions.SandboxNotFoundError, "gone"),
        (exceptions.BackendUnreachableError("down"), exceptions.BackendUnreachableError, "down"),
        (exceptions.CurrentWorkingDirectoryDoesntExistException("no cwd"),
         exceptions.CurrentWorkingDirectoryDoesntExistException, "no cwd"),
    ],
)
def test_errors_from_the_sandbox_become_terminal_exceptions(
    error: exceptions.SandboxError, kind: type, text: str
) -> None:
    with pytest.raises(kind) as ei:
        with _terminal_errors("doing it"):
            raise error
    assert str(ei.value) == text
    if kind is exceptions.TerminalException:
        assert ei.value.__cause__ is error and ei.value.code == error.code


async def test_finished_answers_like_a_future_and_like_trenvx_event() -> None:
    done = TerminalFinished(loop=asyncio.get_running_loop())
    assert not done.is_set()
    done.set_exception(exceptions.TerminalException("broke"))
    assert done.is_set() and await done.wait() is True  # wait() never raises
    with pytest.raises(exceptions.TerminalException):
        await done


async def test_text_split_inside_a_character_is_decoded_whole() -> None:
    seen: list[str] = []
    term = Terminal("t", seen.append, None, None, None)  # type: ignore[arg-type]
    raw = "é€\r\n".encode()
    for i in range(len(raw)):
        await term._receive(raw[i : i + 1])
    await term._receive(b"\xff", final=True)
    assert term.data == "é€\r\n\ufffd" and "".join(seen) == term.data


# -- against the real agent


def _lines(data: str) -> list[str]:
    """The terminal's text as lines, without escape sequences (bash's bracketed paste mode)."""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", data)
    return [line for line in re.split(r"[\r\n]+", text) if line]


async def _until(pred: Callable[[], bool], term: Terminal, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen within {timeout}s; the terminal printed {term.data!r}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def ci(agent_url: str) -> Sandbox:  # noqa: F811
    s = await Sandbox.connect_direct(agent_url, user=USER, env_vars={"SBX_G": "global"}, access_token=TOKEN)
    yield s
    await s.close()


async def test_terminal_types_resizes_and_is_killed(ci: Sandbox) -> None:
    seen: list[str] = []
    exits: list[object] = []
    term = await ci.terminal.start(on_data=seen.append, cols=80, rows=24, on_exit=lambda: exits.append("called"))
    assert term.terminal_id == term.id and len(term.id) == 12 and term.pid
    await term.send_data("echo $((6*7))\n")
    await _until(lambda: "42" in _lines(term.data), term)
    assert "".join(seen) == term.data == term.output.data

    await term.resize(cols=100, rows=30)
    await term.send_data(b"stty size\n")
    await _until(lambda: "30 100" in _lines(term.data), term)

    assert not term.finished.is_set() and term.exit_code is None
    await term.kill()
    assert term.finished.is_set() and exits == ["called"] and term.exit_code == -1
    assert await term.wait() is term.output
    await term.kill()  # a second kill does nothing
    with pytest.raises(exceptions.TerminalException, match=rf"cannot send data to terminal {term.id}: .*has ended"):
        await term.send_data("echo again\n")
    with pytest.raises(exceptions.TerminalException, match="cannot resize"):
        await term.resize(cols=90, rows=20)


async def test_terminal_with_cmd_ends_with_it(ci: Sandbox, tmp_path: Path) -> None:
    codes: list[object] = []

    async def on_data(_: str) -> None:  # async callbacks are awaited
        await asyncio.sleep(0)

    term = await ci.terminal.start(
        on_data,
        90,
        20,
        cwd=str(tmp_path),
        cmd="echo $SBX_G-$SBX_L; pwd; stty size; tty >/dev/null && echo on-a-tty; exit 3",
        env_vars={"SBX_L": "local"},
        terminal_id="my-term",
        on_exit=codes.append,
    )
    out = await term.wait(timeout=30)
    assert _lines(out.data) == ["global-local", str(tmp_path), "20 90", "on-a-tty"]
    assert term.terminal_id == "my-term" and term.exit_code == 3 and codes == [3]


async def test_a_failing_on_data_does_not_stop_the_output(ci: Sandbox) -> None:
    def on_data(_: str) -> None:
        raise RuntimeError("callback bug")

    term = await ci.terminal.start(on_data, 80, 24, cmd="echo one; sleep 0.2; echo two")
    out = await term.wait(timeout=30)
    assert _lines(out.data) == ["one", "two"] and term.exit_code == 0


async def test_wait_with_a_timeout_leaves_the_terminal_running(ci: Sandbox) -> None:
    term = await ci.terminal.start(None, 80, 24)
    with pytest.raises(exceptions.TimeoutError, match=r"did not end within 0.2s; it is still running"):
        await term.wait(timeout=0.2)
    await term.send_data("exit 4\n")
    await term.wait(timeout=30)
    assert term.exit_code == 4


async def test_missing_cwd_and_bad_size(ci: Sandbox, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(exceptions.CurrentWorkingDirectoryDoesntExistException, match=r"'.*/nope' of terminal"):
        await ci.terminal.start(None, 80, 24, cwd=missing)
    with pytest.raises(exceptions.InvalidArgumentError, match="terminal rows"):
        await ci.terminal.start(None, 80, 0)


async def test_an_error_of_the_agent_is_a_terminal_exception(ci: Sandbox) -> None:
    with pytest.raises(exceptions.TerminalException, match="cannot start terminal x: .*no-such-user") as ei:
        await ci.terminal.start(None, 80, 24, terminal_id="x", user="no-such-user")
    assert isinstance(ei.value.__cause__, exceptions.SandboxError)
