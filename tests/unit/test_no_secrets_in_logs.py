"""No token or key ever appears in a log (issue 18, item 4).

A real server (uvicorn as ``trenvx serve`` runs it, access log on, everything at DEBUG) with an API
key, over a fake manager whose sandbox has an envd access token and, being private, a traffic
access token. The test drives it through create, commands and file calls through the proxy, a
private port by header, by URL token and by cookie, a signed /files URL, the wrong key and the
wrong tokens, then reads every log record (the server's loggers, uvicorn's access and error logs,
the fake VM's log files) and asserts that no secret appears: not the key, not either token, not
a signature, not a query token.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import uvicorn

from trenvx.guest.agent import signing
from trenvx.server.app import create_app

from .server_fakes import ThreadedServer, UpstreamState, fake_manager, free_port, make_config, make_template, upstream_app

API_KEY = "sk-test-key-3e1f0b9c7d"
STRANGER_SECRET = "sekrit-query-value-94a1"


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_no_secret_reaches_any_log(tmp_path: Path) -> None:
    capture = Capture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    # As runner.setup_logging: the HTTP client libraries (this test's own client among them) at WARNING.
    quiet = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        secrets = _drive(tmp_path)
    finally:
        root.removeHandler(capture)
        root.setLevel(old_level)
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
    text = "\n".join(capture.lines)
    files = "\n".join(p.read_text(errors="replace") for p in tmp_path.rglob("*.log"))
    assert "uvicorn.access" in text, "the access log was captured"
    for name, value in secrets.items():
        assert value and value not in text, f"{name} in the server's log: " + \
            next(line for line in capture.lines if value in line)
        assert value not in files, f"{name} in a log file"


def _drive(tmp_path: Path) -> dict[str, str]:
    make_template(tmp_path, "tpl")
    cfg = make_config(tmp_path, api_key=API_KEY)
    with ThreadedServer(upstream_app(UpstreamState())) as upstream:
        m = fake_manager(cfg, upstream.port, forwards={8000: upstream.port})
        if not hasattr(m.restorer, "jail"):  # (a manager that jails VMMs asks its restorer for the policy)
            m.restorer.jail = None  # type: ignore[attr-defined]
        app = create_app(cfg, manager=m)
        # The upstream's uvicorn configured its loggers (its own handlers, no propagation); the server
        # runs with log_config=None as runner.serve does: its records go to the root logger's handlers.
        for name in ("uvicorn", "uvicorn.access", "uvicorn.error"):
            logging.getLogger(name).handlers.clear()
            logging.getLogger(name).propagate = True
            logging.getLogger(name).disabled = False
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="debug",
                                               access_log=True, lifespan="on", ws="auto", proxy_headers=False,
                                               server_header=False))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.time() + 10
        while not server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.01)
        try:
            return _calls(f"http://127.0.0.1:{port}")
        finally:
            server.should_exit = True
            thread.join(15)


def _calls(url: str) -> dict[str, str]:
    key = {"X-API-Key": API_KEY}
    with httpx.Client(base_url=url, timeout=20) as c:
        assert c.get("/sandboxes", headers={"X-API-Key": API_KEY + "x"}).status_code == 401
        assert c.get(f"/sandboxes?api_key={API_KEY}").status_code == 401
        r = c.post("/sandboxes", json={"templateID": "tpl", "network": {"allowPublicTraffic": False}}, headers=key)
        assert r.status_code == 201, r.text
        sb = r.json()
        sid, envd, traffic = sb["sandboxID"], sb["envdAccessToken"], sb["trafficAccessToken"]
        assert envd and traffic
        agent = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983"}
        # commands and files through the proxy, with the token and with wrong ones
        assert c.post("/headers", headers={**agent, "X-Access-Token": envd}).status_code == 200
        c.post("/echo", content=b"x", headers={**agent, "X-Access-Token": envd + "wrong"})
        c.get(f"/headers?access_token={envd}&token={STRANGER_SECRET}", headers=agent)
        signature = signing.sign("/tmp/f", signing.operation_of("GET") or "", "", envd.encode())
        # As E2B's SDKs make them: the query encoded (a base64 signature's '+' is a space unencoded)
        r = c.get("/files", params={"path": "/tmp/f", "signature": signature})
        assert r.status_code != 401, r.text  # routed by its signature
        wrong_signature = signing.sign("/tmp/f", signing.operation_of("GET") or "", "", b"not-the-token")
        assert c.get("/files", params={"path": "/tmp/f", "signature": wrong_signature}).status_code == 401
        # the private port: header, URL token (redirect and cookie), wrong token
        web = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "8000"}
        assert c.get("/headers", headers={**web, "e2b-traffic-access-token": traffic}).status_code == 200
        assert c.get("/headers", headers={**web, "e2b-traffic-access-token": traffic + "x"}).status_code == 403
        r = c.get(f"/sandboxes/{sid}/ports/8000/headers?trenvx_token={traffic}")
        assert r.status_code == 303, r.text
        cookie = r.headers["set-cookie"].split(";", 1)[0]
        assert c.get(f"/sandboxes/{sid}/ports/8000/headers", headers={"Cookie": cookie}).status_code == 200
        c.get(f"/sandboxes/{sid}/ports/8000/headers?trenvx_token={traffic}x")
        # API calls that echo or fail
        c.get(f"/sandboxes/{sid}", headers=key)
        c.post(f"/sandboxes/{sid}/timeout", json={"timeout": "nope"}, headers=key)
        assert c.delete(f"/sandboxes/{sid}", headers=key).status_code == 204
        c.get("/headers", headers={**agent, "X-Access-Token": envd})  # a sandbox that is gone
    return {"api key": API_KEY, "envd access token": envd, "traffic access token": traffic,
            "signature": signature.removeprefix("v1_"), "wrong signature": wrong_signature.removeprefix("v1_"),
            "signature as sent": quote(signature.removeprefix("v1_"), safe=""),
            "wrong signature as sent": quote(wrong_signature.removeprefix("v1_"), safe=""),
            "cookie": cookie.split("=", 1)[1], "query secret": STRANGER_SECRET}


@pytest.mark.parametrize("path", [
    "/files?path=/a&signature=v1_abc&signature_expiration=1",
    "/x?access_token=abc&other=1",
    "/x?trenvx_token=abc",
    "/x?token=abc&api_key=abc&X-API-Key=abc&key=abc",
])
def test_redaction_of_query_secrets(path: str) -> None:
    from trenvx.server.log_redaction import redact_query

    out = redact_query(path)
    assert "abc" not in out and "[redacted]" in out, out
    assert redact_query("/x?path=/a&n=1") == "/x?path=/a&n=1"
