"""The agent's process service, driven through AgentClient and raw Connect requests."""
# ruff: noqa: F811 - pytest fixtures imported from the harness

from __future__ import annotations

import asyncio
import os
import time
from contextlib import aclosing
from pathlib import Path

import httpx
import pytest

from tests.unit.test_agent_harness import AgentProcess, agent, client, fresh_agent  # noqa: F401 - fixtures
from trenvx.guest.client import (
    AgentClient,
    AgentError,
    EnvelopeDecoder,
    encode_envelope,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the agent tests run as root (like the guest)")


async def test_run_collects_output_and_exit_code(client: AgentClient) -> None:
    result = await client.run("echo out; echo err >&2; exit 7")
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"
    assert result.exit_code == 7
    assert result.error == "exit status 7"

    ok = await client.run(["/bin/echo", "-n", "argv", "form"])
    assert (ok.stdout, ok.exit_code, ok.error) == (b"argv form", 0, None)


async def test_output_streams_incrementally_and_in_order(client: AgentClient) -> None:
    script = "for i in 1 2 3 4 5; do echo line$i; sleep 0.3; done"
    events = []
    first_at = None
    started = time.monotonic()
    async for event in client.start(script):
        if event.kind == "stdout" and first_at is None:
            first_at = time.monotonic() - started
        events.append(event)
    total = time.monotonic() - started
    assert events[0].kind == "start" and events[0].pid
    assert events[-1].kind == "end" and events[-1].exit_code == 0
    out = b"".join(e.data for e in events if e.kind == "stdout")
    assert out == b"".join(b"line%d\n" % i for i in range(1, 6))
    assert first_at is not None and first_at < total - 0.8, (first_at, total)
    assert sum(1 for e in events if e.kind == "stdout") >= 3  # not one blob at the end


async def test_interleaved_stdout_stderr_order(client: AgentClient) -> None:
    script = "for i in 1 2 3; do echo o$i; sleep 0.05; echo e$i >&2; sleep 0.05; done"
    seq = [(e.kind, e.data) async for e in client.start(script) if e.kind in ("stdout", "stderr")]
    assert seq == [("stdout", b"o1\n"), ("stderr", b"e1\n"), ("stdout", b"o2\n"), ("stderr", b"e2\n"),
                   ("stdout", b"o3\n"), ("stderr", b"e3\n")]


async def test_non_utf8_output_round_trips(client: AgentClient) -> None:
    payload = bytes(range(256))
    result = await client.run(["/usr/bin/printf", "".join(f"\\{b:03o}" for b in payload)])
    assert result.stdout == payload


async def test_large_output(client: AgentClient) -> None:
    result = await client.run("head -c 5000000 /dev/zero | tr '\\0' 'x'")
    assert result.stdout == b"x" * 5_000_000


async def test_stdin_is_written_and_closed(client: AgentClient) -> None:
    data = b"hello\x00\xff world\n" * 1000
    result = await client.run("cat; echo done >&2", stdin=data)
    assert result.stdout == data
    assert result.stderr == b"done\n"


async def test_stream_input_client_streaming(agent: AgentProcess, client: AgentClient) -> None:
    async with aclosing(client.start(["/bin/cat"], stdin=True)) as events:
        start = await anext(events)
        pid = start.pid
        assert pid
        body = b"".join(encode_envelope(m) for m in (
            {"start": {"process": {"pid": pid}}},
            {"data": {"input": {"stdin": "b25lCg=="}}},  # "one\n"
            {"keepalive": {}},
            {"data": {"input": {"stdin": "dHdvCg=="}}},  # "two\n"
        ))

        async def chunks():  # a real client stream: chunked body, pieces over time
            for i in range(0, len(body), 7):
                yield body[i:i + 7]
                await asyncio.sleep(0)

        async with httpx.AsyncClient(base_url=agent.url) as raw:
            response = await raw.post("/process.Process/StreamInput", content=chunks(),
                                      headers={"Content-Type": "application/connect+json"})
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/connect+json"
        messages = EnvelopeDecoder().feed(response.content)
        assert messages == [(0, {}), (2, {})]
        await client.close_stdin(pid)
        out = b""
        async for event in events:
            if event.kind == "stdout":
                out += event.data
        assert out == b"one\ntwo\n"


async def test_env_vars_and_cwd(client: AgentClient, tmp_path: Path) -> None:
    result = await client.run('echo "$FOO|$HOME|$USER|$PWD"', envs={"FOO": "bar baz"}, cwd=str(tmp_path))
    assert result.stdout.decode().strip() == f"bar baz|/root|root|{tmp_path}"


async def test_missing_cwd_is_invalid_argument(client: AgentClient) -> None:
    with pytest.raises(AgentError) as info:
        await client.run("true", cwd="/definitely/not/here")
    assert info.value.code == "invalid_argument"
    assert "/definitely/not/here" in info.value.message


async def test_missing_executable_is_invalid_argument(client: AgentClient) -> None:
    with pytest.raises(AgentError) as info:
        await client.run(["/no/such/binary"])
    assert info.value.code == "invalid_argument"
    result = await client.run("no-such-command-xyz")
    assert result.exit_code == 127


async def test_runs_as_another_user(client: AgentClient) -> None:
    result = await client.run(["/usr/bin/id", "-un"], user="nobody")
    assert result.stdout.strip() == b"nobody"
    result = await client.run('echo "$USER $HOME"; id -u', user="nobody")
    lines = result.stdout.decode().split("\n")
    assert lines[0] == "nobody /nonexistent"
    assert lines[1] == "65534"


async def test_unknown_user_is_invalid_argument(client: AgentClient) -> None:
    with pytest.raises(AgentError) as info:
        await client.run("true", user="no-such-user-42")
    assert info.value.code == "invalid_argument"
    assert "no-such-user-42" in info.value.message


async def test_sigterm_and_sigkill(client: AgentClient) -> None:
    for signame, status in (("SIGTERM", "signal: terminated"), ("SIGKILL", "signal: killed")):
        async with aclosing(client.start(["/bin/sleep", "30"])) as events:
            start = await anext(events)
            await client.send_signal(start.pid, signame)  # type: ignore[arg-type]
            end = [e async for e in events][-1]
        assert end.kind == "end"
        assert end.exit_code == -1
        assert end.error == status


async def test_signal_reaches_the_whole_process_group(client: AgentClient) -> None:
    """Killing a shell also kills its child that holds the output pipe."""
    started = time.monotonic()
    async with aclosing(client.start("sleep 30; echo never")) as events:
        start = await anext(events)
        await asyncio.sleep(0.2)
        await client.send_signal(start.pid, "SIGKILL")
        end = [e async for e in events][-1]
    assert end.kind == "end" and end.error == "signal: killed"
    assert time.monotonic() - started < 10


async def test_unknown_pid_is_not_found(client: AgentClient) -> None:
    for call in (client.send_signal(999999, "SIGKILL"), client.send_input(999999, b"x"),
                 client.close_stdin(999999)):
        with pytest.raises(AgentError) as info:
            await call
        assert info.value.code == "not_found"


async def test_process_survives_client_disconnect_and_connect(client: AgentClient, agent: AgentProcess) -> None:
    async with aclosing(client.start("for i in $(seq 1 15); do echo tick$i; sleep 0.2; done",
                                     tag="ticker")) as events:
        start = await anext(events)
        pid = start.pid
        first = await anext(events)
        assert first.kind == "stdout"
    # Detached: the process is still listed and running.
    listed = {p.pid: p for p in await client.list_processes()}
    assert pid in listed
    assert listed[pid].tag == "ticker"
    assert listed[pid].cmd == "/bin/bash"
    # Re-attach by pid and read the rest of its output and its end.
    events = [e async for e in client.connect(pid)]
    assert events[0].kind == "start" and events[0].pid == pid
    assert events[-1].kind == "end" and events[-1].exit_code == 0
    assert b"tick15\n" in b"".join(e.data for e in events)
    assert pid not in {p.pid for p in await client.list_processes()}


async def test_connect_by_tag_over_raw_connect(agent: AgentProcess, client: AgentClient) -> None:
    async with aclosing(client.start(["/bin/sleep", "0.5"], tag="napper")) as events:
        await anext(events)
        async with httpx.AsyncClient(base_url=agent.url) as raw:
            response = await raw.post("/process.Process/Connect",
                                      content=encode_envelope({"process": {"tag": "napper"}}),
                                      headers={"Content-Type": "application/connect+json"})
        messages = EnvelopeDecoder().feed(response.content)
        assert "start" in messages[0][1]["event"]
        assert messages[-2][1]["event"]["end"]["exited"] is True
        assert messages[-1] == (2, {})


async def test_timeout_kills_the_command(client: AgentClient) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await client.run("sleep 20", timeout=0.5)
    assert time.monotonic() - started < 5


async def test_pty_mode(client: AgentClient) -> None:
    async with aclosing(client.start("stty size; tty; read line; echo got:$line",
                                     pty=(100, 30))) as events:
        start = await anext(events)
        await client.send_input(start.pid, b"hello\n", pty=True)
        out = b""
        end = None
        async for event in events:
            if event.kind == "pty":
                out += event.data
            elif event.kind == "end":
                end = event
    text = out.decode()
    assert "30 100" in text
    assert "/dev/pts/" in text
    assert "got:hello" in text
    assert end is not None and end.exit_code == 0
    with pytest.raises(AgentError):
        await client.close_stdin(start.pid)  # the process is gone by now


async def test_pty_resize_is_seen_by_the_process(client: AgentClient) -> None:
    async with aclosing(client.start("read a; stty size", pty=(80, 24))) as events:
        start = await anext(events)
        await client.resize_pty(start.pid, 132, 50)
        await client.send_input(start.pid, b"\n", pty=True)
        out = b"".join([e.data async for e in events if e.kind == "pty"])
    assert b"50 132" in out


async def test_close_stdin_on_pty_is_refused(client: AgentClient) -> None:
    async with aclosing(client.start(["/bin/cat"], pty=(80, 24))) as events:
        start = await anext(events)
        with pytest.raises(AgentError) as info:
            await client.close_stdin(start.pid)
        assert info.value.code == "failed_precondition"
        await client.send_signal(start.pid, "SIGKILL")


async def test_many_concurrent_commands(client: AgentClient) -> None:
    results = await asyncio.gather(*(client.run(f"echo {i}; sleep 0.2") for i in range(40)))
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(40)]


async def test_children_are_reaped(agent: AgentProcess, client: AgentClient) -> None:
    for _ in range(5):
        await client.run("true")
    await asyncio.sleep(0.2)
    zombies = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, ppid = fields[0], int(fields[1])
        if ppid == agent.pid and state == "Z":
            zombies.append(entry)
    assert zombies == []


async def test_default_envs_from_init(fresh_agent: AgentProcess) -> None:
    async with AgentClient(fresh_agent.url) as c:
        await c.init(sandbox_id="sbx-1", env_vars={"FROM_INIT": "yes", "OVERRIDE": "init"},
                     access_token=None, hostname="sbx-1")
        assert await c.envs() == {"FROM_INIT": "yes", "OVERRIDE": "init"}
        result = await c.run('echo "$FROM_INIT $OVERRIDE"', envs={"OVERRIDE": "request"})
        assert result.stdout == b"yes request\n"


async def test_background_grandchild_does_not_hold_the_end(client: AgentClient) -> None:
    """A daemonised grandchild keeps the pipes open; the end still comes right away."""
    started = time.monotonic()
    result = await client.run("sleep 5 & echo started")
    assert result.stdout == b"started\n" and result.exit_code == 0
    assert time.monotonic() - started < 3


async def test_detached_chatty_process_is_not_blocked(client: AgentClient, tmp_path: Path) -> None:
    """Output nobody listens to is dropped, so the process never blocks on a full pipe."""
    marker = tmp_path / "finished"
    async with aclosing(client.start(f"head -c 30000000 /dev/zero; touch {marker}")) as events:
        await anext(events)  # start, then detach
    deadline = time.monotonic() + 20
    while not marker.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert marker.exists()
