"""Root filesystem helpers, guest file injection, python checks and ext4 images (no VM, no buildah)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from trenvx.config import TemplateConfig
from trenvx.build_errors import BuildError, ImageError, InjectError
from trenvx.template.image import make_ext4_image, plan_size, tree_usage
from trenvx.template.inject import (
    INIT_MARKER,
    TINI_SOURCE,
    check_python,
    in_tree,
    init_script,
    inject_guest_files,
)
from trenvx.template.rootfs import (
    dockerfile_froms,
    image_tag,
    normalize_ref,
    rootfs_input_digest,
)

# ---------------------------------------------------------------------------------------------
# Dockerfile / refs / digest


def test_dockerfile_froms():
    df = """
# comment
ARG X=1
FROM --platform=linux/amd64 debian:bookworm AS build
RUN make
FROM build AS second
from python:3.12-slim
FROM scratch
COPY --from=build /x /x
FROM \\
   registry.example.com:5000/team/img:tag
"""
    assert dockerfile_froms(df) == ["debian:bookworm", "python:3.12-slim", "registry.example.com:5000/team/img:tag"]


def test_normalize_ref():
    assert normalize_ref("debian:bookworm") == "docker.io/library/debian:bookworm"
    assert normalize_ref("debian") == "docker.io/library/debian:latest"
    assert normalize_ref("user/img:1") == "docker.io/user/img:1"
    assert normalize_ref("localhost/trenvx-base:bookworm") == "localhost/trenvx-base:bookworm"
    assert normalize_ref("reg.io:5000/a/b") == "reg.io:5000/a/b:latest"
    assert normalize_ref("a@sha256:abc") == "docker.io/library/a@sha256:abc"


def test_image_tag_is_a_valid_reference():
    assert image_tag("default-sandbox") == "localhost/trenvx-tmpl/default-sandbox:latest"
    assert image_tag("My Template!") == "localhost/trenvx-tmpl/my-template:latest"


def test_rootfs_input_digest_tracks_dockerfile_and_context(tmp_path: Path):
    df = tmp_path / "t.Dockerfile"
    df.write_text("FROM debian:bookworm\nCOPY a /a\n")
    (tmp_path / "a").write_text("1")
    t = TemplateConfig(name="t", dockerfile=str(df), context=str(tmp_path))
    d1 = rootfs_input_digest(t)
    assert d1 == rootfs_input_digest(t)
    (tmp_path / "a").write_text("2")
    d2 = rootfs_input_digest(t)
    assert d2 != d1
    df.write_text("FROM debian:bookworm\nCOPY a /b\n")
    assert rootfs_input_digest(t) != d2
    # settings that do not change the tree do not change the digest
    assert rootfs_input_digest(t.model_copy(update={"mem_mb": 512})) == rootfs_input_digest(t)


def test_rootfs_input_digest_sources_differ():
    base = rootfs_input_digest(TemplateConfig(name="a"))
    img = rootfs_input_digest(TemplateConfig(name="a", docker_img="python:3.12"))
    img2 = rootfs_input_digest(TemplateConfig(name="a", docker_img="python:3.13"))
    assert len({base, img, img2}) == 3
    assert rootfs_input_digest(TemplateConfig(name="other")) == base  # the name is not an input


# ---------------------------------------------------------------------------------------------
# inject


def _minimal_tree(root: Path, with_json: bool = True, python: bool = True) -> Path:
    for d in ("etc", "bin", "usr/bin", "usr/lib/python3.11", "etc/skel"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc/group").write_text("root:x:0:\ntty:x:5:\n")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc/shadow").chmod(0o640)
    (root / "etc/skel/.bashrc").write_text("# skel\n")
    (root / "bin/bash").write_text("")
    if python:
        (root / "usr/bin/python3.11").write_text("")
        (root / "usr/bin/python3").symlink_to("python3.11")
    if with_json:
        (root / "usr/lib/python3.11/json").mkdir()
        (root / "usr/lib/python3.11/json/__init__.py").write_text("")
    return root


def _agent(tmp_path: Path) -> Path:
    a = tmp_path / "agent"
    a.mkdir(parents=True)
    (a / "__init__.py").write_text("")
    (a / "__main__.py").write_text("print('agent')\n")
    (a / "notes.txt").write_text("not copied")
    return a


needs_tini = pytest.mark.skipif(not TINI_SOURCE.exists(), reason="tini not installed (scripts/start.sh setup)")


@needs_tini
def test_inject_guest_files(tmp_path: Path):
    tree = _minimal_tree(tmp_path / "tree")
    inject_guest_files(tree, _agent(tmp_path))
    agent = tree / "opt/trenvx/trenvx_agent"
    assert sorted(p.name for p in agent.iterdir()) == ["__init__.py", "__main__.py"]
    tini = tree / "opt/trenvx/bin/tini"
    assert tini.read_bytes() == TINI_SOURCE.read_bytes() and os.access(tini, os.X_OK)
    init = tree / "opt/trenvx/init"
    assert init.stat().st_mode & 0o777 == 0o755
    text = init.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert "ptmxmode=666" in text and "gid=5" in text
    assert "exec /opt/trenvx/bin/tini -s -g --" in text and "-m trenvx_agent --port 49983" in text
    assert INIT_MARKER in text
    assert "user:x:1000:1000::/home/user:/bin/bash" in (tree / "etc/passwd").read_text()
    assert "user:x:1000:" in (tree / "etc/group").read_text()
    assert (tree / "etc/shadow").read_text().splitlines()[-1].startswith("user:*:")
    assert (tree / "etc/shadow").stat().st_mode & 0o777 == 0o640
    home = tree / "home/user"
    assert home.is_dir() and home.stat().st_uid == 1000 and (home / ".bashrc").stat().st_uid == 1000
    assert (tree / "etc/machine-id").read_bytes() == b""
    assert (tree / "tmp").stat().st_mode & 0o7777 == 0o1777
    # idempotent: a second injection neither duplicates the user nor fails
    inject_guest_files(tree, _agent(tmp_path / "again"))
    assert (tree / "etc/passwd").read_text().count("\nuser:") == 1


@needs_tini
def test_inject_installs_more_guest_packages_when_asked(tmp_path: Path):
    tree = _minimal_tree(tmp_path / "tree")
    interp = tmp_path / "interp"
    (interp / "sub").mkdir(parents=True)
    (interp / "__main__.py").write_text("print('interpreter')\n")
    (interp / "sub" / "kernels.py").write_text("")
    inject_guest_files(tree, _agent(tmp_path), {"trenvx_interpreter": interp})
    pkg = tree / "opt/trenvx/trenvx_interpreter"
    assert sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*.py")) == ["__main__.py", "sub/kernels.py"]
    assert (pkg / "__main__.py").stat().st_mode & 0o777 == 0o644
    inject_guest_files(tree, _agent(tmp_path / "again"))
    assert (tree / "opt/trenvx/trenvx_agent").is_dir()


def test_the_interpreter_is_an_input_only_of_templates_that_run_it(tmp_path: Path):
    from trenvx.config import Config, TemplateConfig
    from trenvx.template.builder import TemplateBuilder, interpreter_digest

    cfg = Config(data_root=tmp_path, template={
        "plain": TemplateConfig(docker_img="debian:bookworm"),
        "ci": TemplateConfig(docker_img="debian:bookworm", code_interpreter=True)})
    b = TemplateBuilder(cfg)
    assert b.input_digest(cfg.get_template("plain"))[1]["interpreter"] == ""
    assert b.input_digest(cfg.get_template("ci"))[1]["interpreter"] == interpreter_digest()


@needs_tini
def test_inject_keeps_existing_user_and_avoids_taken_uid(tmp_path: Path):
    tree = _minimal_tree(tmp_path / "tree")
    with open(tree / "etc/passwd", "a") as f:
        f.write("other:x:1000:1000::/home/other:/bin/sh\n")
    with open(tree / "etc/group", "a") as f:
        f.write("other:x:1000:\n")
    inject_guest_files(tree, _agent(tmp_path))
    line = [x for x in (tree / "etc/passwd").read_text().splitlines() if x.startswith("user:")][0]
    assert line.split(":")[2] == "1001" and line.split(":")[3] == "1001"


@needs_tini
def test_inject_never_writes_outside_the_tree(tmp_path: Path):
    outside = tmp_path / "host_etc"
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (outside / "machine-id").write_text("host-id\n")
    tree = _minimal_tree(tmp_path / "tree")
    # hostile image: absolute symlinks that would point at the host if followed naively
    (tree / "etc/machine-id").symlink_to(str(outside / "machine-id"))
    (tree / "opt").symlink_to("/")
    inject_guest_files(tree, _agent(tmp_path))
    assert (outside / "machine-id").read_text() == "host-id\n"
    assert (outside / "passwd").read_text() == "root:x:0:0::/root:/bin/sh\n"
    assert not Path("/trenvx_agent").exists()
    assert (tree / "trenvx/init").exists()  # /opt -> / inside the tree
    assert in_tree(tree, "etc/machine-id").is_relative_to(tree)


def test_in_tree_resolves_like_a_chroot(tmp_path: Path):
    tree = tmp_path / "t"
    (tree / "usr/lib").mkdir(parents=True)
    (tree / "lib").symlink_to("usr/lib")
    (tree / "abs").symlink_to("/usr/lib")
    (tree / "up").symlink_to("../../../../..")
    assert in_tree(tree, "/lib/x") == tree / "usr/lib/x"
    assert in_tree(tree, "abs/y") == tree / "usr/lib/y"
    assert in_tree(tree, "up/etc/passwd") == tree / "etc/passwd"
    (tree / "loop").symlink_to("loop")
    with pytest.raises(InjectError, match="symbolic links"):
        in_tree(tree, "loop/x")


def test_inject_without_agent_files_is_an_error(tmp_path: Path):
    tree = _minimal_tree(tmp_path / "tree")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InjectError, match="no \\*.py"):
        inject_guest_files(tree, tmp_path / "empty")


def test_init_script_is_valid_sh():
    sh = shutil.which("dash") or shutil.which("sh")
    subprocess.run([sh, "-n", "-c", init_script()], check=True)


def test_check_python_ok(tmp_path: Path):
    check_python(_minimal_tree(tmp_path / "t"))


def test_check_python_missing_interpreter(tmp_path: Path):
    tree = _minimal_tree(tmp_path / "t", python=False)
    with pytest.raises(InjectError, match="no /usr/bin/python3") as ei:
        check_python(tree)
    assert "apt-get install" in str(ei.value) and ei.value.stage == "inject"
    assert isinstance(ei.value, BuildError)


def test_check_python_minimal_without_json(tmp_path: Path):
    tree = _minimal_tree(tmp_path / "t", with_json=False)
    with pytest.raises(InjectError, match="json") as ei:
        check_python(tree)
    assert "python3-minimal" in str(ei.value)


def test_check_python_usr_local(tmp_path: Path):
    tree = tmp_path / "t"
    (tree / "usr/local/bin").mkdir(parents=True)
    (tree / "usr/local/lib/python3.12/json").mkdir(parents=True)
    (tree / "usr/local/lib/python3.12/json/__init__.py").write_text("")
    (tree / "usr/local/bin/python3.12").write_text("")
    (tree / "usr/local/bin/python3").symlink_to("python3.12")
    check_python(tree)


def test_check_python_absolute_symlink_resolved_in_tree(tmp_path: Path):
    tree = _minimal_tree(tmp_path / "t")
    (tree / "usr/bin/python3").unlink()
    (tree / "usr/bin/python3").symlink_to("/usr/bin/python3.11")  # absolute: must mean the tree's
    check_python(tree)


# ---------------------------------------------------------------------------------------------
# ext4 image


def test_plan_size():
    size, inodes = plan_size(100 * 2**20, 5000, 0)
    assert size >= 110 * 2**20 and size % (4 * 2**20) == 0
    assert inodes >= 5000
    size2, _ = plan_size(100 * 2**20, 5000, 512)
    assert size2 - size >= 512 * 2**20
    with pytest.raises(ImageError):
        plan_size(1, 1, -1)


needs_mkfs = pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="e2fsprogs not installed")


@needs_mkfs
async def test_make_ext4_image(tmp_path: Path):
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hello").write_text("hi from the tree\n")
    (tree / "big").write_bytes(os.urandom(3 * 2**20))
    (tree / "link").symlink_to("etc/hello")
    os.chown(tree / "etc/hello", 1000, 1000)
    content, inodes = tree_usage(tree)
    assert content >= 3 * 2**20 and inodes >= 4
    out = tmp_path / "out/rootfs.ext4"
    size = await make_ext4_image(tree, out, extra_mb=8)
    assert size == out.stat().st_size and size >= content + 8 * 2**20
    assert not out.with_name("rootfs.ext4.tmp").exists()
    assert out.stat().st_blocks * 512 < size  # sparse
    info = subprocess.run(["dumpe2fs", "-h", str(out)], capture_output=True, text=True, check=True).stdout
    assert "Block size:               4096" in info
    assert "trenvx-root" in info
    assert "has_journal" in info
    assert "Reserved block count:     0" in info
    cat = subprocess.run(["debugfs", "-R", "cat /etc/hello", str(out)], capture_output=True, text=True, check=True)
    assert cat.stdout == "hi from the tree\n"
    stat_ = subprocess.run(["debugfs", "-R", "stat /etc/hello", str(out)], capture_output=True, text=True, check=True)
    assert "User:  1000" in stat_.stdout
    subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True, check=True)


@needs_mkfs
async def test_make_ext4_image_missing_tree(tmp_path: Path):
    with pytest.raises(ImageError, match="not a directory"):
        await make_ext4_image(tmp_path / "nope", tmp_path / "x.ext4", 0)


# ---------------------------------------------------------------------------------------------
# the subprocess runner


async def test_run_collects_output_and_survives_long_lines():
    from trenvx.build_errors import run

    seen: list[str] = []
    code = 'import sys; sys.stdout.write("x" * 300000 + "\\r" + "done\\nl2\\nlast")'
    rc, out = await run("t", ["python3", "-c", code], timeout=30, log=seen.append)
    assert rc == 0 and out.splitlines() == ["done", "l2", "last"] and seen == ["done", "l2", "last"]


async def test_run_errors_name_the_command():
    from trenvx.build_errors import CommandError, run

    with pytest.raises(CommandError) as ei:
        await run("stagex", ["sh", "-c", "echo boom; exit 3"], timeout=30, hint="do this")
    e = ei.value
    assert e.stage == "stagex" and e.returncode == 3 and "boom" in str(e) and "do this" in str(e)
    with pytest.raises(CommandError, match="did not finish within 0.3 s"):
        await run("t", ["sleep", "5"], timeout=0.3)
    with pytest.raises(CommandError, match="not found; install the Debian package 'buildah'"):
        await run("t", ["/nonexistent/buildah"], timeout=1)


async def test_run_kills_its_process_group_on_cancel(tmp_path: Path):
    import asyncio

    from trenvx.build_errors import run

    pidfile = tmp_path / "pid"
    task = asyncio.create_task(run("t", ["sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"], timeout=60))
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pid = int(pidfile.read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        # a killed child stays a zombie until its parent (our sh, also killed) is reaped by init
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the grandchild survived the cancellation")


# ---------------------------------------------------------------------------------------------
# builder choice and the docker path (with a stand-in docker CLI: no engine runs here)

FAKE_DOCKER = r'''#!/usr/bin/env python3
import io, os, sys, tarfile
calls = os.environ["FAKE_DOCKER_LOG"]
with open(calls, "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
cmd = sys.argv[1]
if cmd == "info":
    print("24.0.0")
elif cmd == "image":  # image inspect REF: everything is present
    pass
elif cmd == "build":
    print("Step 1/2 : FROM debian:bookworm")
elif cmd == "create":
    print("c0ffee")
elif cmd == "export":
    out = sys.argv[sys.argv.index("-o") + 1]
    with tarfile.open(out, "w") as t:
        for name, data in (("hello", b"hi\n"), ("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")):
            ti = tarfile.TarInfo(name); ti.size = len(data); t.addfile(ti, io.BytesIO(data))
elif cmd == "rm":
    pass
else:
    sys.exit(f"fake docker: unexpected {sys.argv[1:]}")
'''


async def test_builder_choice(monkeypatch, tmp_path: Path):
    from trenvx.template import rootfs

    monkeypatch.setenv("TRENVX_BUILDER", "buildah")
    assert await rootfs.choose_builder() == "buildah"
    monkeypatch.setenv("TRENVX_BUILDER", "podman")
    with pytest.raises(BuildError, match="TRENVX_BUILDER"):
        await rootfs.choose_builder()
    monkeypatch.setenv("TRENVX_BUILDER", "auto")
    monkeypatch.setenv("PATH", str(tmp_path))  # no docker at all
    assert await rootfs.choose_builder() == "buildah"


async def test_docker_path_exports_and_cleans_up(monkeypatch, tmp_path: Path):
    from trenvx.layout import DataRoot
    from trenvx.template.rootfs import prepared_rootfs

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "docker").write_text(FAKE_DOCKER)
    (bindir / "docker").chmod(0o755)
    calls = tmp_path / "calls"
    monkeypatch.setenv("FAKE_DOCKER_LOG", str(calls))
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.delenv("TRENVX_BUILDER", raising=False)
    (tmp_path / "ctx").mkdir()
    df = tmp_path / "ctx/t.Dockerfile"
    df.write_text("FROM debian:bookworm\nRUN echo hi > /hello\n")
    dr = DataRoot(tmp_path / "data")
    t = TemplateConfig(name="t", dockerfile=str(df))
    async with prepared_rootfs(t, dr, lambda m: None) as tree:
        assert (tree.path / "hello").read_text() == "hi\n"
        assert tree.source == f"Dockerfile {df} via docker"
        workdir = tree.path.parent
    assert not workdir.exists(), "the exported tree must be removed"
    log = calls.read_text().splitlines()
    assert any(x.startswith("build -f") and "localhost/trenvx-tmpl/t:latest" in x for x in log)
    create = next(x for x in log if x.startswith("create"))
    name = create.split()[2]
    assert f"rm -f {name}" in log, "the container must be removed"
