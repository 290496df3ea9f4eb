"""The template build's accounts step: the default user ``user`` every image gets (passwd, group,
sudo group, home from /etc/skel, passwordless sudo where sudo is installed), the template's ``user``
setting (validated, an input of the build, recorded in the manifest), and what the sandbox layer
reads back from a manifest (no VM; the e2e side is tests/e2e/test_default_user.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from trenvx.build_errors import InjectError
from trenvx.config import Config, ConfigError, TemplateConfig, load_config
from trenvx.template.accounts import (
    SUDOERS_FILE,
    ensure_default_user,
    find_account,
    parse_passwd,
    sudoers_text,
)
from trenvx.template.store import TemplateBuild, TemplateManifest

REPO = Path(__file__).resolve().parents[2]


def tree_with(root: Path, *, sudo: bool = False, sudo_group: bool = True, gshadow: bool = True) -> Path:
    """A Debian-like root filesystem: root, a sudo group, /etc/skel with .profile, bash."""
    for d in ("etc/skel", "bin", "usr/bin", "home"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\n")
    groups = "root:x:0:\ntty:x:5:\n" + ("sudo:x:27:\n" if sudo_group else "") + "users:x:100:\n"
    (root / "etc/group").write_text(groups)
    if gshadow:
        (root / "etc/gshadow").write_text("root:*::\n" + ("sudo:*::\n" if sudo_group else ""))
        (root / "etc/gshadow").chmod(0o640)
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc/skel/.profile").write_text('if [ -d "$HOME/.local/bin" ] ; then PATH="$HOME/.local/bin:$PATH"; fi\n')
    (root / "etc/skel/.bashrc").write_text("# skel\n")
    (root / "etc/skel/.config").mkdir()
    (root / "etc/skel/.config/x").write_text("1")
    (root / "bin/bash").write_text("")
    if sudo:
        (root / "usr/bin/sudo").write_text("")
    return root


def group_members(tree: Path, rel: str, name: str) -> list[str]:
    for line in (tree / rel).read_text().splitlines():
        f = line.split(":")
        if f[0] == name:
            return [m for m in f[3].split(",") if m]
    raise AssertionError(f"no group {name} in {rel}")


def test_the_default_user_is_made_like_e2bs(tmp_path: Path) -> None:
    tree = tree_with(tmp_path / "t", sudo=True)
    account = ensure_default_user(tree)
    assert (account.name, account.uid, account.gid, account.home, account.shell) == ("user", 1000, 1000, "/home/user", "/bin/bash")
    assert "user:x:1000:1000::/home/user:/bin/bash" in (tree / "etc/passwd").read_text().splitlines()
    assert "user:x:1000:" in (tree / "etc/group").read_text().splitlines()
    assert group_members(tree, "etc/group", "sudo") == ["user"]
    assert group_members(tree, "etc/gshadow", "sudo") == ["user"]
    assert (tree / "etc/gshadow").stat().st_mode & 0o777 == 0o640
    home = tree / "home/user"
    assert home.stat().st_uid == 1000 and home.stat().st_gid == 1000
    # Login shells read ~/.profile: it is the image's skel one, owned by the user (so it may edit it).
    assert (home / ".profile").read_text() == (tree / "etc/skel/.profile").read_text()
    for p in (home / ".profile", home / ".bashrc", home / ".config", home / ".config/x"):
        assert p.lstat().st_uid == 1000, p
    sudoers = tree / SUDOERS_FILE
    assert sudoers.read_text() == sudoers_text("user")
    assert "user ALL=(ALL:ALL) NOPASSWD: ALL" in sudoers.read_text().splitlines()
    assert sudoers.stat().st_mode & 0o777 == 0o440 and sudoers.stat().st_uid == os.geteuid()
    assert "." not in sudoers.name  # sudo skips sudoers.d files whose names hold a dot


@pytest.mark.skipif(shutil.which("visudo") is None, reason="visudo (package sudo) is not installed on this host")
def test_the_sudoers_file_parses(tmp_path: Path) -> None:
    f = tmp_path / "trenvx-user"
    f.write_text(sudoers_text("user"))
    subprocess.run(["visudo", "-c", "-f", str(f)], check=True, capture_output=True)


def test_no_sudoers_file_without_sudo_and_no_sudo_group_without_one(tmp_path: Path) -> None:
    tree = tree_with(tmp_path / "t", sudo=False, sudo_group=False, gshadow=False)
    ensure_default_user(tree)
    assert not (tree / "etc/sudoers.d").exists()
    assert not (tree / "etc/gshadow").exists()
    assert "sudo:" not in (tree / "etc/group").read_text()


def test_idempotent(tmp_path: Path) -> None:
    tree = tree_with(tmp_path / "t", sudo=True)
    ensure_default_user(tree)
    (tree / "home/user/.profile").write_text("export MINE=1\n")
    before = {p: (tree / p).read_text() for p in ("etc/passwd", "etc/group", "etc/gshadow", "etc/shadow")}
    ensure_default_user(tree)
    assert {p: (tree / p).read_text() for p in before} == before
    assert (tree / "home/user/.profile").read_text() == "export MINE=1\n"  # an existing home is kept


def test_an_images_own_user_account_is_kept_and_given_sudo(tmp_path: Path) -> None:
    tree = tree_with(tmp_path / "t", sudo=True)
    with open(tree / "etc/passwd", "a") as f:
        f.write("user:x:1200:1200::/home/user:/bin/sh\n")
    with open(tree / "etc/group", "a") as f:
        f.write("user:x:1200:\n")
    # A Dockerfile's `WORKDIR /home/user` made the home, as root, empty.
    (tree / "home/user").mkdir()
    (tree / "home/user/.profile").write_text("# the image's own\n")
    account = ensure_default_user(tree)
    assert (account.uid, account.gid, account.shell) == (1200, 1200, "/bin/sh")
    assert (tree / "etc/passwd").read_text().count("\nuser:") == 1
    assert (tree / "home/user").stat().st_uid == 1200
    assert (tree / "home/user/.profile").read_text() == "# the image's own\n"  # kept
    assert (tree / "home/user/.bashrc").lstat().st_uid == 1200  # what it lacked comes from skel
    assert group_members(tree, "etc/group", "sudo") == ["user"]
    assert (tree / SUDOERS_FILE).is_file()


def test_taken_uid_is_avoided(tmp_path: Path) -> None:
    tree = tree_with(tmp_path / "t")
    with open(tree / "etc/passwd", "a") as f:
        f.write("other:x:1000:1000::/home/other:/bin/sh\n")
    with open(tree / "etc/group", "a") as f:
        f.write("other:x:1000:\n")
    account = ensure_default_user(tree)
    assert (account.uid, account.gid) == (1001, 1001)


def test_a_home_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    tree = tree_with(tmp_path / "t")
    (tree / "home/user").write_text("not a directory")
    with pytest.raises(InjectError, match="/home/user in the image is not a directory"):
        ensure_default_user(tree)


def test_the_home_never_leaves_the_tree(tmp_path: Path) -> None:
    outside = tmp_path / "host_home"
    outside.mkdir()
    tree = tree_with(tmp_path / "t")
    (tree / "home").rmdir()
    (tree / "home").symlink_to(str(outside))  # absolute: the host's path if followed naively
    ensure_default_user(tree)
    assert list(outside.iterdir()) == []
    assert (tree / str(outside).lstrip("/") / "user/.profile").is_file()  # inside the tree


def test_find_account(tmp_path: Path) -> None:
    tree = tree_with(tmp_path / "t")
    ensure_default_user(tree)
    assert find_account(tree, "root").home == "/root"
    assert find_account(tree, "user").home == "/home/user"
    with pytest.raises(InjectError) as ei:
        find_account(tree, "alice")
    msg = str(ei.value)
    assert "'alice'" in msg and "root, user" in msg and "useradd" in msg and 'user = "user"' in msg


def test_parse_passwd_skips_malformed_lines() -> None:
    got = parse_passwd(["root:x:0:0:root:/root:/bin/bash", "broken", "x:x:a:0::/:/bin/sh", ""])
    assert list(got) == ["root"]


# ---------------------------------------------------------------------------------------------
# the template's `user` setting


def test_user_defaults_to_user_and_the_shipped_templates_say_so() -> None:
    assert TemplateConfig().user == "user"
    cfg = load_config(REPO / "configs" / "example_config.toml")
    assert {cfg.get_template(n).user for n in ("default-sandbox", "code-interpreter")} == {"user"}
    e2e = load_config(REPO / "tests" / "e2e" / "e2e_config.toml")
    assert e2e.get_template("e2e-test").user == "user"


@pytest.mark.parametrize("bad", ["", "Root", "1user", "us er", "a" * 33, "user;rm", "../x"])
def test_a_bad_user_name_is_refused_naming_the_key(tmp_path: Path, bad: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(f'[template."t1"]\nuser = {json.dumps(bad)}\n')
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert '[template."t1"] key user' in str(ei.value) and "not a user name" in str(ei.value)


def test_root_and_other_names_are_accepted(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[template."a"]\nuser = "root"\n[template."b"]\nuser = "build_bot-2"\n')
    cfg = load_config(p)
    assert (cfg.get_template("a").user, cfg.get_template("b").user) == ("root", "build_bot-2")


def test_changing_the_user_changes_the_builds_inputs(tmp_path: Path) -> None:
    from trenvx.template.builder import TemplateBuilder

    builder = TemplateBuilder(Config(data_root=tmp_path / "data"))
    tpl = TemplateConfig(name="t")
    digest_user, inputs_user = builder.input_digest(tpl)
    digest_root, inputs_root = builder.input_digest(tpl.model_copy(update={"user": "root"}))
    assert digest_user != digest_root and inputs_user["template"] != inputs_root["template"]
    assert builder.input_digest(TemplateConfig(name="t", user="user"))[0] == digest_user


# ---------------------------------------------------------------------------------------------
# the manifest


def manifest(**extra: object) -> TemplateManifest:
    return TemplateManifest.model_validate({
        "name": "t", "build_id": "b", "created_at": "now", "vmm_type": "qemu", "input_digest": "d",
        "inputs": {}, "config": {}, "accelerator_reason": "", "kernel_version": "k", "versions": {},
        "sizes": {}, "stage_seconds": {}, "rootfs_source": "s",
        "machine": {"vcpu": 1, "mem_mb": 256, "accelerator": "tcg", "kernel": "/k", "initrd": "/i",
                    "cmdline": "", "tcg_tb_size_mb": 64},
        **extra,
    })


def test_the_manifest_records_the_default_user_and_older_builds_stay_root(tmp_path: Path) -> None:
    new = TemplateBuild(tmp_path, manifest(default_user="user", default_workdir="/home/user"))
    assert (new.default_user, new.default_workdir) == ("user", "/home/user")
    again = TemplateManifest.model_validate_json(new.manifest.model_dump_json())
    assert (again.default_user, again.default_workdir) == ("user", "/home/user")
    old = TemplateBuild(tmp_path, manifest())  # written before the setting existed
    assert (old.default_user, old.default_workdir) == ("root", None)
