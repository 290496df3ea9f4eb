"""How a command's stream ends when its deadline passes or its sandbox goes away (issue 13 item 7).

E2B's envd ends a command stream whose ``Connect-Timeout-Ms`` deadline passed with the Connect
error ``deadline_exceeded`` (and kills the command); a stream whose sandbox is killed is cut.
E2B's SDK then raises (``TimeoutException``; a transport error or ``SandboxNotRunningException``)
instead of returning a ``CommandResult``. Driven through the unmodified ``e2b`` package and
through ``sandbox_sdk.e2b`` against the session backend.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.e2e

e2b = pytest.importorskip("e2b")

BOUND_S = 60.0
"""Generous bound (TCG is slow) on how long an ended command may take to be reported."""


def _running(sbx, pattern: str) -> list[str]:
    """Command lines of the sandbox's processes matching ``pattern`` (as root: every user's)."""
    r = sbx.commands.run(f"ps -eo args= | grep -F -- {pattern!r} | grep -v grep || true", user="root")
    return [line for line in r.stdout.splitlines() if line.strip()]


def _gone(sbx, pattern: str) -> bool:
    """Whether no process matching ``pattern`` is left, waiting a bounded time: the SDK's own timer
    may raise a moment before the agent's deadline kill lands."""
    end = time.monotonic() + BOUND_S
    while _running(sbx, pattern):
        if time.monotonic() > end:
            return False
        time.sleep(0.2)
    return True


def _kill_via_api(backend: str, sandbox_id: str) -> None:
    r = httpx.delete(f"{backend}/sandboxes/{sandbox_id}", timeout=120)
    assert r.status_code == 204, r.text


def test_e2b_command_deadline_raises_timeout_and_kills_it(e2b_env: str, test_template: str) -> None:
    from e2b import Sandbox
    from e2b.exceptions import TimeoutException

    sbx = Sandbox.create(test_template, timeout=300)
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutException):
            sbx.commands.run("sleep 30; echo finished", timeout=2)
        assert time.monotonic() - t0 < BOUND_S
        assert _gone(sbx, "sleep 30"), "the command outlived its deadline"
        # A command that ends before its deadline is unaffected.
        assert sbx.commands.run("echo quick", timeout=30).stdout == "quick\n"
    finally:
        sbx.kill()


def test_e2b_background_wait_raises_when_the_sandbox_is_killed(e2b_env: str, test_template: str) -> None:
    from e2b import Sandbox
    from e2b.exceptions import SandboxNotRunningException

    sbx = Sandbox.create(test_template, timeout=300)
    try:
        handle = sbx.commands.run("sleep 60", background=True, timeout=0)
        outcome: dict[str, object] = {}

        def wait() -> None:
            try:
                outcome["result"] = handle.wait()
            except BaseException as e:  # noqa: BLE001 - what the SDK raised is the point
                outcome["error"] = e

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        time.sleep(0.5)  # let wait() attach to the stream
        _kill_via_api(e2b_env, sbx.sandbox_id)
        waiter.join(BOUND_S)
        assert not waiter.is_alive(), "wait() did not return after the sandbox was killed"
        assert "result" not in outcome, f"wait() returned {outcome.get('result')!r} for a killed sandbox"
        # The proxy ends the stream with "The sandbox ... was not found": E2B's not-running error.
        assert isinstance(outcome["error"], SandboxNotRunningException), outcome
    finally:
        sbx.kill()


def test_e2b_wait_raises_when_the_sandbox_vm_dies(e2b_env: str, test_template: str) -> None:
    """Not killed through the API: the VMM process itself dies under a running command."""
    from e2b import Sandbox
    from e2b.exceptions import SandboxNotRunningException

    sbx = Sandbox.create(test_template, timeout=300)
    try:
        pid = int(httpx.get(f"{e2b_env}/sandboxes/{sbx.sandbox_id}", timeout=30).json()["trenvx"]["pid"])
        handle = sbx.commands.run("sleep 60", background=True, timeout=0)
        outcome: dict[str, object] = {}

        def wait() -> None:
            try:
                outcome["result"] = handle.wait()
            except BaseException as e:  # noqa: BLE001
                outcome["error"] = e

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        waiter.join(BOUND_S)
        assert not waiter.is_alive(), "wait() did not return after the sandbox's VM died"
        assert isinstance(outcome.get("error"), SandboxNotRunningException), outcome
        assert "was not found" in str(outcome["error"]) and "exited" in str(outcome["error"])
    finally:
        sbx.kill()


def test_deadline_ends_the_stream_through_the_proxy(e2b_env: str, test_template: str) -> None:
    """The raw Connect stream, as the server's proxy passes it on: no end event, the error
    ``deadline_exceeded`` (the client itself sets no timeout here)."""
    from e2b import Sandbox

    sbx = Sandbox.create(test_template, timeout=300)
    try:
        headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983",
                   "Content-Type": "application/connect+json", "Connect-Timeout-Ms": "1500"}
        token = sbx._envd_access_token
        if token:
            headers["X-Access-Token"] = token
        body = json.dumps({"process": {"cmd": "/bin/sleep", "args": ["30"]}}).encode()
        r = httpx.post(f"{e2b_env}/process.Process/Start", headers=headers,
                       content=struct.pack(">BI", 0, len(body)) + body, timeout=httpx.Timeout(BOUND_S))
        assert r.status_code == 200
        messages = _envelopes(r.content)
        assert "start" in messages[0][1]["event"]
        assert not any("end" in m.get("event", {}) for _, m in messages)
        flags, last = messages[-1]
        assert flags == 0x02 and last["error"]["code"] == "deadline_exceeded", last
        assert _gone(sbx, "sleep 30")
    finally:
        sbx.kill()


def _envelopes(raw: bytes) -> list[tuple[int, dict]]:
    out, i = [], 0
    while i + 5 <= len(raw):
        flags, n = struct.unpack(">BI", raw[i:i + 5])
        out.append((flags, json.loads(raw[i + 5:i + 5 + n])))
        i += 5 + n
    assert i == len(raw), "a truncated envelope"
    return out


async def test_e2b_async_deadline_raises_timeout(e2b_env: str, test_template: str) -> None:
    from e2b import AsyncSandbox
    from e2b.exceptions import TimeoutException

    sbx = await AsyncSandbox.create(test_template, timeout=300)
    try:
        with pytest.raises(TimeoutException):
            await sbx.commands.run("sleep 30", timeout=2)
    finally:
        await sbx.kill()


async def test_sandbox_sdk_deadline_and_killed_sandbox_raise(sdk_backend: str, test_template: str) -> None:
    from sandbox_sdk import exceptions
    from sandbox_sdk.e2b import AsyncSandbox

    sbx = await AsyncSandbox.create(test_template, timeout=300, api_url=sdk_backend)
    try:
        with pytest.raises(exceptions.TimeoutException):
            await sbx.commands.run("sleep 30", timeout=2)
        for _ in range(int(BOUND_S / 0.2)):  # bounded: the SDK's timer may beat the agent's kill
            left = await sbx.commands.run("ps -eo args= | grep -F 'sleep 30' | grep -v grep || true", user="root")
            if not left.stdout.strip():
                break
            await asyncio.sleep(0.2)
        assert left.stdout.strip() == "", "the command outlived its deadline"

        handle = await sbx.commands.run("sleep 60", background=True, timeout=0)
        wait = asyncio.ensure_future(handle.wait())
        await asyncio.sleep(0.5)
        await asyncio.to_thread(_kill_via_api, sdk_backend, sbx.sandbox_id)
        done, _ = await asyncio.wait({wait}, timeout=BOUND_S)
        assert done, "wait() did not return after the sandbox was killed"
        with pytest.raises(exceptions.SandboxNotFoundError):
            wait.result()
    finally:
        await sbx.kill()
        await sbx.close()
