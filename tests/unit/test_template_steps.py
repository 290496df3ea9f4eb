"""The template build API's logic without a VM: E2B's build steps -> a BuildPlan (and what is
refused), the uploaded archives (what is refused, the SDK's filesHash recomputed), the guest's
COPY program (unpacking that cannot escape, Docker's COPY rules), names and build records.
The end-to-end side is tests/e2e/test_e2b_template_build.py."""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
from pathlib import Path

import pytest

from trenvx.config import Config, TemplateConfig
from trenvx.template import guest_copy
from trenvx.template.build_api import BuildService, InvalidRequest, NameTaken, split_name
from trenvx.template.step_runner import describe, template_config
from trenvx.template.steps import (
    BASE_REF, CopyStep, EnvStep, RunStep, StepError, UserStep, WorkdirStep, expand_vars, parse_build, resolve_workdir,
)
from trenvx.template.uploads import UnsafeArchive, UploadStore, check_archive, files_hash

H = "0123456789abcdef" * 4


def body(*steps: dict, **kw) -> dict:
    return {"fromImage": "debian:bookworm", "steps": list(steps), **kw}


# ---------------------------------------------------------------------------------------------- steps


def test_every_step_type_is_translated() -> None:
    plan = parse_build(body(
        {"type": "RUN", "args": ["echo hi && true"], "force": False},
        {"type": "RUN", "args": ["apt-get update", "root"]},
        {"type": "COPY", "args": ["./app/../src", "/app/", "", "0755"], "filesHash": H},
        {"type": "COPY", "args": ["x.txt", "rel/x.txt", "user:user", ""], "filesHash": H},
        {"type": "ENV", "args": ["A", "1", "B", "${A}-2"]},
        {"type": "WORKDIR", "args": ["/srv"]},
        {"type": "WORKDIR", "args": ["app"]},
        {"type": "USER", "args": ["root"]},
        startCmd="python3 -m http.server", readyCmd="sleep 1",
    ))
    assert plan.base_image == BASE_REF
    assert plan.steps[0] == RunStep("1", "echo hi && true", None)
    assert plan.steps[1] == RunStep("2", "apt-get update", "root")
    assert plan.steps[2] == CopyStep("3", "./app/../src", "/app/", None, 0o755, H)
    assert plan.steps[2].path == "src"
    assert plan.steps[3] == CopyStep("4", "x.txt", "rel/x.txt", "user:user", None, H)
    assert plan.steps[4] == EnvStep("5", (("A", "1"), ("B", "${A}-2")))
    assert plan.steps[5:] == (WorkdirStep("6", "/srv"), WorkdirStep("7", "app"), UserStep("8", "root"))
    assert (plan.final_user, plan.final_workdir) == ("root", "/srv/app")
    assert (plan.start_cmd, plan.ready_cmd, plan.force) == ("python3 -m http.server", "sleep 1", False)
    assert plan.files_hashes == [H]
    assert describe(plan.steps[1]) == "RUN apt-get update (as root)"


def test_e2b_defaults_and_base_synonyms() -> None:
    plan = parse_build(body())
    assert (plan.final_user, plan.final_workdir, plan.steps) == ("user", "/home/user", ())
    for ref in ("debian:12", "docker.io/library/debian:bookworm", "debian:bookworm-slim"):
        assert parse_build({"fromImage": ref}).base_image == BASE_REF
    assert parse_build({"fromImage": "localhost/mine:1"}, local_image=True).base_image == "localhost/mine:1"
    assert parse_build(body({"type": "RUN", "args": ["x"], "force": True})).force
    assert parse_build(body(force=True)).force


def test_digest_follows_the_inputs() -> None:
    a = parse_build(body({"type": "RUN", "args": ["echo a"]}))
    assert a.digest() == parse_build(body({"type": "RUN", "args": ["echo a"]}, force=True)).digest()
    for other in (body({"type": "RUN", "args": ["echo b"]}),
                  body({"type": "RUN", "args": ["echo a", "root"]}),
                  body({"type": "RUN", "args": ["echo a"]}, startCmd="x"),
                  body({"type": "COPY", "args": ["a", "/a"], "filesHash": H})):
        assert parse_build(other).digest() != a.digest()


@pytest.mark.parametrize("request_body, words", [
    ({"fromImage": "e2bdev/base"}, "not available on this trenvx server"),
    ({"fromImage": "python:3"}, "debian:bookworm"),
    ({}, "fromImage: required"),
    ({"fromTemplate": "base"}, "fromTemplate"),
    ({"fromImage": "debian:bookworm", "fromImageRegistry": {"type": "registry", "username": "u", "password": "p"}},
     "registry credentials"),
    (body({"type": "ADD", "args": ["a", "b"]}), "step type 'ADD' is not supported"),
    (body({"type": "RUN", "args": []}), "args must be [command]"),
    (body({"type": "RUN", "args": ["ls", "bad user!"]}), "is not a user name"),
    (body({"type": "USER", "args": ["$(reboot)"]}), "is not a user name"),
    (body({"type": "ENV", "args": ["1BAD", "x"]}), "not an environment variable name"),
    (body({"type": "ENV", "args": ["ODD"]}), "pairs"),
    (body({"type": "COPY", "args": ["/etc/passwd", "/x"], "filesHash": H}), "is absolute"),
    (body({"type": "COPY", "args": ["../secret", "/x"], "filesHash": H}), "leaves the template's file context"),
    (body({"type": "COPY", "args": ["a/../../b", "/x"], "filesHash": H}), "leaves"),
    (body({"type": "COPY", "args": ["a", "/x", "", "rwx"], "filesHash": H}), "octal mode"),
    (body({"type": "COPY", "args": ["a", "/x"], "filesHash": "NOTAHASH"}), "filesHash"),
    (body({"type": "WORKDIR", "args": ["/a\nRUN x"]}), "single line"),
])
def test_what_cannot_be_built_is_refused(request_body: dict, words: str) -> None:
    with pytest.raises(StepError) as ei:
        parse_build(request_body)
    assert words in str(ei.value)


def test_env_expansion_and_workdirs() -> None:
    env = {"A": "1", "HOME": "/root"}
    assert expand_vars("$A-${A}-$NOPE-${HOME}/x", env) == "1-1--/root/x"
    assert expand_vars("no vars $", env) == "no vars $"
    assert resolve_workdir("/home/user", "app") == "/home/user/app"
    assert resolve_workdir("/home/user", "/srv/../opt") == "/opt"
    assert resolve_workdir("/", "../../..") == "/"


def test_template_config_of_a_plan() -> None:
    plan = parse_build(body({"type": "USER", "args": ["root"]}, {"type": "WORKDIR", "args": ["/srv"]},
                            startCmd="serve", readyCmd="true"))
    tpl = template_config("mine", plan, {"vcpu": 2, "mem_mb": 512, "disk_mb": 300})
    assert (tpl.docker_img, tpl.no_pull, tpl.vcpu, tpl.mem_mb, tpl.disk_mb) == (BASE_REF, True, 2, 512, 300)
    assert (tpl.start_cmd.cmd, tpl.start_cmd.working_dir, tpl.ready_cmd, tpl.user) == ("serve", "/srv", "true", "root")
    # An account a step makes does not exist when the image is checked: the default user stays `user`.
    made = parse_build(body({"type": "USER", "args": ["app"]}))
    assert template_config("mine", made, {}).user == "user"


# ---------------------------------------------------------------------------------------------- archives


def make_tar(path: Path, members: list[tuple[str, bytes, str | bytes]], gz: bool = True) -> Path:
    """members: (name, type, data or link target)."""
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, kind, payload in members:
            m = tarfile.TarInfo(name)
            m.type = kind
            m.mode = 0o644 if kind != tarfile.DIRTYPE else 0o755
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                m.linkname = str(payload)
                tar.addfile(m)
            elif kind == tarfile.REGTYPE:
                data = payload if isinstance(payload, bytes) else payload.encode()
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
            else:
                tar.addfile(m)
    return path


@pytest.mark.parametrize("members, words", [
    ([("../evil", tarfile.REGTYPE, b"x")], "'..' in its path"),
    ([("a/../../evil", tarfile.REGTYPE, b"x")], "'..' in its path"),
    ([("/etc/cron.d/evil", tarfile.REGTYPE, b"x")], "an absolute path"),
    ([("sda", tarfile.BLKTYPE, b"")], "a device file"),
    ([("tty", tarfile.CHRTYPE, b"")], "a device file"),
    ([("fifo", tarfile.FIFOTYPE, b"")], "a FIFO"),
    ([("l", tarfile.SYMTYPE, "/etc/shadow")], "a symlink to an absolute path"),
    ([("d/l", tarfile.SYMTYPE, "../../x")], "leading outside the archive"),
    ([("hard", tarfile.LNKTYPE, "/etc/shadow")], "a hard link"),
    ([("hard", tarfile.LNKTYPE, "not-a-member")], "a hard link"),
    # lexically inside, but through symlinks unpacked before: a/up -> "..", a/b -> up/.. is the parent
    ([("a", tarfile.DIRTYPE, b""), ("a/up", tarfile.SYMTYPE, ".."), ("a/b", tarfile.SYMTYPE, "up/..")],
     "leading outside the archive"),
    ([("out", tarfile.SYMTYPE, "."), ("esc", tarfile.SYMTYPE, "out/out"), ("top", tarfile.SYMTYPE, ".."),
      ("top2", tarfile.DIRTYPE, b"")], "leading outside the archive"),
    ([("up", tarfile.SYMTYPE, "sub/.."), ("sub", tarfile.SYMTYPE, ".."), ("up/x", tarfile.REGTYPE, b"x")],
     "outside the archive"),
])
def test_archives_that_could_escape_are_refused(tmp_path: Path, members: list, words: str) -> None:
    with pytest.raises(UnsafeArchive) as ei:
        check_archive(make_tar(tmp_path / "t.tar.gz", members))
    assert words in str(ei.value)


def test_safe_archives_pass_and_junk_is_refused(tmp_path: Path) -> None:
    ok = make_tar(tmp_path / "ok.tar", [
        ("d", tarfile.DIRTYPE, b""), ("d/a.txt", tarfile.REGTYPE, b"a"), ("d/link", tarfile.SYMTYPE, "a.txt"),
        ("d/bin", tarfile.SYMTYPE, "../d/a.txt"), ("d/hard", tarfile.LNKTYPE, "d/a.txt"),
    ], gz=False)
    assert check_archive(ok) == 5
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(UnsafeArchive, match="not a tar archive"):
        check_archive(junk)


def test_upload_store_keeps_only_checked_archives(tmp_path: Path) -> None:
    from trenvx.layout import DataRoot

    store = UploadStore(DataRoot(tmp_path).ensure())
    tmp = store.new_temp()
    make_tar(tmp, [("../x", tarfile.REGTYPE, b"x")])
    with pytest.raises(UnsafeArchive):
        store.accept(tmp, H)
    assert not tmp.exists() and not store.present(H)
    tmp = store.new_temp()
    make_tar(tmp, [("x", tarfile.REGTYPE, b"x")])
    assert store.accept(tmp, H) == 1 and store.present(H) and not tmp.exists()
    assert oct(store.dir.stat().st_mode & 0o777) == "0o700"
    with pytest.raises(ValueError):
        store.path("../../etc/passwd")


def test_files_hash_is_the_sdks(tmp_path: Path) -> None:
    """The SDK's own hashing and packing (e2b.template.utils), compared with ours read back from the archive."""
    utils = pytest.importorskip("e2b.template.utils")
    ctx = tmp_path / "ctx"
    (ctx / "d/sub").mkdir(parents=True)
    (ctx / "a.txt").write_text("hello\n")
    (ctx / "d/sub/run.sh").write_text("#!/bin/sh\necho\n")
    (ctx / "d/sub/run.sh").chmod(0o755)
    (ctx / "d/link").symlink_to("../a.txt")
    os.link(ctx / "a.txt", ctx / "d/hard.txt")
    for src, dest, resolve, gz in [("a.txt", "/home/user/a.txt", False, True), ("d", "/app/", False, True),
                                   ("d", "/app/", True, False), ("*.txt", "/x/", False, True), (".", "/all", False, True)]:
        want = utils.calculate_files_hash(src, dest, str(ctx), [], resolve, None)
        f = utils.tar_file_stream(src, str(ctx), [], resolve, gz)
        archive = tmp_path / "up.tar"
        archive.write_bytes(f.read())
        check_archive(archive)
        assert files_hash(archive, src, dest) == want, (src, resolve)
        assert files_hash(archive, src, dest + "x") != want


# ---------------------------------------------------------------------------------------------- guest COPY


def test_guest_unpack_refuses_escapes_by_itself(tmp_path: Path) -> None:
    """The guest program does not rely on the host's check: the same tricks fail there too."""
    (tmp_path / "outside").mkdir()
    for i, members in enumerate([
        [("a", tarfile.DIRTYPE, b""), ("a/up", tarfile.SYMTYPE, ".."), ("a/b", tarfile.SYMTYPE, "up/..")],
        [("l", tarfile.SYMTYPE, "/etc")],
        [("../x", tarfile.REGTYPE, b"x")],
        [("up", tarfile.SYMTYPE, ".."), ("up/outside/pwned", tarfile.REGTYPE, b"x")],
        [("p", tarfile.FIFOTYPE, b"")],
    ]):
        archive = make_tar(tmp_path / f"{i}.tar", members)
        stage = tmp_path / f"stage{i}"
        with pytest.raises(guest_copy.CopyError):
            guest_copy.unpack(str(archive), str(stage))
    assert list((tmp_path / "outside").iterdir()) == []


def _staged(tmp_path: Path) -> Path:
    archive = make_tar(tmp_path / "up.tar", [
        ("a.txt", tarfile.REGTYPE, b"A"), ("b.txt", tarfile.REGTYPE, b"B"),
        ("dir", tarfile.DIRTYPE, b""), ("dir/x", tarfile.REGTYPE, b"X"), ("dir/sub", tarfile.DIRTYPE, b""),
        ("dir/sub/y", tarfile.REGTYPE, b"Y"), ("dir/ln", tarfile.SYMTYPE, "x"),
    ])
    stage = tmp_path / "stage"
    assert guest_copy.unpack(str(archive), str(stage)) == 7
    return stage


def test_guest_copy_follows_dockers_rules(tmp_path: Path) -> None:
    stage = _staged(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    guest_copy.copy(str(stage), "a.txt", f"{root}/file-renamed", "root", None)
    assert (root / "file-renamed").read_text() == "A"
    guest_copy.copy(str(stage), "a.txt", f"{root}/into/", "root", None)
    assert (root / "into/a.txt").read_text() == "A"
    guest_copy.copy(str(stage), "dir", f"{root}/contents", "root", None)  # a directory's content, not itself
    assert sorted(p.name for p in (root / "contents").iterdir()) == ["ln", "sub", "x"]
    assert os.readlink(root / "contents/ln") == "x" and (root / "contents/sub/y").read_text() == "Y"
    guest_copy.copy(str(stage), "*.txt", f"{root}/many", "root", None)  # several sources: into a directory
    assert sorted(p.name for p in (root / "many").iterdir()) == ["a.txt", "b.txt"]
    with pytest.raises(guest_copy.CopyError, match="no files match"):
        guest_copy.copy(str(stage), "nothing*", f"{root}/n", "root", None)


def test_guest_copy_owner_and_mode(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    stage = _staged(tmp_path)
    dest = tmp_path / "owned"
    made = guest_copy.copy(str(stage), "dir", str(dest), "4321:4322", 0o750)
    assert made and all(os.lstat(p).st_uid == 4321 and os.lstat(p).st_gid == 4322 for p in made)
    assert (dest / "x").stat().st_mode & 0o777 == 0o750 and (dest / "sub").stat().st_mode & 0o777 == 0o750
    with pytest.raises(guest_copy.CopyError, match="does not exist"):
        guest_copy.copy(str(stage), "a.txt", str(tmp_path / "z"), "no-such-user-here", None)
    assert guest_copy.main(["x", "{not json"]) == 2


# ---------------------------------------------------------------------------------------------- names and records


def test_names_and_tags() -> None:
    assert split_name("my-tpl", None) == "my-tpl"
    assert split_name("my-tpl:latest", ["latest"]) == "my-tpl"
    for bad, words in [("my-tpl:v2", "tags"), ("team/x", "namespaced"), ("Bad Name", "not a template name"),
                       ("..x", "not a template name"), ("../x", "namespaced")]:
        with pytest.raises(InvalidRequest, match=words):
            split_name(bad, None)
    with pytest.raises(InvalidRequest, match="tags"):
        split_name("x", ["stable"])


def test_configured_templates_are_not_the_apis(tmp_path: Path) -> None:
    config = Config(data_root=tmp_path, template={"mine": TemplateConfig(name="mine")})

    async def go() -> None:
        svc = BuildService(config)
        with pytest.raises(NameTaken):
            svc.request("mine")
        with pytest.raises(NameTaken):
            svc.request("default-sandbox")  # the config's default template
        rec = svc.request("api-made", cpu_count=1, memory_mb=128)
        assert rec.status == "waiting" and rec.machine["mem_mb"] == 128 and svc.owned("api-made")
        assert svc.knows("api-made") and svc.get("api-made", rec.build_id) is rec
        assert not svc.data_root.template_dir("api-made").exists(), "a request alone leaves nothing on disk"
        with pytest.raises(InvalidRequest, match="memoryMB"):
            svc.request("api-made", memory_mb=10)
        # What cannot be built fails the build at once, with the reason (the SDK raises it).
        await svc.start("api-made", rec.build_id, body({"type": "COPY", "args": ["a", "/a"], "filesHash": H}))
        assert rec.status == "error" and "not uploaded" in (rec.reason or "") and rec.reason_step == "1"
        with pytest.raises(NameTaken, match="started already"):
            await svc.start("api-made", rec.build_id, {"fromImage": "debian:bookworm"})
        other = svc.request("api-made")
        await svc.start("api-made", other.build_id, {"fromImage": "--root=/tmp alpine:3"})
        assert other.status == "error" and "not available" in (other.reason or "") and other.task is None
        fresh = svc.request("api-made")
        fresh.add("one")
        fresh.add("two", "error", "1")
        assert [e.message for e in fresh.entries(1)] == ["one", "two"]
        assert [e.message for e in fresh.entries(0, 100, "error")] == ["two"]
        await svc.aclose()

    asyncio.run(go())


def test_build_request_sizes_are_json_integers_within_bounds() -> None:
    """A string of digits is refused, not coerced (the fuzzer sent "64" and it was taken), and the
    bounds reach the OpenAPI document as minimum/maximum."""
    from pydantic import ValidationError

    from trenvx.server.routes_builds import TemplateBuildRequestV3 as Req

    assert Req(name="t", memoryMB=128.0, cpuCount=1, minFreeDiskMB=0).memoryMB == 128
    for bad in ({"memoryMB": "128"}, {"cpuCount": True}, {"minFreeDiskMB": 1.5}, {"memoryMB": 10}, {"minFreeDiskMB": -1}):
        with pytest.raises(ValidationError):
            Req(name="t", **bad)
    schema = Req.model_json_schema()["properties"]["memoryMB"]["anyOf"][0]
    assert schema["minimum"] == 64 and "ge" not in schema


def test_a_failed_api_build_gives_its_name_back(tmp_path: Path) -> None:
    """A build that failed and left no build on disk: its marker and directory go; a name with a
    build on disk keeps them."""
    svc = BuildService(Config(data_root=tmp_path))
    svc._mark("failed-once")
    d = svc.data_root.template_dir("failed-once")
    assert (d / ".build-api").is_file()
    svc._unmark_if_unbuilt("failed-once")
    assert not d.exists()
    svc._mark("built")
    build = svc.data_root.template_dir("built") / "20260101T000000-abcd"
    build.mkdir()
    (build / "manifest.json").write_text("{}")
    svc._unmark_if_unbuilt("built")
    assert (svc.data_root.template_dir("built") / ".build-api").is_file()
