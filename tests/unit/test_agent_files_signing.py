"""Signed ``/files`` URLs: the agent takes E2B's ``download_url`` / ``upload_url`` signatures in place
of ``X-Access-Token``, refuses wrong, expired, other-operation/path/user ones with a message saying
so; the server finds the sandbox a signed URL that names none belongs to.

E2B's unmodified SDK builds the URLs (``sandbox_url`` pointing at an agent on the host) and is the
reference for the signing scheme.
"""
# ruff: noqa: F811 - pytest fixtures imported from the harness

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from tests.unit.test_agent_harness import AgentProcess, fresh_agent  # noqa: F401 - fixtures
from tests.unit.test_agent_fs_identity import area  # noqa: F401 - fixture
from trenvx.guest.agent import ENVD_COMPAT_VERSION, signing
from trenvx.guest.client import AgentClient
from trenvx.server.signed_files import SignedUrlRefused, signed_files_target

e2b = pytest.importorskip("e2b")
from e2b.sandbox.signature import get_signature  # noqa: E402
from packaging.version import Version  # noqa: E402 - e2b depends on packaging

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the agent tests run as root (like the guest)")

TOKEN = "signing-test-token"


@pytest.fixture
async def sbx(fresh_agent: AgentProcess) -> Any:
    """E2B's sandbox object over an agent whose access token is ``TOKEN`` and default user root."""
    async with AgentClient(fresh_agent.url) as c:
        await c.init(sandbox_id="sbx-sig", env_vars={}, access_token=TOKEN, hostname="sbx-sig",
                     default_user="root")
    config = e2b.ConnectionConfig(sandbox_url=fresh_agent.url, api_key="e2b_unused", http_version="1.1",
                                  extra_sandbox_headers={"X-Access-Token": TOKEN})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return e2b.AsyncSandbox(sandbox_id="sbx-sig", sandbox_domain=None, envd_version=Version(ENVD_COMPAT_VERSION),
                                envd_access_token=TOKEN, traffic_access_token=None, connection_config=config)


def _with(url: str, **changes: str | None) -> str:
    """``url`` with query parameters replaced (None: removed)."""
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    for key, value in changes.items():
        if value is None:
            query.pop(key, None)
        else:
            query[key] = value
    return parts._replace(query=urlencode(query)).geturl()


# ----------------------------------------------------------------------------- the scheme


@pytest.mark.parametrize("path,op,user,expires_in", [
    ("/home/user/a.txt", "read", None, None),
    ("rel/ünïcode file.txt", "write", "root", None),
    ("/tmp/x", "read", "user", 60),
    ("", "write", None, 3600),
])
def test_signatures_are_e2b_sdk_signatures(path: str, op: str, user: str | None, expires_in: int | None) -> None:
    theirs = get_signature(path, op, user, TOKEN, expires_in)
    ours = signing.sign(path, op, user or "", TOKEN.encode(), theirs["expiration"])
    assert ours == theirs["signature"]
    assert signing.matches(ours, path, op, user or "", TOKEN.encode(), theirs["expiration"])
    assert not signing.matches(ours, path + "x", op, user or "", TOKEN.encode(), theirs["expiration"])


def test_verify_messages() -> None:
    key = TOKEN.encode()
    good = signing.sign("/f", "read", "", key, 2_000_000_000)
    signing.verify(good, "2000000000", path="/f", operation="read", username="", token=key, now=1_999_999_999)
    cases = [
        ((None, None, "/f", "read", ""), "X-Access-Token"),
        (("sha1_abc", None, "/f", "read", ""), "unknown scheme"),
        ((good, "2000000000", "/g", "read", ""), "path '/g'"),
        ((good, "2000000000", "/f", "read", "root"), "user 'root'"),
        ((good, "2000000001", "/f", "read", ""), "expiring at 2000000001"),
        ((good, "2000000000", "/f", "write", ""), "made for a download"),
        ((good, "2000000000", "/f", "read", ""), "expired"),
    ]
    for (sig, exp, path, op, user), words in cases:
        with pytest.raises(signing.SignatureError) as info:
            signing.verify(sig, exp, path=path, operation=op, username=user, token=key, now=2_000_000_001)
        assert info.value.status == 401 and words in info.value.message, (words, info.value.message)
    with pytest.raises(signing.SignatureError) as info:
        signing.verify(good, "soon", path="/f", operation="read", username="", token=key)
    assert info.value.status == 400 and "signature_expiration" in info.value.message


# ----------------------------------------------------------------------------- the agent


async def test_download_url_and_upload_url_work_without_the_token(sbx: Any, area: Path, tmp_path: Path) -> None:
    target = tmp_path / "signed.txt"
    target.write_text("signed download")
    r = httpx.get(sbx.download_url(str(target)))
    assert r.status_code == 200 and r.text == "signed download"
    r = httpx.get(sbx.download_url(str(target), use_signature_expiration=60))
    assert r.status_code == 200 and r.text == "signed download"

    up = area / "nobody" / "up" / "loaded.bin"  # where nobody may write
    r = httpx.post(sbx.upload_url(str(up), user="nobody"), files={"file": ("loaded.bin", b"\x00up\xff")})
    assert r.status_code == 200, r.text
    assert up.read_bytes() == b"\x00up\xff" and up.stat().st_uid == 65534  # written as the signed user
    r = httpx.post(sbx.upload_url(str(up), use_signature_expiration=60), content=b"raw",
                   headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200 and up.read_bytes() == b"raw"


async def test_bad_signatures_are_refused_with_reasons(sbx: Any, tmp_path: Path) -> None:
    target = tmp_path / "secret.txt"
    target.write_text("secret")
    url = sbx.download_url(str(target))
    sig = parse_qs(urlsplit(url).query)["signature"][0]

    def refused(u: str, method: str = "GET") -> str:
        r = httpx.request(method, u, content=b"x" if method == "POST" else None,
                          headers={"Content-Type": "application/octet-stream"} if method == "POST" else None)
        assert r.status_code == 401, (u, r.status_code, r.text)
        return r.json()["message"]

    assert "invalid signature" in refused(_with(url, signature=sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")))
    assert "path" in refused(_with(url, path=str(tmp_path / "other.txt")))
    assert "user 'nobody'" in refused(_with(url, username="nobody"))
    assert "X-Access-Token" in refused(_with(url, signature=None))
    assert "made for a download" in refused(_with(url), "POST")
    assert target.read_text() == "secret"
    write_url = sbx.upload_url(str(target))
    assert "made for an upload" in refused(write_url)
    expired = get_signature(str(target), "read", None, TOKEN, -10)
    assert "expired" in refused(_with(url, signature=expired["signature"],
                                      signature_expiration=str(expired["expiration"])))
    # The expiration is signed: pushing it later breaks the signature.
    assert "invalid signature" in refused(_with(url, signature=expired["signature"],
                                                signature_expiration=str(expired["expiration"] + 3600)))
    r = httpx.get(_with(url, signature_expiration="tomorrow"))
    assert r.status_code == 400 and "signature_expiration" in r.json()["message"]
    # A request that sends the header is judged by it alone, like envd.
    r = httpx.get(url, headers={"X-Access-Token": "wrong"})
    assert r.status_code == 401 and "X-Access-Token" in r.json()["message"]
    assert httpx.get(url, headers={"X-Access-Token": TOKEN}).status_code == 200


async def test_signatures_open_only_files(sbx: Any, fresh_agent: AgentProcess, tmp_path: Path) -> None:
    """A signature is no access token: other endpoints still want X-Access-Token."""
    url = sbx.download_url(str(tmp_path))
    query = urlsplit(url).query
    r = httpx.post(f"{fresh_agent.url}/filesystem.Filesystem/ListDir?{query}", json={"path": str(tmp_path)})
    assert r.status_code == 401
    r = httpx.get(f"{fresh_agent.url}/envs?{query}")
    assert r.status_code == 401


# ----------------------------------------------------------------------------- the server's routing


def _query(**params: str) -> bytes:
    return urlencode(params).encode()


def test_server_routes_a_signed_url_to_the_sandbox_whose_token_signed_it() -> None:
    sandboxes = [("sbx-a", "token-a"), ("sbx-b", "token-b"), ("sbx-paused", "")]
    asked: list[int] = []

    def listing() -> list[tuple[str, str]]:
        asked.append(1)
        return sandboxes

    sig = get_signature("/f.txt", "write", "root", "token-b", 60)
    q = _query(path="/f.txt", username="root", signature=sig["signature"], signature_expiration=str(sig["expiration"]))
    assert signed_files_target("POST", "/files", q, listing) == "sbx-b"
    read = get_signature("/f.txt", "read", None, "token-a")
    assert signed_files_target("GET", "/files", _query(path="/f.txt", signature=read["signature"]), listing) == "sbx-a"
    asked.clear()
    # Not a signed /files request: the API's, and the sandboxes are not even listed.
    assert signed_files_target("GET", "/files", _query(path="/f.txt"), listing) is None
    assert signed_files_target("GET", "/sandboxes", q, listing) is None
    assert signed_files_target("DELETE", "/files", q, listing) is None
    assert asked == []
    with pytest.raises(SignedUrlRefused) as info:  # signed for a write, used for a read
        signed_files_target("GET", "/files", q, listing)
    assert info.value.status == 401 and "no running sandbox signed a read of path '/f.txt' as user 'root'" in \
        info.value.message
    with pytest.raises(SignedUrlRefused) as info:  # a token nobody has
        forged = get_signature("/f.txt", "read", None, "guessed")
        signed_files_target("GET", "/files", _query(path="/f.txt", signature=forged["signature"]), listing)
    assert info.value.status == 401
    with pytest.raises(SignedUrlRefused) as info:
        signed_files_target("GET", "/files", _query(path="/f", signature="v1_x", signature_expiration="x"), listing)
    assert info.value.status == 400
