"""The CLIs' tables in a pipe (issue 16 item 5): when stdout is not a terminal every value is whole,
one row per line, whatever the window's width, so `sandbox-cli sandbox ls -a | grep ID` finds the
sandbox by its full id; on a terminal tables still fit the window. ``--json`` keeps its shape.

Run with typer's CliRunner (stdout is not a terminal) in a 40-column environment (``COLUMNS=40``,
the console made under it), against the real server app over fake VMs, and against canned API
answers with ids and names far longer than the window."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from rich.console import Console
from rich.text import Text
from typer.testing import CliRunner

from trenvx.cli import admin, sandbox_cli, template_manager
from trenvx.cli.tables import Column, plain_lines, print_table
from trenvx.server.app import create_app

from .server_fakes import ThreadedServer, UpstreamState, fake_manager, make_config, make_template, upstream_app

WIDTH = 40
LONG_TEMPLATE = "a-template-whose-name-is-longer-than-the-forty-columns-of-this-terminal"
LONG_ID = "sbx" + "0123456789abcdefghij" * 5  # 103 characters
OTHER_ID = "sbx" + "jihgfedcba9876543210" * 5


@pytest.fixture
def narrow(monkeypatch) -> Console:
    """A 40-column environment, and sandbox-cli's console made in it (as at its import there)."""
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    console = Console(highlight=False, soft_wrap=True)
    assert console.width == WIDTH
    monkeypatch.setattr(sandbox_cli, "out", console)
    return console


def cli(*args: str, port: int = 1) -> tuple[int, str]:
    sandbox_cli._target = sandbox_cli.Target()  # the CLI keeps its options in a module global
    r = CliRunner().invoke(sandbox_cli.app, ["-p", str(port), "-i", "127.0.0.1", *args], env={"COLUMNS": str(WIDTH)})
    return r.exit_code, r.output


def grep(pattern: str, text: str) -> list[str]:
    """The lines grep(1) selects (fixed string), as a pipe would give them."""
    r = subprocess.run(["grep", "-F", "--", pattern], input=text, capture_output=True, text=True, timeout=10)
    assert r.returncode in (0, 1), r.stderr
    return r.stdout.splitlines()


def first_fields(text: str) -> list[str]:
    r = subprocess.run(["awk", "{print $1}"], input=text, capture_output=True, text=True, timeout=10, check=True)
    return r.stdout.splitlines()


# -- the layout ---------------------------------------------------------------------------------


def test_plain_lines_keep_every_value_whole_and_aligned() -> None:
    cols = [Column("ID", whole=True), Column("STATE"), Column("MEMORY", justify="right")]
    rows = [[LONG_ID, "exited (killed)", "1.0 MiB"], ["short", "", Text("12.5 MiB", "red")],
            ["evil", "two\nlines\x1b[31m", "[b]x"]]
    lines = plain_lines(cols, rows)
    pad = " " * len(LONG_ID)
    assert lines == [  # STATE 15 wide, MEMORY 8 wide and right-aligned, 3 spaces between
        "ID" + pad[2:] + "   STATE" + " " * 10 + "   " + "  MEMORY",
        LONG_ID + "   exited (killed)" + "   " + " 1.0 MiB",
        "short" + pad[5:] + "   -" + " " * 14 + "   " + "12.5 MiB",
        "evil" + pad[4:] + "   two lines [31m" + " " + "   " + "    [b]x",  # no newline, escape or markup
    ]
    with pytest.raises(ValueError, match="a row of 1 values in a table of 3 columns"):
        plain_lines(cols, [["x"]])


def test_print_table_fits_a_terminal_and_is_whole_in_a_pipe() -> None:
    cols = [Column("ID", whole=True), Column("TEMPLATE")]
    rows = [["i" * 20, LONG_TEMPLATE]]
    tty = io.StringIO()
    print_table(Console(file=tty, width=WIDTH), cols, rows, terminal=True)
    assert "i" * 20 in tty.getvalue() and LONG_TEMPLATE not in tty.getvalue(), "a terminal's table fits its window"
    assert all(len(line) <= WIDTH for line in tty.getvalue().splitlines())
    piped = io.StringIO()
    print_table(Console(file=piped, width=WIDTH), cols, rows)  # a StringIO is no terminal
    assert piped.getvalue() == f"ID{' ' * 18}   TEMPLATE\n{'i' * 20}   {LONG_TEMPLATE}\n"


# -- sandbox-cli against the real server app ------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path):
    make_template(tmp_path, LONG_TEMPLATE)
    cfg = make_config(tmp_path)
    with ThreadedServer(upstream_app(UpstreamState())) as upstream:
        m = fake_manager(cfg, upstream.port)
        with ThreadedServer(create_app(cfg, manager=m), lifespan="on") as srv:
            yield srv


def test_ls_a_piped_to_grep_finds_each_sandbox_on_one_whole_line(server, narrow) -> None:
    ids = []
    for _ in range(3):
        code, out = cli("sandbox", "create", "-t", LONG_TEMPLATE, port=server.port)
        assert code == 0, out
        ids.append(out.strip())
    code, out = cli("sandbox", "kill", ids[0], port=server.port)
    assert code == 0, out

    code, out = cli("sandbox", "ls", port=server.port)
    assert code == 0, out
    assert "…" not in out and len(out.splitlines()[1]) > WIDTH, out
    assert sorted(first_fields(out)[1:]) == sorted(ids[1:]), out
    code, out = cli("sandbox", "ls", "-a", port=server.port)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "TEMPLATE", "STATE", "AGE", "TIMEOUT", "LEFT", "MEMORY"]
    assert len(lines) == 4, "a header and one line per sandbox: " + out
    for sid in ids:
        [line] = grep(sid, out)
        assert line.split()[:2] == [sid, LONG_TEMPLATE], line
    [killed] = grep(ids[0], out)
    assert "exited (killed)" in killed
    assert sorted(first_fields(out)[1:]) == sorted(ids)

    code, out = cli("--json", "sandbox", "ls", "-a", port=server.port)
    items = json.loads(out)
    assert code == 0 and sorted(s["sandboxID"] for s in items) == sorted(ids)
    assert {s["state"] for s in items} == {"running", "exited"} and all(s["templateID"] == LONG_TEMPLATE for s in items)


# -- every table, with canned answers of very long values --------------------------------------------


def _canned(request: httpx.Request) -> httpx.Response:
    path = request.url.path
    if path == "/v2/sandboxes":
        return httpx.Response(200, json=[
            {"sandboxID": LONG_ID, "templateID": LONG_TEMPLATE, "state": "running",
             "startedAt": "2025-01-01T00:00:00Z", "trenvx": {"timeoutLeft": 250.0, "pssBytes": 50 << 20}},
            {"sandboxID": OTHER_ID, "templateID": "t", "state": "exited", "startedAt": "2025-01-01T00:00:00Z",
             "trenvx": {"endReason": "timeout", "timeoutLeft": 0.0}},
        ])
    if path == "/templates":
        return httpx.Response(200, json=[{"templateID": LONG_TEMPLATE, "buildID": LONG_ID, "cpuCount": 2,
                                          "memoryMB": 4096, "isDefault": True, "spawnCount": 7,
                                          "trenvx": {"vmmType": "qemu", "accelerator": "tcg"}}])
    if path == "/snapshots":
        return httpx.Response(200, json=[{"snapshotID": LONG_ID, "names": [LONG_TEMPLATE, "second-name"]}])
    if path == f"/sandboxes/{LONG_ID}/metrics":
        return httpx.Response(200, json=[{"timestampUnix": 1735689600, "cpuCount": 2, "cpuUsedPct": 7.0,
                                          "memUsed": 50 << 20, "memTotal": 256 << 20, "memCache": 1 << 20,
                                          "diskUsed": 200 << 20, "diskTotal": 1 << 30}])
    if path == f"/sandboxes/{LONG_ID}":
        return httpx.Response(200, json={
            "sandboxID": LONG_ID, "templateID": LONG_TEMPLATE, "state": "running", "startedAt": "2025-01-01T00:00:00Z",
            "cpuCount": 2, "memoryMB": 4096, "diskSizeMB": 1024, "metadata": {"owner": "x" * 80},
            "network": {"allowOut": [f"host{i}.example.com" for i in range(8)], "denyOut": ["0.0.0.0/0"]},
            "trenvx": {"timeoutLeft": 100.0, "vmm": "qemu", "accelerator": "tcg", "pid": 42},
        })
    return httpx.Response(404, json={"message": f"no {path}"})


@pytest.fixture
def canned(monkeypatch, narrow):
    real = httpx.Client

    def client(**kw: Any) -> httpx.Client:
        return real(transport=httpx.MockTransport(_canned), **kw)

    monkeypatch.setattr(httpx, "Client", client)


@pytest.mark.parametrize("args, whole", [
    (("sandbox", "ls", "-a"), [LONG_ID, OTHER_ID, LONG_TEMPLATE, "exited (timeout)"]),
    (("template", "ls"), [LONG_TEMPLATE + " (default)", LONG_ID, "qemu/tcg"]),
    (("snapshot", "ls"), [LONG_ID, f"{LONG_TEMPLATE}, second-name"]),
    (("sandbox", "metrics", LONG_ID), ["50.0 MiB / 256.0 MiB", "200.0 MiB / 1024.0 MiB"]),
    (("sandbox", "info", LONG_ID), [LONG_ID, "owner=" + "x" * 80, ", ".join(f"host{i}.example.com" for i in range(8))]),
    (("sandbox", "network", LONG_ID), [", ".join(f"host{i}.example.com" for i in range(8))]),
])
def test_every_table_is_whole_in_a_pipe(canned, narrow, args, whole) -> None:
    code, out = cli(*args)
    assert code == 0, out
    assert "…" not in out, out
    for value in whole:
        assert len(grep(value, out)) == 1, (value, out)
    lines = out.splitlines()
    assert max(len(line) for line in lines) > WIDTH and all(line == line.rstrip() for line in lines)
    if args[-1] == "-a" or args[0] == "template":
        assert len(lines) == 1 + len(json.loads(cli("--json", *args)[1])), "one row per line"
    # the same table on a terminal of this width would have been cut (what stdout in a pipe got before)
    tty = io.StringIO()
    print_table(Console(file=tty, width=narrow.width), [Column(), Column()], [[LONG_ID, LONG_TEMPLATE]],
                show_header=False, terminal=True)
    assert LONG_TEMPLATE not in tty.getvalue()


def test_json_keeps_its_shape(canned) -> None:
    code, out = cli("--json", "sandbox", "ls", "-a")
    assert code == 0 and json.loads(out) == _canned(httpx.Request("GET", "http://x/v2/sandboxes")).json()
    code, out = cli("--json", "template", "ls")
    assert code == 0 and json.loads(out)[0]["buildID"] == LONG_ID


# -- template-manager and trenvx doctor ---------------------------------------------------------------


def test_template_manager_summary_is_whole_in_a_pipe() -> None:
    manifest = SimpleNamespace(
        name=LONG_TEMPLATE, build_id=LONG_ID, vmm_type="qemu", machine=SimpleNamespace(accelerator="tcg"),
        kernel_version="6.1.0-28-cloud-amd64", rootfs_source="dockerfile " + "/very/long/path" * 6,
        sizes={"rootfs_bytes": 512 << 20, "memory_bytes": 256 << 20, "vmstate_bytes": 300 << 10},
        stage_seconds={"rootfs": 10.0, "boot": 2.0, "snapshot": 1.0},
    )
    result = SimpleNamespace(skipped=False, build=SimpleNamespace(manifest=manifest, path=Path("/d") / LONG_ID))
    buf = io.StringIO()
    template_manager.print_summary(result, Console(file=buf, width=WIDTH))  # type: ignore[arg-type]
    lines = buf.getvalue().splitlines()
    assert lines[0] == f"template {LONG_TEMPLATE} (built)"
    assert grep(LONG_ID, buf.getvalue())[0].split() == ["build", LONG_ID]
    assert "/very/long/path" * 6 in buf.getvalue() and "…" not in buf.getvalue() and len(lines) == 8


def test_doctor_is_whole_in_a_pipe(monkeypatch, tmp_path: Path) -> None:
    detail = "not on PATH: run scripts/start.sh setup, " + "then look again " * 5
    monkeypatch.setattr(admin, "_load", lambda path: None)
    monkeypatch.setattr(admin, "_checks", lambda cfg: [("qemu", True, "/usr/bin/qemu-system-x86_64"),
                                                      ("kvm", None, detail), ("kernel", False, "none")])
    r = CliRunner().invoke(admin.app, ["doctor"], env={"COLUMNS": str(WIDTH)})
    assert r.exit_code == 1, r.output
    assert r.output.splitlines() == [
        "ok     qemu     /usr/bin/qemu-system-x86_64",
        f"warn   kvm      {detail.rstrip()}",
        "FAIL   kernel   none",
    ]
