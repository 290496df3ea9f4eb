"""A server restarted with sandboxes running: it adopts the VMs still alive and cleans up the
ones whose VMM died meanwhile (state in SQLite under data_root/run/)."""

from __future__ import annotations

import signal

import httpx
import pytest


from .server_helpers import kill_pid, through_proxy, make_server, pid_running, vm_pid, wait_until

pytestmark = pytest.mark.e2e


async def echo(url: str, sandbox: dict, text: str) -> bytes:
    out = b""
    async with through_proxy(url, sandbox) as c:
        async for ev in c.start(["/bin/sh", "-c", f"echo {text}; cat /root/marker 2>/dev/null"]):
            if ev.kind == "stdout":
                out += ev.data
    return out


async def test_restart_adopts_running_vms_and_cleans_dead_ones(tmp_path, e2e_config, test_template) -> None:
    srv = make_server(tmp_path, e2e_config, template=test_template, pools=False).start(keep=True)
    pids: list[int] = []
    try:
        with srv.client() as c:
            keep = c.post("/sandboxes", json={"templateID": "base", "timeout": 200, "metadata": {"role": "keep"}}).json()
            dies = c.post("/sandboxes", json={"templateID": "base", "metadata": {"role": "dies"}}).json()
        pids = [vm_pid(srv, keep["sandboxID"]), vm_pid(srv, dies["sandboxID"])]
        async with through_proxy(srv.url, keep) as ec:
            async for _ in ec.start(["/bin/sh", "-c", "echo state-before-restart > /root/marker"]):
                pass

        assert srv.stop(signal.SIGTERM) == 0
        assert all(pid_running(p) for p in pids), "--keep leaves the VMs running"
        assert sorted(srv.sandbox_dirs()) == sorted([keep["sandboxID"], dies["sandboxID"]])
        kill_pid(pids[1])  # one VMM dies while no server runs
        assert wait_until(lambda: not pid_running(pids[1]), 5)

        srv.start(keep=False)
        with srv.client() as c:
            d = c.get(f"/sandboxes/{keep['sandboxID']}")
            assert d.status_code == 200, d.text
            info = d.json()
            assert info["trenvx"]["adopted"] and info["trenvx"]["pid"] == pids[0]
            assert info["metadata"] == {"role": "keep"} and info["envdAccessToken"] == keep["envdAccessToken"]
            assert 150 < info["trenvx"]["timeoutLeft"] <= 200
            gone = c.get(f"/sandboxes/{dies['sandboxID']}")
            assert gone.status_code == 404 and "while the server was not running" in gone.json()["message"]
            assert [s["sandboxID"] for s in c.get("/sandboxes").json()] == [keep["sandboxID"]]
        assert srv.sandbox_dirs() == [keep["sandboxID"]], "the dead sandbox's files are removed"
        # the adopted sandbox works: agent reached through its recorded port and token; state kept
        assert await echo(srv.url, keep, "still-here") == b"still-here\nstate-before-restart\n"
        # the adopted VM's death is still noticed (pidfd: it is not this server's child)
        kill_pid(pids[0])
        with srv.client() as c:
            assert wait_until(lambda: c.get(f"/sandboxes/{keep['sandboxID']}").status_code == 404, 5)
        assert wait_until(lambda: srv.sandbox_dirs() == [], 5)
        log = srv.log(200)
        assert "adopted 1 running sandboxes" in log and "cleaned up 1 dead ones" in log, log
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.stop()
        for p in pids:
            kill_pid(p)
    assert srv.sandbox_dirs() == []
    srv.cleanup()


async def test_keep_then_normal_stop_kills_adopted_vms(tmp_path, e2e_config, test_template) -> None:
    srv = make_server(tmp_path, e2e_config, template=test_template, pools=False).start(keep=True)
    pid = 0
    try:
        with srv.client() as c:
            sb = c.post("/sandboxes", json={"templateID": "base"}).json()
        pid = vm_pid(srv, sb["sandboxID"])
        assert srv.stop(signal.SIGINT) == 0 and pid_running(pid)
        srv.start(keep=False)
        assert httpx.get(f"{srv.url}/sandboxes/{sb['sandboxID']}").status_code == 200
        assert srv.stop() == 0
        assert wait_until(lambda: not pid_running(pid), 5)
        assert srv.sandbox_dirs() == []
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.stop()
        if pid:
            kill_pid(pid)
        srv.cleanup()
