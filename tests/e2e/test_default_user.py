"""The default user, as E2B has it: commands and file calls run as ``user`` (uid 1000, home
/home/user, files owned by it) unless a request names another; ``user="root"`` gives root; login
shells read ``~/.profile``; ``sudo`` works without a password where the template has sudo.

Driven through E2B's own ``e2b`` package (unmodified) and ``sandbox_sdk.e2b`` against the session's
``trenvx serve``, on the e2e template (which has no sudo: it downloads no packages). sudo is tested
on a build of the shipped ``default-sandbox`` template (configs/example_config.toml): the session
fixture ``shipped_template`` of tests/e2e/conftest.py, cached in the data_root by its inputs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

pytestmark = pytest.mark.e2e

e2b = pytest.importorskip("e2b")


@pytest_asyncio.fixture
async def e2b_sandbox(e2b_env: str, test_template: str) -> AsyncIterator["e2b.AsyncSandbox"]:
    sbx = await e2b.AsyncSandbox.create(test_template, timeout=300)
    try:
        yield sbx
    finally:
        await sbx.kill()


async def test_e2b_commands_and_files_run_as_user(e2b_sandbox: "e2b.AsyncSandbox") -> None:
    sbx = e2b_sandbox
    r = await sbx.commands.run("whoami; id -u; id -gn; echo $HOME; pwd")
    assert r.stdout == "user\n1000\nuser\n/home/user\n/home/user\n"
    assert "sudo" in (await sbx.commands.run("id -Gn")).stdout.split()  # the image's sudo group

    written = await sbx.files.write("notes.txt", "hello")  # a relative path: the user's home
    assert written.path == "/home/user/notes.txt"
    assert (await sbx.files.get_info("notes.txt")).owner == "user"
    owners = await sbx.commands.run("stat -c '%U:%G %n' /home/user/notes.txt /home/user")
    assert owners.stdout == "user:user /home/user/notes.txt\nuser:user /home/user\n"
    assert await sbx.files.read("/home/user/notes.txt") == "hello"

    # root stays available by name, for commands and files alike.
    assert (await sbx.commands.run("whoami; echo $HOME", user="root")).stdout == "root\n/root\n"
    await sbx.files.write("/root/by-root.txt", "secret", user="root")
    assert (await sbx.files.get_info("/root/by-root.txt", user="root")).owner == "root"
    # ... and the default user's commands are not root's: root's home is out of their reach.
    r = await sbx.commands.run("cat /root/by-root.txt 2>/dev/null || echo denied")
    assert r.stdout == "denied\n"
    # The files API as the default user meets the guest's own permissions (issue 18: hostile
    # input): root's files, /etc/shadow and system files are refused, and nothing was written.
    for call in (lambda: sbx.files.read("/root/by-root.txt"), lambda: sbx.files.read("/etc/shadow"),
                 lambda: sbx.files.write("/etc/passwd", "intruder::0:0::/:/bin/sh\n"),
                 lambda: sbx.files.write("/root/planted.txt", "x"), lambda: sbx.files.list("/root")):
        with pytest.raises(Exception) as refused:
            await call()
        assert "ermission" in str(refused.value), refused.value
    check = await sbx.commands.run("grep -c intruder /etc/passwd; test -e /root/planted.txt && echo planted; true",
                                   user="root")
    assert check.stdout == "0\n", check.stdout


async def test_login_shells_read_the_profile(e2b_sandbox: "e2b.AsyncSandbox") -> None:
    sbx = e2b_sandbox
    profile = await sbx.files.read(".profile")  # the image's /etc/skel/.profile
    assert ".local/bin" in profile
    await sbx.files.write(".profile", profile + "\nexport FROM_PROFILE=read\n")
    # Debian's .profile puts ~/.local/bin on PATH when it exists (what `pip install --user` fills).
    await sbx.commands.run(
        "mkdir -p ~/.local/bin && printf '#!/bin/sh\\necho found-on-path\\n' > ~/.local/bin/trenvx-hello"
        " && chmod +x ~/.local/bin/trenvx-hello"
    )
    r = await sbx.commands.run("echo $FROM_PROFILE; trenvx-hello; echo $PATH")
    got, on_path, path = r.stdout.splitlines()
    assert (got, on_path) == ("read", "found-on-path")
    assert path.split(":")[0] == "/home/user/.local/bin"
    # Root's login shell reads root's own profile, not the user's.
    assert (await sbx.commands.run("echo ${FROM_PROFILE:-unset}", user="root")).stdout == "unset\n"


async def test_sandbox_sdk_has_the_same_default(backend_url: str, test_template: str) -> None:
    from sandbox_sdk.e2b import AsyncSandbox

    async with await AsyncSandbox.create(test_template, timeout=300, api_url=backend_url) as sbx:
        assert (await sbx.commands.run("whoami; pwd")).stdout == "user\n/home/user\n"
        info = await sbx.files.write("sdk.txt", "x")
        assert info.path == "/home/user/sdk.txt"
        assert (await sbx.files.get_info("sdk.txt")).owner == "user"
        assert (await sbx.commands.run("whoami", user="root")).stdout == "root\n"


# ----------------------------------------------------------------------------- default-sandbox
# (``shipped_template``: tests/e2e/conftest.py)


async def test_default_sandbox_has_user_with_passwordless_sudo(e2b_env: str, shipped_template: str) -> None:
    sbx = await e2b.AsyncSandbox.create(shipped_template, timeout=300)
    try:
        r = await sbx.commands.run("whoami; pwd; sudo -n true && echo sudo-ok; sudo -n whoami; sudo -n -u user whoami",
                                   timeout=120)
        assert r.stdout == "user\n/home/user\nsudo-ok\nroot\nuser\n", r.stderr
        # sudo gives root's powers: write a system path.
        r = await sbx.commands.run("echo via-sudo | sudo -n tee /etc/trenvx-sudo-test >/dev/null; stat -c %U /etc/trenvx-sudo-test",
                                   timeout=120)
        assert r.stdout == "root\n", r.stderr
        # What an agent reaches for, as in E2B's base image.
        r = await sbx.commands.run("git --version && curl --version && test -s /etc/ssl/certs/ca-certificates.crt "
                                   "&& echo tools-ok", timeout=120)
        assert r.stdout.endswith("tools-ok\n"), r.stderr
    finally:
        await sbx.kill()
