"""configs/claude-code/ide-ready, the claude-code template's ready_cmd, against a stand-in for
code-server: it succeeds only when the IDE serves its workbench, and it fetches what a browser loads
next (the page's scripts and styles, gzipped), so that the snapshot holds a warmed server."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

READY = Path(__file__).resolve().parents[2] / "configs" / "claude-code" / "ide-ready"

WORKBENCH = """<!DOCTYPE html><html><head>
<link rel="icon" href="./_static/src/browser/media/favicon.ico" />
<link rel="stylesheet" href="./stable-abc/static/out/vs/code/browser/workbench/workbench.css">
</head><body></body>
<script type="module" src="./stable-abc/static/out/nls.messages.js"></script>
<script type="module" src="https://cdn.example.invalid/never.js"></script>
<script type="module" src="/stable-abc/static/out/vs/code/browser/workbench/workbench.js"></script>
</html>"""

ASSETS = {
    "/stable-abc/static/out/vs/code/browser/workbench/workbench.css",
    "/stable-abc/static/out/nls.messages.js",
    "/stable-abc/static/out/vs/code/browser/workbench/workbench.js",
}

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="ide-ready uses curl")


@dataclass
class FakeIde:
    """What the stand-in answers and what it was asked."""

    healthy: bool = True
    page: str = WORKBENCH
    missing: set[str] = field(default_factory=set)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (path, Accept-Encoding)
    port: int = 0


@pytest.fixture
def ide() -> Iterator[FakeIde]:
    state = FakeIde()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            state.requests.append((self.path, self.headers.get("Accept-Encoding", "")))
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._answer(200 if state.healthy else 503, b'{"status":"alive"}', "application/json")
            elif path == "/":
                self._answer(200, state.page.encode(), "text/html")
            elif path in ASSETS and path not in state.missing:
                self._answer(200, b"x" * 4096, "text/javascript")
            else:
                self._answer(404, b"not found", "text/plain")

        def _answer(self, status: int, body: bytes, ctype: str) -> None:
            if "gzip" in self.headers.get("Accept-Encoding", ""):
                body = gzip.compress(body)
                self.send_response(status)
                self.send_header("Content-Encoding", "gzip")
            else:
                self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def run_ready(ide: FakeIde) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IDE_PORT": str(ide.port), "IDE_FOLDER": "/home/user/workspace"}
    return subprocess.run([str(READY)], env=env, capture_output=True, text=True, timeout=60)


def test_ready_fetches_the_page_and_its_scripts_gzipped(ide: FakeIde) -> None:
    res = run_ready(ide)
    assert res.returncode == 0, res.stderr
    paths = [p for p, _ in ide.requests]
    assert paths[0] == "/healthz"
    assert paths[1] == "/?folder=/home/user/workspace"
    assert set(paths[2:]) == ASSETS  # scripts and styles, not icons, not other hosts
    assert all("gzip" in enc for p, enc in ide.requests[1:]), ide.requests


def test_not_ready_while_the_server_is_unhealthy(ide: FakeIde) -> None:
    ide.healthy = False
    res = run_ready(ide)
    assert res.returncode != 0
    assert [p for p, _ in ide.requests] == ["/healthz"]


def test_not_ready_when_the_page_names_no_scripts(ide: FakeIde) -> None:
    ide.page = "<html><body>Loading...</body></html>"
    res = run_ready(ide)
    assert res.returncode != 0
    assert "names no scripts" in res.stderr


def test_not_ready_when_a_script_fails(ide: FakeIde) -> None:
    ide.missing = {"/stable-abc/static/out/vs/code/browser/workbench/workbench.js"}
    assert run_ready(ide).returncode != 0


def test_not_ready_when_nothing_listens() -> None:
    env = {**os.environ, "IDE_PORT": "1"}
    res = subprocess.run([str(READY)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
