"""The agent's connection threads: connections go to threads already waiting (started with the
agent, so a restored sandbox does not create one on its first request), more connections than
waiting threads each still get one, and at most IDLE_WORKERS wait between connections."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from trenvx.guest.agent.identity import SYSTEM_STEPS, SystemIdentity
from trenvx.guest.agent.server import Agent, AgentHTTPServer


def conn_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "agent-conn"}


def get_health(port: int, hold_s: float = 0.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = s.recv(1024)
        time.sleep(hold_s)  # keep the connection (and its thread) busy
        return data


def test_connections_use_waiting_threads_and_the_idle_ones_are_bounded(tmp_path) -> None:
    before = conn_threads()
    agent = Agent(system=SystemIdentity(skip=set(SYSTEM_STEPS), etc=str(tmp_path)))
    server = AgentHTTPServer(("127.0.0.1", 0), agent, idle_workers=2)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    port = server.server_address[1]
    try:
        started = conn_threads() - before
        assert len(started) == 2, "the waiting threads exist before any connection"
        assert get_health(port).startswith(b"HTTP/1.1 204")
        assert conn_threads() - before == started, "one connection: served by a waiting thread, none made"
        # six held at once: two waiting threads and four new ones; all answered
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: get_health(port, hold_s=0.5), range(6)))
        assert all(a.startswith(b"HTTP/1.1 204") for a in answers)
        deadline = time.monotonic() + 5
        while len(conn_threads() - before) > 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(conn_threads() - before) == 2, "back to the idle bound once the connections closed"
    finally:
        server.shutdown()
        server.server_close()
        agent.shutdown()
    deadline = time.monotonic() + 5
    while conn_threads() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not conn_threads() - before, "server_close ends the waiting threads"
