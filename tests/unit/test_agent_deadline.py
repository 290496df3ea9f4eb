"""The agent's Connect deadlines (``Connect-Timeout-Ms``): parsing, and how a process stream ends.

As E2B's envd does: a Start stream whose deadline passes ends with the Connect error
``deadline_exceeded`` (not an end event) and its process, with its process group, is killed; a
Connect stream whose deadline passes ends the same way but leaves the process running.
"""
# ruff: noqa: F811 - pytest fixtures imported from the harness

from __future__ import annotations

import os
import time
from contextlib import aclosing

import httpx
import pytest

from tests.unit.test_agent_harness import AgentProcess, agent, client  # noqa: F401 - fixtures
from trenvx.guest.agent.connect import ConnectError, parse_timeout_ms
from trenvx.guest.agent.process import deadline_passed
from trenvx.guest.client import AgentClient, EnvelopeDecoder, encode_envelope

END_STREAM = 0x02


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("value, ms", [
    (None, None), ("", None), ("  ", None), ("0", None), ("1", 1), ("2000", 2000), (" 1500 ", 1500),
    ("9999999999", 9999999999),
])
def test_timeout_header_values(value: str | None, ms: int | None) -> None:
    assert parse_timeout_ms(value) == ms


@pytest.mark.parametrize("value", ["abc", "-5", "1.5", "1e3", "12345678901", "١٢", "+7"])
def test_malformed_timeout_header_is_invalid_argument(value: str) -> None:
    with pytest.raises(ConnectError) as ei:
        parse_timeout_ms(value)
    assert ei.value.code == "invalid_argument"
    assert "Connect-Timeout-Ms" in ei.value.message and "milliseconds" in ei.value.message


def test_deadline_passed() -> None:
    assert not deadline_passed(None, 1e12)
    assert not deadline_passed(10.0, 9.999)
    assert deadline_passed(10.0, 10.0) and deadline_passed(10.0, 11.0)


# ----------------------------------------------------------------------------- streams


def _start(cmd: str) -> bytes:
    return encode_envelope({"process": {"cmd": "/bin/bash", "args": ["-c", cmd]}})


async def _stream(agent: AgentProcess, method: str, body: bytes, timeout_ms: str | None) -> list[tuple[int, dict]]:
    headers = {"Content-Type": "application/connect+json"}
    if timeout_ms is not None:
        headers["Connect-Timeout-Ms"] = timeout_ms
    async with httpx.AsyncClient(base_url=agent.url, timeout=60) as raw:
        response = await raw.post(f"/process.Process/{method}", content=body, headers=headers)
    assert response.status_code == 200
    return EnvelopeDecoder().feed(response.content)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, within: float = 10.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return not _alive(pid)


pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the agent tests run as root (like the guest)")


async def test_start_past_its_deadline_ends_with_deadline_exceeded_and_kills(
        agent: AgentProcess, tmp_path) -> None:
    pidfile = tmp_path / "child.pid"
    # A grandchild in the same process group goes too (the agent signals the group).
    messages = await _stream(agent, "Start", _start(f"sleep 30 & echo $! > {pidfile}; echo up; wait"), "700")
    start = messages[0][1]["event"]["start"]
    assert "end" not in str([m for _, m in messages]), "a normal end event was sent past the deadline"
    flags, last = messages[-1]
    assert flags == END_STREAM
    assert last["error"]["code"] == "deadline_exceeded"
    assert "deadline" in last["error"]["message"] and "killed" in last["error"]["message"]
    assert _wait_gone(int(start["pid"]))
    assert _wait_gone(int(pidfile.read_text()))


async def test_start_ending_before_its_deadline_ends_normally(agent: AgentProcess) -> None:
    messages = await _stream(agent, "Start", _start("echo quick"), "30000")
    assert messages[-2][1]["event"]["end"]["exited"] is True
    assert messages[-1] == (END_STREAM, {})


async def test_malformed_deadline_is_refused_before_anything_runs(agent: AgentProcess, tmp_path) -> None:
    marker = tmp_path / "ran"
    messages = await _stream(agent, "Start", _start(f"touch {marker}"), "soon")
    assert messages == [(END_STREAM, messages[0][1])]
    assert messages[0][1]["error"]["code"] == "invalid_argument"
    time.sleep(0.2)
    assert not marker.exists()


async def test_connect_past_its_deadline_leaves_the_process_running(agent: AgentProcess, client: AgentClient) -> None:
    async with aclosing(client.start(["/bin/sleep", "30"])) as events:
        pid = (await anext(events)).pid
    assert pid is not None
    try:
        messages = await _stream(agent, "Connect", encode_envelope({"process": {"pid": pid}}), "400")
        assert messages[0][1]["event"]["start"]["pid"] == pid
        flags, last = messages[-1]
        assert flags == END_STREAM and last["error"]["code"] == "deadline_exceeded"
        assert "keeps running" in last["error"]["message"]
        assert _alive(pid)
        assert pid in {p.pid for p in await client.list_processes()}
    finally:
        await client.send_signal(pid, "SIGKILL")
    assert _wait_gone(pid)


async def test_deadline_kills_even_after_the_client_left(agent: AgentProcess, client: AgentClient) -> None:
    async with aclosing(client.start(["/bin/sleep", "30"], timeout=0.5)) as events:
        pid = (await anext(events)).pid
    assert pid is not None
    assert _wait_gone(pid), "a detached command outlived its deadline"


async def test_agent_client_run_raises_timeout_error(client: AgentClient) -> None:
    with pytest.raises(TimeoutError) as ei:
        await client.run("sleep 20", timeout=0.5)
    assert isinstance(ei.value.__cause__, Exception) and "deadline_exceeded" in str(ei.value.__cause__)
