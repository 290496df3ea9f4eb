"""Auto-pause, auto-resume and the retention of paused sandboxes on real VMs (issue 14 item 3).

Through E2B's unmodified ``e2b`` package and a real ``trenvx serve``: a sandbox created with
``lifecycle={"on_timeout": "pause"}`` is paused to disk at its timeout, not killed, and every write
the SDK saw acknowledged before the pause is there after the resume, with its memory and with only
its filesystem; with ``auto_resume`` an HTTP request through the server's proxy to the web server in
the sandbox (the template's start command serves /srv/www on the guest's 127.0.0.1:8080) resumes it,
once for concurrent requests, and is answered; it pauses again at its next timeout, survives a
server restart paused, and the SDK's next call resumes it; ``get_info()`` reports the lifecycle in
E2B's shape. A server with a short ``paused_retention_s`` kills a paused sandbox with the end
reason and removes its files. tests/unit/test_auto_pause.py covers the logic over fakes.
"""

from __future__ import annotations

import re
import signal
import threading
import time

import httpx
import pytest

from .server_helpers import e2b_pointed_at, make_server, running_server, wait_until

pytestmark = pytest.mark.e2e

e2b = pytest.importorskip("e2b")

API_KEY = "auto-pause-key"
HOME = "/home/user"
WEB_PORT = 8080
PAGE = "hello from the template\n"
TIMEOUT_S = 10
"""The sandboxes' timeout: long enough for a create's answer and the first steps to reach the test
under TCG (the writing test writes for this long: ~100 writes)."""
WAIT_S = 300.0
"""Bound on anything a VM does here (a pause, a boot from disk) under TCG."""


@pytest.fixture(scope="module")
def server(tmp_path_factory, e2e_config, test_template):
    with running_server(tmp_path_factory.mktemp("autopause"), e2e_config, template=test_template, api_key=API_KEY,
                        pools=False) as srv:
        yield srv


def detail(srv, sid: str) -> httpx.Response:
    """``GET /sandboxes/{id}`` through the API (not the proxy: it never wakes a sandbox)."""
    with srv.client() as c:
        return c.get(f"/sandboxes/{sid}")


def state(srv, sid: str) -> str:
    r = detail(srv, sid)
    return r.json()["state"] if r.status_code == 200 else f"gone ({r.status_code})"


def web(srv, sid: str) -> httpx.Response:
    """A request to the sandbox's port 8080 through the server's proxy (E2B's ``get_host`` Host)."""
    return httpx.get(f"{srv.url}/index.html", headers={"Host": f"{WEB_PORT}-{sid}.localhost:{srv.port}"}, timeout=WAIT_S)


def resumes(srv) -> float:
    text = httpx.get(f"{srv.url}/metrics", headers={"X-API-Key": API_KEY}, timeout=30).text
    return sum(float(v) for v in re.findall(r'^trenvx_resumes_total\{[^}]*outcome="ok"[^}]*\} (\S+)$', text, re.M))


@pytest.mark.parametrize("mode", ["full", "filesystem"])
def test_a_timeout_pauses_and_every_acknowledged_write_survives(server, test_template, mode: str) -> None:
    """The SDK writes files as fast as it can until the sandbox stops answering (it was paused at its
    timeout); after the resume every write it saw acknowledged is there, the last one included."""
    from e2b import Sandbox

    with e2b_pointed_at(server.url, API_KEY):
        sbx = Sandbox.create(test_template, timeout=TIMEOUT_S,
                             lifecycle={"on_timeout": {"action": "pause", "mode": mode}})
        sid = sbx.sandbox_id
        try:
            assert sbx.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": False}
            acknowledged = -1
            end = time.monotonic() + TIMEOUT_S + WAIT_S
            while time.monotonic() < end:
                try:
                    # bounded: a write caught by the pause's freeze would otherwise wait out the SDK's
                    # default request timeout before the loop learns the sandbox stopped answering
                    sbx.files.write(f"{HOME}/w{acknowledged + 1}.txt", f"write {acknowledged + 1}", request_timeout=10)
                except Exception:  # noqa: BLE001 - the sandbox stopped answering: it is being paused
                    break
                acknowledged += 1
            assert acknowledged >= 0, "no write got through before the timeout"
            assert wait_until(lambda: state(server, sid) == "paused", WAIT_S), state(server, sid)
            d = detail(server, sid).json()
            assert d["trenvx"]["pause"]["reason"] == "timeout", d["trenvx"]
            assert d["trenvx"]["pause"]["kind"] == ("memory" if mode == "full" else "filesystem")
            assert d["lifecycle"] == {"onTimeout": "pause", "autoResume": False, "autoPauseMemory": mode == "full"}
            # without auto-resume, traffic does not wake it: E2B's 502
            r = web(server, sid)
            assert r.status_code == 502 and "paused" in r.json()["message"]
            assert state(server, sid) == "paused"

            back = Sandbox.connect(sid, timeout=300)
            names = back.commands.run(f"ls {HOME} | grep -c '^w[0-9]*\\.txt$'", timeout=120).stdout
            assert int(names) >= acknowledged + 1
            for i in (0, acknowledged // 2, acknowledged):
                assert back.files.read(f"{HOME}/w{i}.txt") == f"write {i}", f"acknowledged write {i} is lost"
            print(f"\n{mode}: {acknowledged + 1} writes acknowledged before the auto-pause, all kept")
            assert back.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": False}
        finally:
            Sandbox.kill(sid)


def test_auto_resume_on_traffic_across_cycles_and_a_restart(tmp_path, e2e_config, test_template) -> None:
    from e2b import Sandbox

    srv = make_server(tmp_path, e2e_config, template=test_template, api_key=API_KEY, pools=False).start()
    try:
        with e2b_pointed_at(srv.url, API_KEY):
            sbx = Sandbox.create(test_template, timeout=TIMEOUT_S, lifecycle={"on_timeout": "pause", "auto_resume": True})
            sid = sbx.sandbox_id
            assert sbx.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": True}
            sbx.commands.run("echo 42 > /tmp/in-memory-only", timeout=60)
            sbx.commands.run("sleep 100000", background=True, timeout=0)
            assert web(srv, sid).text == PAGE  # the template's web server, while it runs

            # 1. paused at its timeout; concurrent requests through the proxy resume it once
            assert wait_until(lambda: state(srv, sid) == "paused", WAIT_S), state(srv, sid)
            before = resumes(srv)
            answers: list[httpx.Response] = []
            threads = [threading.Thread(target=lambda: answers.append(web(srv, sid))) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert [r.status_code for r in answers] == [200] * 3 and {r.text for r in answers} == {PAGE}
            assert state(srv, sid) == "running" and resumes(srv) == before + 1
            assert detail(srv, sid).json()["trenvx"]["timeoutLeft"] > 0

            # 2. it pauses again at its next timeout; a server restart keeps it paused with its lifecycle
            assert wait_until(lambda: state(srv, sid) == "paused", WAIT_S), state(srv, sid)
            assert srv.stop(signal.SIGTERM) == 0
            srv.start()
            d = detail(srv, sid).json()
            assert d["state"] == "paused" and d["lifecycle"]["onTimeout"] == "pause" and d["lifecycle"]["autoResume"]

            # 3. the SDK's next call (the agent's port, with the sandbox's token) resumes it: its memory is back
            assert sbx.files.read("/tmp/in-memory-only") == "42\n"
            assert state(srv, sid) == "running"
            assert [p for p in sbx.commands.list() if "100000" in " ".join([p.cmd, *p.args])]
            assert sbx.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": True}
            Sandbox.kill(sid)
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.stop()
    assert srv.sandbox_dirs() == []
    srv.cleanup()


def test_a_paused_sandbox_past_the_retention_is_killed_with_its_files(tmp_path, e2e_config, test_template) -> None:
    from e2b import Sandbox
    from e2b.exceptions import NotFoundException

    with running_server(tmp_path, e2e_config, template=test_template, api_key=API_KEY, pools=False,
                        paused_retention_s=5) as srv, e2b_pointed_at(srv.url, API_KEY):
        sbx = Sandbox.create(test_template, timeout=600)
        sid = sbx.sandbox_id
        assert sbx.pause() is True
        assert srv.sandbox_dirs() == [sid]
        assert wait_until(lambda: detail(srv, sid).status_code == 404, WAIT_S)
        message = detail(srv, sid).json()["message"]
        assert "stayed paused longer than" in message and "paused_retention_s" in message, message
        assert srv.sandbox_dirs() == []
        with srv.client() as c:
            ended = c.get("/v2/sandboxes", params={"state": "exited"}).json()
        assert [s["trenvx"]["endReason"] for s in ended if s["sandboxID"] == sid] == ["paused_retention_expired"]
        with pytest.raises(NotFoundException):
            Sandbox.connect(sid)
