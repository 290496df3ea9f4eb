"""E2B's own SDK (``e2b`` from PyPI, unmodified) on real sandboxes: what the agent's envd version
promises (file metadata, entry info on watch events, watching with ``allow_network_mounts``) and
signed file URLs (``download_url`` / ``upload_url``) reaching the sandbox through the server.

Pointed at the session backend the documented way (``E2B_API_URL`` and ``E2B_SANDBOX_URL`` both the
server, any ``E2B_API_KEY`` on a keyless local server). Paths are relative (the default user's home)
or ask for ``user="root"``; nothing assumes which user is the default.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

pytestmark = pytest.mark.e2e

e2b = pytest.importorskip("e2b")

T = 120  # generous: TCG is slow


def _with(url: str, **changes: str | None) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    for key, value in changes.items():
        if value is None:
            query.pop(key, None)
        else:
            query[key] = value
    return parts._replace(query=urlencode(query)).geturl()


async def _wait_for(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


# ----------------------------------------------------------------------------- envd version


async def test_metadata_on_write_stat_list_and_rename(e2b_env: str, test_template: str) -> None:
    from trenvx.guest.agent import ENVD_COMPAT_VERSION

    sbx = await e2b.AsyncSandbox.create(test_template, timeout=300)
    try:
        assert str(sbx._envd_version) == ENVD_COMPAT_VERSION  # what the server told the SDK
        info = await sbx.files.write("meta/a.txt", "hello", metadata={"Owner": "team-a", "stage": "raw"},
                                     request_timeout=T)
        assert info.metadata == {"owner": "team-a", "stage": "raw"}
        entry = await sbx.files.get_info("meta/a.txt", request_timeout=T)
        assert entry.metadata == {"owner": "team-a", "stage": "raw"} and entry.size == 5
        [listed] = await sbx.files.list("meta", request_timeout=T)
        assert listed.name == "a.txt" and listed.metadata == entry.metadata
        # Set inside the sandbox (as setfattr would): the SDK reads it back too.
        r = await sbx.commands.run(
            "python3 -c \"import os; os.setxattr('meta/a.txt', 'user.e2b.inside', b'yes')\"", timeout=T)
        assert r.exit_code == 0
        moved = await sbx.files.rename("meta/a.txt", "meta/b.txt", request_timeout=T)
        assert moved.metadata == {"owner": "team-a", "stage": "raw", "inside": "yes"}
        # An overwrite replaces the whole set; one without metadata clears it.
        again = await sbx.files.write("meta/b.txt", "v2", metadata={"stage": "done"}, request_timeout=T)
        assert again.metadata == {"stage": "done"}
        cleared = await sbx.files.write("meta/b.txt", "v3", use_octet_stream=True, request_timeout=T)
        assert cleared.metadata is None and (await sbx.files.get_info("meta/b.txt")).metadata is None
        with pytest.raises(e2b.InvalidArgumentException):  # refused by the SDK before sending, as against E2B
            await sbx.files.write("meta/c.txt", "x", metadata={"bad key": "v"})
    finally:
        await sbx.kill()


async def test_watch_events_carry_entry_info(e2b_env: str, test_template: str) -> None:
    sbx = await e2b.AsyncSandbox.create(test_template, timeout=300)
    try:
        await sbx.files.make_dir("watched", request_timeout=T)
        events: list[Any] = []
        handle = await sbx.files.watch_dir("watched", on_event=events.append, include_entry=True,
                                           allow_network_mounts=True, request_timeout=T, timeout=0)
        try:
            await sbx.files.write("watched/w.txt", "data", metadata={"tag": "w"}, request_timeout=T)
            await sbx.commands.run("rm watched/w.txt", timeout=T)
            await _wait_for(lambda: any(e.name == "w.txt" and e.type.value == "remove" for e in events))
        finally:
            await handle.stop()
        mine = [e for e in events if e.name == "w.txt"]
        assert {"create", "remove"} <= {e.type.value for e in mine}
        described = [e.entry for e in mine if e.entry is not None]
        assert described and described[0].name == "w.txt" and described[0].path.endswith("/watched/w.txt")
        assert described[0].owner and described[0].type.value == "file"
        assert [e.entry for e in mine if e.type.value == "remove"] == [None]
        # The sync SDK's polling watcher (CreateWatcher) carries entries too.
        sync_sbx = e2b.Sandbox.connect(sbx.sandbox_id)
        watcher = sync_sbx.files.watch_dir("watched", include_entry=True, request_timeout=T)
        try:
            sync_sbx.files.write("watched/s.txt", "s", request_timeout=T)
            got: list[Any] = []
            deadline = time.monotonic() + 60
            while not any(e.entry is not None for e in got) and time.monotonic() < deadline:
                got += [e for e in watcher.get_new_events() if e.name == "s.txt"]
                time.sleep(0.2)
        finally:
            watcher.stop()
        assert any(e.entry is not None and e.entry.size == 1 for e in got)
    finally:
        await sbx.kill()


# ----------------------------------------------------------------------------- signed URLs


async def test_signed_urls_reach_the_sandbox_through_the_server(e2b_env: str, test_template: str) -> None:
    sbx = await e2b.AsyncSandbox.create(test_template, timeout=300, secure=True)
    other = await e2b.AsyncSandbox.create(test_template, timeout=300, secure=True)
    try:
        await sbx.files.write("share/report.txt", "mine", request_timeout=T)
        await other.files.write("share/report.txt", "the other's", request_timeout=T)
        async with httpx.AsyncClient(timeout=T) as http:
            url = sbx.download_url("share/report.txt")
            assert url.startswith(e2b_env + "/files?")  # no sandbox id in it: the signature routes it
            r = await http.get(url)
            assert (r.status_code, r.text) == (200, "mine")
            r = await http.get(other.download_url("share/report.txt", use_signature_expiration=120))
            assert (r.status_code, r.text) == (200, "the other's")
            r = await http.get(sbx.download_url("/etc/hostname", user="root"))
            assert r.status_code == 200 and r.text.strip()

            r = await http.post(sbx.upload_url("share/up.bin"), files={"file": ("up.bin", b"\x00uploaded\xff")})
            assert r.status_code == 200, r.text
            assert await sbx.files.read("share/up.bin", format="bytes") == bytearray(b"\x00uploaded\xff")
            r = await http.post(sbx.upload_url("share/raw.txt", use_signature_expiration=120), content=b"raw body",
                                headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 200 and await sbx.files.read("share/raw.txt") == "raw body"
            assert not await other.files.exists("share/up.bin")

            sig = parse_qs(urlsplit(url).query)["signature"][0]
            tampered = _with(url, signature=sig[:-3] + ("AAA" if not sig.endswith("AAA") else "BBB"))
            r = await http.get(tampered)
            assert r.status_code == 401 and "invalid signature" in r.json()["message"]
            r = await http.get(_with(url, path="/etc/shadow"))  # the signature covers the path
            assert r.status_code == 401
            r = await http.get(sbx.upload_url("share/report.txt"))  # an upload signature does not download
            assert r.status_code == 401
            r = await http.post(url, content=b"overwrite", headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 401  # nor the other way round
            assert await sbx.files.read("share/report.txt") == "mine"
            expired = sbx.download_url("share/report.txt", use_signature_expiration=-5)
            r = await http.get(expired)  # reaches the sandbox (it signed it), whose agent refuses it
            assert r.status_code == 401 and "expired" in r.json()["message"]

            r = await http.get(_with(url, signature=None))  # no signature, no sandbox named: the API's 404
            assert r.status_code == 404
            routed = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"}
            r = await http.get(_with(url, signature=None), headers=routed)  # routed, but neither token nor signature
            assert r.status_code == 401 and "X-Access-Token" in r.json()["message"]
            r = await http.get(_with(url, signature=None), headers={**routed, "X-Access-Token": "guess"})
            assert r.status_code == 401
    finally:
        await sbx.kill()
        await other.kill()
    async with httpx.AsyncClient(timeout=T) as http:  # a killed sandbox's URLs lead nowhere
        r = await http.get(url)
        assert r.status_code == 401 and "ended" in r.json()["message"]
