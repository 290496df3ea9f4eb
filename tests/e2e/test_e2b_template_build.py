"""E2B's ``Template`` SDK (``e2b`` from PyPI, unmodified) builds templates on a trenvx server.

The build runs in the server as ``template-manager``'s does, with the steps inside the build VM;
the template is published under its alias, and ``Sandbox.create(alias)`` runs it. The build is
small (no package downloads); a rebuild with the same inputs is the published build again.
"""

from __future__ import annotations

import io
import secrets
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.server_helpers import e2b_pointed_at

pytestmark = pytest.mark.e2e

e2b = pytest.importorskip("e2b")

API_KEY = "right-key"  # the keyed_backend_url fixture's
BUILT = "e2e-sdk-built"
BROKEN = "e2e-sdk-broken"


@pytest.fixture
def e2b_env(keyed_backend_url: str) -> Iterator[str]:
    with e2b_pointed_at(keyed_backend_url, API_KEY) as url:
        yield url


def _template(ctx: Path):
    from e2b import Template

    return (
        Template(file_context_path=str(ctx))
        .from_image("debian:bookworm")
        .copy("hello.txt", "/home/user/hello.txt")
        .run_cmd("echo built-by-run > /home/user/run.txt && id -un > /home/user/run-as.txt "
                 "&& cat /proc/sys/kernel/random/boot_id > /home/user/boot_id")
        .set_envs({"GREETING": "hi", "SHOUT": "${GREETING}!"})
        .run_cmd('echo "$SHOUT" > /tmp/env-seen && mkdir -p /opt/app && cp /tmp/env-seen /opt/app/env.txt', user="root")
    )


def test_build_alias_and_run(e2b_env: str, tmp_path: Path) -> None:
    from e2b import Sandbox, Template

    (tmp_path / "hello.txt").write_text("hello from the host\n")
    logs = []
    # skip_cache: the steps really run every time (a build left in data_root by an earlier run
    # would otherwise be reused); the second build below checks the reuse.
    info = Template.build(_template(tmp_path), alias=BUILT, cpu_count=1, memory_mb=256, skip_cache=True,
                          on_build_logs=logs.append)
    assert info.template_id == BUILT
    messages = "\n".join(str(getattr(e, "message", "")) for e in logs)
    assert "[2/4] RUN echo built-by-run" in messages

    assert Template.alias_exists(BUILT)
    with httpx.Client(base_url=e2b_env, headers={"X-API-Key": API_KEY}) as c:
        r = c.get(f"/templates/aliases/{BUILT}")
        assert r.status_code == 200 and r.json() == {"templateID": BUILT, "public": False}
        assert c.get("/templates/aliases/no-such-alias-here").status_code == 404
        assert BUILT in {t["templateID"] for t in c.get("/templates").json()}

    sbx = Sandbox.create(BUILT, timeout=180)
    try:
        assert sbx.files.read("/home/user/hello.txt") == "hello from the host\n"
        assert sbx.files.read("/home/user/run.txt") == "built-by-run\n"
        assert sbx.files.read("/home/user/run-as.txt") == "user\n"  # E2B's default build user
        assert sbx.files.read("/opt/app/env.txt") == "hi!\n"  # ENV expanded, RUN as root
        owner = sbx.commands.run("stat -c %U /home/user/hello.txt").stdout.strip()
        assert owner == "user"  # COPY gives the files to the build's user
        # The steps ran in the build VM, not on the host: another kernel booted them.
        assert sbx.files.read("/home/user/boot_id") != Path("/proc/sys/kernel/random/boot_id").read_text()
    finally:
        sbx.kill()

    # The same inputs again: the published build is the result (nothing is built).
    again = Template.build(_template(tmp_path), alias=BUILT, cpu_count=1, memory_mb=256)
    with httpx.Client(base_url=e2b_env, headers={"X-API-Key": API_KEY}) as c:
        status = c.get(f"/templates/{BUILT}/builds/{again.build_id}/status").json()
    assert status["status"] == "ready" and status["trenvx"]["reused"] is True


def test_failing_run_step_raises_with_its_log(e2b_env: str) -> None:
    from e2b import Template
    from e2b.exceptions import BuildException

    template = Template().from_image("debian:bookworm").run_cmd("echo output-before-the-failure; exit 3")
    with pytest.raises(BuildException) as ei:
        Template.build(template, alias=BROKEN)
    message = str(ei.value)
    assert "output-before-the-failure" in message and "exit code 3" in message and "step 1" in message


def test_registry_image_is_refused(e2b_env: str) -> None:
    from e2b import Template
    from e2b.exceptions import BuildException

    with pytest.raises(BuildException, match="debian:bookworm"):
        Template.build(Template().from_image("python:3.12").run_cmd("true"), alias="e2e-sdk-python")


def _tar(*members: tarfile.TarInfo, data: bytes = b"x") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for m in members:
            tar.addfile(m, io.BytesIO(data) if m.isreg() else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type = kind
    m.linkname = link
    m.size = 1 if kind == tarfile.REGTYPE else 0
    return m


def test_uploads_are_gated_and_checked(keyed_backend_url: str, e2e_config) -> None:
    key = {"X-API-Key": API_KEY}
    h = secrets.token_hex(32)
    stored = e2e_config.data_root / "cache" / "template-files" / f"{h}.tar"
    with httpx.Client(base_url=keyed_backend_url, timeout=30) as c:
        assert c.post("/v3/templates", json={"name": "e2e-upload-check"}).status_code == 401
        assert c.get("/templates/aliases/e2e-upload-check").status_code == 401
        assert c.get(f"/templates/e2e-upload-check/files/{h}").status_code == 401
        assert c.post("/v3/templates", json={"name": "e2e-test"}, headers=key).status_code == 409  # the server's own
        r = c.post("/v3/templates", json={"name": "e2e-upload-check"}, headers=key)
        assert r.status_code == 202, r.text
        link = c.get(f"/templates/e2e-upload-check/files/{h}", headers=key)
        assert link.status_code == 201 and link.json()["present"] is False
        url = link.json()["url"]
        forged = url.replace("signature=", "signature=0")
        assert c.put(forged, content=_tar(_member("ok.txt"))).status_code == 403
        for bad, why in [
            (_member("../escape.txt"), "'..' in its path"),
            (_member("/etc/passwd"), "absolute path"),
            (_member("dev/sda", tarfile.BLKTYPE), "device file"),
            (_member("pipe", tarfile.FIFOTYPE), "FIFO"),
            (_member("out", tarfile.SYMTYPE, "../../etc"), "outside the archive"),
        ]:
            r = c.put(url, content=_tar(bad))
            assert r.status_code == 400 and why in r.json()["message"], r.text
        assert c.get(f"/templates/e2e-upload-check/files/{h}", headers=key).json()["present"] is False
        assert c.put(url, content=_tar(_member("ok.txt"))).status_code == 200
        assert c.get(f"/templates/e2e-upload-check/files/{h}", headers=key).json()["present"] is True
    stored.unlink()


def test_background_build_status_and_exists(e2b_env: str, tmp_path: Path) -> None:
    """build_in_background returns at once; get_build_status follows the build (with its logs)
    to ready; exists finds the template by name and not a name nobody built."""
    import time

    from e2b import Template

    (tmp_path / "hello.txt").write_text("hello from the host\n")
    info = Template.build_in_background(_template(tmp_path), alias=BUILT, cpu_count=1, memory_mb=256)
    assert info.template_id == BUILT and info.build_id
    deadline = time.monotonic() + 900
    while True:
        status = Template.get_build_status(info, logs_offset=0)
        if status.status.value in ("ready", "error"):
            break
        assert time.monotonic() < deadline, f"build still {status.status.value} after 900 s"
        time.sleep(1)
    assert status.status.value == "ready", status
    assert status.template_id == BUILT and status.build_id == info.build_id
    assert Template.exists(BUILT) is True
    assert Template.exists(f"e2e-never-built-{secrets.token_hex(4)}") is False
