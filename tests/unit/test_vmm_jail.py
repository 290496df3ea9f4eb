"""trenvx.vmm.cgroups against fake cgroup trees (v1 and v2) and trenvx.vmm.jail's pure parts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trenvx.vmm import cgroups
from trenvx.vmm.cgroups import CgroupLimits, VmmCgroup
from trenvx.vmm.jail import Bind, JailPolicy, grant_read, plan_binds, shared_roots, unreadable_by
from trenvx.vmm.qemu import qemu_argv
from trenvx.vmm.base import DiskSpec, MachineSpec, VmSpec


def v1_tree(tmp: Path) -> tuple[str, str]:
    mountinfo = []
    for i, ctl in enumerate(("cpu", "memory", "pids", "cpuacct")):
        own = tmp / ctl / ("process_api/x" if ctl == "memory" else "")
        own.mkdir(parents=True)
        (own / "cgroup.procs").write_text(f"{os.getpid()}\n")
        mountinfo.append(f"{30 + i} 20 0:{40 + i} / {tmp / ctl} rw,relatime - cgroup cgroup rw,{ctl}")
    mountinfo.append(f"50 20 0:60 / {tmp / 'unified'} rw - cgroup2 cgroup2 rw")
    proc = "4:memory:/process_api/x\n3:cpu:/\n2:pids:/\n1:cpuacct:/\n0::/\n"
    return proc, "\n".join(mountinfo)


def test_v1_groups_nest_under_the_servers_own_cgroup_with_the_limits(tmp_path: Path) -> None:
    proc, mi = v1_tree(tmp_path)
    host, why = cgroups.detect("own", proc_cgroup=proc, mountinfo=mi)
    assert host is not None, why
    assert host.version == 1 and host.controllers == {"cpu", "memory", "pids"}
    assert host.parents["memory"] == tmp_path / "memory/process_api/x/trenvx-own"
    g = VmmCgroup.create(host, "sb1", CgroupLimits(memory_bytes=640 << 20, pids_max=512, cpu_weight=100))
    assert (g.dirs["memory"] / "memory.limit_in_bytes").read_text() == str(640 << 20)
    assert (g.dirs["pids"] / "pids.max").read_text() == "512"
    assert (g.dirs["cpu"] / "cpu.shares").read_text() == "1024"
    (g.dirs["cpu"] / "cpu.idle").write_text("0")
    (g.dirs["cpu"] / "cpu.shares").write_text("untouched")  # the kernel refuses shares while idle
    assert g.set_idle(True) == "cpu.idle" and (g.dirs["cpu"] / "cpu.idle").read_text() == "1"
    assert (g.dirs["cpu"] / "cpu.shares").read_text() == "untouched"
    assert g.set_idle(False) == "cpu.idle" and (g.dirs["cpu"] / "cpu.idle").read_text() == "0"
    assert (g.dirs["cpu"] / "cpu.shares").read_text() == "1024"
    g.add(4242)
    assert all(f.read_text() == "4242" for f in g.procs_files())
    # a fake tree's files make rmdir fail: empty them to stand for the kernel's
    assert [x.name for x in cgroups.groups(host)] == ["sb1"]
    for f in g.procs_files():
        f.write_text("")
    for d in g.dirs.values():
        for f in d.iterdir():
            f.unlink()
    assert cgroups.sweep(host, min_age_s=3600) == []  # too young: a VMM may be joining it
    assert cgroups.sweep(host, min_age_s=0) == ["sb1"] and not g.exists()
    # A stopping server removes its parents once empty; a later VMM makes them again.
    assert sorted(cgroups.release_parents(host)) == sorted(set(host.parents.values()))
    assert not any(p.exists() for p in host.parents.values())
    again = VmmCgroup.create(host, "sb2", CgroupLimits(memory_bytes=640 << 20, pids_max=512))
    assert again.exists() and (again.dirs["pids"] / "pids.max").read_text() == "512"
    assert cgroups.release_parents(host) == []  # not empty: kept
    # A stopping server also removes the groups of VMMs that died young (a server killed mid-run,
    # a VMM killed with it): each test server that did left its tree behind.
    for f in again.procs_files():
        f.write_text("")
    for d in again.dirs.values():
        for f in d.iterdir():
            f.unlink()
    assert sorted(cgroups.release(host)) == sorted(set(host.parents.values()))
    assert not again.exists() and not any(p.exists() for p in host.parents.values())


def test_v1_without_cpu_weight_file_falls_back_to_the_lowest_shares(tmp_path: Path) -> None:
    proc, mi = v1_tree(tmp_path)
    host, _ = cgroups.detect("own", proc_cgroup=proc, mountinfo=mi)
    assert host is not None
    g = VmmCgroup.create(host, "sb2", CgroupLimits(cpu_weight=200))
    assert g.set_idle(True) == "weight" and (g.dirs["cpu"] / "cpu.shares").read_text() == "10"
    assert g.set_idle(False) == "weight" and (g.dirs["cpu"] / "cpu.shares").read_text() == "2048"


def v2_tree(tmp: Path, others: bool) -> tuple[str, str]:
    base = tmp / "cg" / "system.slice" / "trenvx.service"
    base.mkdir(parents=True)
    (base / "cgroup.controllers").write_text("cpu memory pids io\n")
    (base / "cgroup.procs").write_text(f"{os.getpid()}\n" + ("99999\n" if others else ""))
    return "0::/system.slice/trenvx.service\n", f"30 20 0:40 / {tmp / 'cg'} rw - cgroup2 cgroup2 rw"


def test_v2_moves_the_server_into_a_leaf_and_delegates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc, mi = v2_tree(tmp_path, others=False)
    base = tmp_path / "cg/system.slice/trenvx.service"
    calls: list[Path] = []
    real = cgroups._enable

    def enable(cg: Path, want: str) -> None:
        calls.append(cg)
        if cg == base and not (base / cgroups.SERVER_LEAF / "cgroup.procs").exists():
            raise OSError(16, "Device or resource busy")
        real(cg, want)

    monkeypatch.setattr(cgroups, "_enable", enable)
    host, why = cgroups.detect("own", proc_cgroup=proc, mountinfo=mi)
    assert host is not None, why
    assert host.version == 2 and host.parents[""] == base / "trenvx-own"
    assert (base / cgroups.SERVER_LEAF / "cgroup.procs").read_text() == str(os.getpid())
    assert (base / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    g = VmmCgroup.create(host, "sb", CgroupLimits(memory_bytes=1 << 30, pids_max=64, cpu_weight=50))
    assert (g.dirs[""] / "memory.max").read_text() == str(1 << 30)
    assert (g.dirs[""] / "cpu.weight").read_text() == "50"
    assert g.set_idle(True) == "weight" and (g.dirs[""] / "cpu.weight").read_text() == "1"


def test_v2_with_other_processes_in_the_servers_cgroup_is_refused_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc, mi = v2_tree(tmp_path, others=True)

    def busy(cg: Path, want: str) -> None:
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(cgroups, "_enable", busy)
    host, why = cgroups.detect("own", proc_cgroup=proc, mountinfo=mi)
    assert host is None and "other processes" in why and "Delegate=yes" in why


def test_no_cgroup_mount_is_reported() -> None:
    host, why = cgroups.detect("own", proc_cgroup="0::/\n", mountinfo="")
    assert host is None and "no cgroup" in why


def test_binds_show_own_dirs_writable_and_mapped_files_read_only(tmp_path: Path) -> None:
    root = tmp_path / "data"
    sb, tpl = root / "sandboxes/a", root / "templates/t/b1"
    for d in (sb / "vm", tpl, tmp_path / "elsewhere"):
        d.mkdir(parents=True)
    binds = plan_binds(root, [sb / "vm", sb], [tpl / "memory", tpl / "rootfs.ext4", sb / "layer-1.qcow2",
                                                tmp_path / "elsewhere" / "x.so"])
    assert binds == [Bind(sb.resolve(), True, sb.resolve()), Bind(tpl.resolve(), False, tpl.resolve())]


def test_a_symlinked_entry_of_data_root_is_bound_at_the_path_qemu_is_given(tmp_path: Path) -> None:
    shared, root = tmp_path / "shared/cache/preload", tmp_path / "data"
    shared.mkdir(parents=True)
    root.mkdir()
    (root / "cache").symlink_to(tmp_path / "shared/cache")
    binds = plan_binds(root, [], [root / "cache/preload/lib.so"])
    assert binds == [Bind(root / "cache/preload", False, shared)]


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to the jail group needs root")
def test_a_fork_build_under_a_symlinked_templates_dir_is_made_readable_by_the_jail_group(tmp_path: Path) -> None:
    """A fork's build is made under 0700 directories; when data_root's ``templates`` is a symlink
    (a test server's), the real directories are outside data_root and were left 0700: the jailed
    child could not open its backing layer."""
    group = 3_000_000
    shared, root = tmp_path / "shared", tmp_path / "data"
    build = shared / "templates/.fork-x/b1"
    build.mkdir(parents=True)
    for d in (shared / "templates/.fork-x", build):
        os.chmod(d, 0o700)
    layer = build / "layer.qcow2"
    layer.write_bytes(b"")
    os.chmod(layer, 0o600)
    outside = tmp_path / "elsewhere/secret"
    outside.parent.mkdir()
    outside.write_bytes(b"")
    os.chmod(outside, 0o600)
    os.chmod(shared, 0o700)
    root.mkdir()
    (root / "templates").symlink_to(shared / "templates")
    roots = shared_roots(root)
    assert roots == [root.resolve(), (shared / "templates").resolve()]
    grant_read(layer, group, roots)
    for d in (build, shared / "templates/.fork-x"):
        st = d.stat()
        assert st.st_gid == group and st.st_mode & 0o777 == 0o710, (d, oct(st.st_mode))
    st = layer.stat()
    assert st.st_gid == group and st.st_mode & 0o777 == 0o640
    assert shared.stat().st_mode & 0o777 == 0o700  # above the symlink's target: not ours
    grant_read(outside, group, roots)
    assert outside.stat().st_mode & 0o777 == 0o600 and outside.stat().st_gid != group


def test_a_file_the_jail_cannot_reach_is_named_with_the_directory_in_the_way() -> None:
    import shutil
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's tmp_path is under a 0700 directory
    try:
        _check_unreadable_by(tmp_path)
    finally:
        shutil.rmtree(tmp_path)


def _check_unreadable_by(tmp_path: Path) -> None:
    hidden = tmp_path / "private"
    hidden.mkdir()
    f = hidden / "memory"
    f.write_bytes(b"")
    os.chmod(f, 0o444)
    os.chmod(tmp_path, 0o755)
    os.chmod(hidden, 0o700)
    why = unreadable_by(f, [os.getgid() + 12345])
    assert why.startswith(f"{hidden} (mode 700") and "pass through" in why
    os.chmod(hidden, 0o711)
    assert unreadable_by(f, [os.getgid() + 12345]) == ""
    os.chmod(f, 0o440)
    assert "cannot be read" in unreadable_by(f, [os.getgid() + 12345])
    assert unreadable_by(f, [f.stat().st_gid]) == ""


def spec(**kw: object) -> VmSpec:
    m = MachineSpec(vcpu=1, mem_mb=256, accelerator="tcg", kernel=Path("k"), initrd=Path("i"), cmdline="")
    return VmSpec(name="sb", workdir=Path("/d/sandboxes/sb/vm"), machine=m, memory_file=Path("/d/t/memory"),
                  memory_shared=False, root_disk=DiskSpec(Path("/d/sandboxes/sb/disk.qcow2"), "qcow2"), **kw)  # type: ignore[arg-type]


def test_a_jailed_qemu_gets_its_tap_as_fd_no_nsenter_and_the_sandbox_flags() -> None:
    s = spec(net_tap="tap0", netns="trenvx-3", guest_address="10.200.0.2")
    argv = qemu_argv(s, binary="qemu", incoming=True, qmp_fd=5, tap_fd=7, jail_args=["-sandbox", "on,spawn=deny"])
    assert argv[0] == "qemu" and "nsenter" not in argv
    assert "tap,id=net0,fd=7" in argv and argv[argv.index("-sandbox") + 1] == "on,spawn=deny"
    plain = qemu_argv(s, binary="qemu", incoming=True, qmp_fd=5)
    assert plain[0] == "nsenter" and "tap,id=net0,ifname=tap0,script=no,downscript=no" in plain


def test_policy_limits_add_the_overhead() -> None:
    p = JailPolicy(Path("/d"), 3_000_000, 100, 384, 512, 100, True, True)
    assert p.limits(256) == CgroupLimits(memory_bytes=640 << 20, pids_max=512, cpu_weight=100)
    assert p.group == 3_000_000
