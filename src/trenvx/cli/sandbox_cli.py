"""sandbox-cli: drive a trenvx backend from the shell.

    sandbox-cli sandbox create -t NAME            prints the new sandbox's id
        [--no-internet] [--allow-out X]... [--deny-out Y]... [--dns-server IP]... [--no-public-traffic]
    sandbox-cli sandbox network ID                shows its egress rules
    sandbox-cli sandbox network ID [--no-internet] [--allow-out X]... [--deny-out Y]... | --clear
                                                  replaces them (what is not given is cleared)
    sandbox-cli sandbox ls [-a]                   id, template, state, age, timeout left, memory
                                                  (-a: also ended ones: by default those of the
                                                  last hour, at most 500)
    sandbox-cli sandbox kill ID... | kill -a
    sandbox-cli sandbox exec ID -- CMD...         streams output, exits with the command's code
    sandbox-cli sandbox run-code ID CODE [--language L] [--context ID] [--timeout S] [--out-dir DIR]
                                                  runs code in its code interpreter (template
                                                  code-interpreter): output streamed, images saved
    sandbox-cli sandbox shell ID                  interactive shell in the sandbox (PTY)
    sandbox-cli sandbox ssh ID [-L SPEC]... [-- CMD...]   OpenSSH into it (scp and ssh -L: see ssh-config)
    sandbox-cli ssh-config [--write]              ssh client config: `ssh root@<sandbox-id>` on this machine
    sandbox-cli sandbox info ID | timeout ID SECONDS  (info: its settings and network rules)
    sandbox-cli sandbox pause ID [--filesystem] [--strict]   pause to disk (its VM ends, its timeout stops)
    sandbox-cli sandbox resume ID [--timeout S] [--reboot]   resume it (same id, files, processes)
    sandbox-cli sandbox metrics ID [--since SECONDS]  CPU, memory and disk samples (every 5 s)
    sandbox-cli sandbox fork ID [--count N] [--timeout S]   N copies of a running sandbox (it runs on)
    sandbox-cli snapshot create ID [--name N]     snapshot a running sandbox; prints the snapshot's id
    sandbox-cli snapshot ls [--sandbox ID] | snapshot rm SNAPSHOT...
    sandbox-cli template ls

Every command takes --ip/-i and --port/-p (the backend, default 127.0.0.1:5000; also
TRENVX_IP, TRENVX_PORT), --api-key (TRENVX_API_KEY) and --json (machine-readable output).
Errors go to stderr with a non-zero exit code. Tables fit a terminal; piped (stdout not a
terminal) every value is whole, one row per line (see :mod:`trenvx.cli.tables`), so
`sandbox-cli sandbox ls -a | grep ID` finds a sandbox by its full id.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Optional

import httpx
import typer
from rich.console import Console
from rich.markup import escape

from ..config import AGENT_PORT
from ..guest.client import AgentClient, AgentError
from .tables import Column, print_table

DEFAULT_IP = "127.0.0.1"
DEFAULT_PORT = 5000

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Drive a trenvx backend: create, list and kill sandboxes; run commands and shells in them. "
         "Options --ip/-i, --port/-p (default 127.0.0.1:5000; env TRENVX_IP, TRENVX_PORT), --api-key "
         "(env TRENVX_API_KEY) and --json go before or after the subcommand.",
)
sandbox_app = typer.Typer(help="Create, list, kill and use sandboxes.", no_args_is_help=True)
template_app = typer.Typer(help="Templates built on the backend.", no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(sandbox_app, name="sb", hidden=True)
app.add_typer(template_app, name="template")
snapshot_app = typer.Typer(help="Snapshots of running sandboxes: create, list, delete.", no_args_is_help=True)
app.add_typer(snapshot_app, name="snapshot")


@dataclass
class Target:
    ip: str = os.environ.get("TRENVX_IP", DEFAULT_IP)
    port: int = int(os.environ.get("TRENVX_PORT", DEFAULT_PORT) or DEFAULT_PORT)
    api_key: str | None = os.environ.get("TRENVX_API_KEY") or None
    as_json: bool = False

    @property
    def url(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"http://{host}:{self.port}"


_target = Target()

IpOpt = typer.Option(None, "--ip", "-i", help="backend address (default 127.0.0.1, env TRENVX_IP)")
PortOpt = typer.Option(None, "--port", "-p", help="backend port (default 5000, env TRENVX_PORT)")
KeyOpt = typer.Option(None, "--api-key", help="API key (env TRENVX_API_KEY)")
JsonOpt = typer.Option(None, "--json", help="machine-readable JSON output")


def _merge(ip: str | None, port: int | None, api_key: str | None, as_json: bool | None) -> Target:
    if ip:
        _target.ip = ip
    if port:
        _target.port = port
    if api_key:
        _target.api_key = api_key
    if as_json:
        _target.as_json = True
    return _target


@app.callback()
def _root(ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt, api_key: Optional[str] = KeyOpt,
          as_json: Optional[bool] = JsonOpt) -> None:
    _merge(ip, port, api_key, as_json)


@sandbox_app.callback()
def _sandbox_group(ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt, api_key: Optional[str] = KeyOpt,
                   as_json: Optional[bool] = JsonOpt) -> None:
    _merge(ip, port, api_key, as_json)


@snapshot_app.callback()
def _snapshot_group(ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt, api_key: Optional[str] = KeyOpt,
                    as_json: Optional[bool] = JsonOpt) -> None:
    _merge(ip, port, api_key, as_json)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/] {escape(message)}", markup=True)
    raise typer.Exit(code)


# -- the API -----------------------------------------------------------------------------


class Api:
    def __init__(self, t: Target) -> None:
        headers = {"X-API-Key": t.api_key} if t.api_key else {}
        self.t = t
        self.http = httpx.Client(base_url=t.url, headers=headers, timeout=httpx.Timeout(120.0, connect=5.0))

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.ConnectError:
            fail(f"cannot reach the trenvx backend at {self.t.url}; start it with `scripts/start.sh run` "
                 "or pass --ip/--port")
        except httpx.HTTPError as e:
            fail(f"request to {self.t.url}{path} failed: {e}")
        if r.status_code >= 400:
            try:
                msg = r.json().get("message") or r.text
            except ValueError:
                msg = r.text
            fail(f"{msg} (HTTP {r.status_code})")
        return r


def _fmt_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def _fmt_bytes(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 2**20:.1f} MiB"


def _parse_pairs(items: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            fail(f"{what} {item!r}: expected KEY=VALUE", 2)
        out[k] = v
    return out


def _ts(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# -- sandbox commands ----------------------------------------------------------------------


NoInternetOpt = typer.Option(False, "--no-internet", help="no egress at all, except what --allow-out names "
                             "(E2B's allow_internet_access=false: denyOut 0.0.0.0/0)")
AllowOutOpt = typer.Option([], "--allow-out", help="IP, CIDR or domain (example.com, *.example.com) the sandbox may "
                           "reach, even if denied (repeatable)")
DenyOutOpt = typer.Option([], "--deny-out", help="IP or CIDR the sandbox may not reach, e.g. 0.0.0.0/0 (repeatable)")
DnsServerOpt = typer.Option([], "--dns-server", help="resolver IP opened when --allow-out names a domain "
                            "(repeatable; default 8.8.8.8)")


def _egress_fields(allow_out: list[str], deny_out: list[str], dns: list[str]) -> dict[str, Any]:
    """E2B's egress fields for the options given (``allow_internet_access`` is added by the caller)."""
    out: dict[str, Any] = {}
    if allow_out:
        out["allowOut"] = list(allow_out)
    if deny_out:
        out["denyOut"] = list(deny_out)
    if dns:
        out["dnsServers"] = list(dns)
    return out


ON_TIMEOUT: dict[str, dict[str, bool]] = {
    "kill": {},
    "pause": {"autoPause": True},
    "pause-filesystem": {"autoPause": True, "autoPauseMemory": False},
}
"""``--on-timeout`` as E2B's create fields (its SDK's ``lifecycle={"on_timeout": ...}``)."""


@sandbox_app.command("create")
def create(
    template: Optional[str] = typer.Option(None, "--template", "-t", help="template name (default: the server's)"),
    timeout: Optional[int] = typer.Option(None, "--timeout", help="seconds until the sandbox is killed"),
    metadata: list[str] = typer.Option([], "--metadata", "-m", help="KEY=VALUE label (repeatable)"),
    env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE environment variable (repeatable)"),
    no_internet: bool = NoInternetOpt,
    allow_out: list[str] = AllowOutOpt,
    deny_out: list[str] = DenyOutOpt,
    dns_server: list[str] = DnsServerOpt,
    no_public_traffic: bool = typer.Option(False, "--no-public-traffic", help="its ports answer only requests "
                                           "carrying its traffic access token (header e2b-traffic-access-token)"),
    on_timeout: str = typer.Option("kill", "--on-timeout", help="what its timeout does: kill, pause (to disk, "
                                   "with its memory and processes) or pause-filesystem (only its files are kept)"),
    auto_resume: bool = typer.Option(False, "--auto-resume", help="traffic to its ports through the backend "
                                     "resumes it when paused"),
    ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt, api_key: Optional[str] = KeyOpt,
    as_json: Optional[bool] = JsonOpt,
) -> None:
    """Create a sandbox and print its id (egress: open unless --no-internet / --deny-out say otherwise)."""
    if on_timeout not in ON_TIMEOUT:
        raise typer.BadParameter(f"{on_timeout!r}: use one of {', '.join(ON_TIMEOUT)}", param_hint="--on-timeout")
    t = _merge(ip, port, api_key, as_json)
    body: dict[str, Any] = {"templateID": template or "base"}
    if timeout is not None:
        body["timeout"] = timeout
    if metadata:
        body["metadata"] = _parse_pairs(metadata, "--metadata")
    if env:
        body["envVars"] = _parse_pairs(env, "--env")
    if no_internet:
        body["allow_internet_access"] = False
    network = _egress_fields(allow_out, deny_out, dns_server)
    if no_public_traffic:
        network["allowPublicTraffic"] = False
    if network:
        body["network"] = network
    body.update(ON_TIMEOUT[on_timeout])
    if auto_resume:
        body["autoResume"] = {"enabled": True}
    r = Api(t).call("POST", "/sandboxes", json=body)
    data = r.json()
    if t.as_json:
        print(json.dumps(data, indent=2))
    else:
        print(data["sandboxID"])
        times = data.get("startTimes") or {}
        if times and sys.stderr.isatty():
            err.print(f"[dim]started in {sum(times.values()):.1f} ms: "
                      + ", ".join(f"{k} {v:.1f}" for k, v in times.items()) + "[/]")
        if data.get("trafficAccessToken") and sys.stderr.isatty():
            err.print(f"traffic access token (send as e2b-traffic-access-token): {data['trafficAccessToken']}")


def _list(api: Api, all_: bool) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"memory": "true", "limit": 1000}
    if all_:
        params["state"] = "running,paused,exited"
    items: list[dict[str, Any]] = []
    while True:
        r = api.call("GET", "/v2/sandboxes", params=params)
        items.extend(r.json())
        token = r.headers.get("x-next-token")
        if not token:
            return items
        params["nextToken"] = token


@sandbox_app.command("ls")
def ls(
    all_: bool = typer.Option(False, "--all", "-a", help="also sandboxes that ended recently (the server keeps "
                              "them [orchestrator] ended_retention_s, default an hour, at most "
                              "ended_retention_max, default 500)"),
    ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt, api_key: Optional[str] = KeyOpt,
    as_json: Optional[bool] = JsonOpt,
) -> None:
    """List sandboxes: id, template, state, age, timeout left, memory (PSS of the VM). Piped, every
    value is whole, one sandbox per line (`sandbox ls -a | grep ID`)."""
    t = _merge(ip, port, api_key, as_json)
    items = _list(Api(t), all_)
    if t.as_json:
        print(json.dumps(items, indent=2))
        return
    rows: list[list[str]] = []
    now = time.time()
    for s in items:
        x = s.get("trenvx") or {}
        state = s["state"]
        if state == "exited" and x.get("endReason"):
            state = f"exited ({x['endReason'].split(':', 1)[0]})"
        left = x.get("timeoutLeft")
        pause = x.get("pause") or {}
        if pause:
            state = f"paused ({pause.get('kind', '?')})"
        rows.append([
            s["sandboxID"], s["templateID"], state, _fmt_age(now - _ts(s["startedAt"])),
            _fmt_age(left) if left and s["state"] in ("running", "paused") else "-",
            f"{_fmt_bytes(pause.get('storedBytes'))} stored" if pause else _fmt_bytes(x.get("pssBytes") or x.get("rssBytes")),
        ])
    columns = [Column("ID", whole=True), Column("TEMPLATE"), Column("STATE"), Column("AGE"), Column("TIMEOUT LEFT"),
               Column("MEMORY")]
    print_table(out, columns, rows)
    if not items:
        err.print("[dim]no sandboxes[/]")


@sandbox_app.command("kill")
def kill(
    ids: list[str] = typer.Argument(None, help="sandbox ids"),
    all_: bool = typer.Option(False, "--all", "-a", help="kill every running sandbox"),
    ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt, api_key: Optional[str] = KeyOpt,
    as_json: Optional[bool] = JsonOpt,
) -> None:
    """Kill sandboxes (their VMs and files)."""
    t = _merge(ip, port, api_key, as_json)
    api = Api(t)
    if all_:
        ids = [s["sandboxID"] for s in _list(api, False)]
    elif not ids:
        fail("name the sandboxes to kill, or pass --all", 2)
    killed, failed = [], []
    for sid in ids:
        try:
            r = api.http.delete(f"/sandboxes/{sid}")
        except httpx.HTTPError as e:
            fail(f"cannot reach the trenvx backend at {t.url}: {e}")
        if r.status_code == 204:
            killed.append(sid)
            if not t.as_json:
                print(sid)
        else:
            try:
                msg = r.json().get("message", r.text)
            except ValueError:
                msg = r.text
            failed.append({"sandboxID": sid, "message": msg})
            err.print(f"[red]error:[/] {escape(str(msg))}", markup=True)
    if t.as_json:
        print(json.dumps({"killed": killed, "failed": failed}, indent=2))
    if failed:
        raise typer.Exit(1)


@sandbox_app.command("reclaim")
def reclaim(sandbox_id: str, ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt,
            api_key: Optional[str] = KeyOpt, as_json: Optional[bool] = JsonOpt) -> None:
    """Give back the memory a sandbox's guest holds in caches (it keeps running)."""
    t = _merge(ip, port, api_key, as_json)
    r = Api(t).call("POST", f"/sandboxes/{sandbox_id}/reclaim").json()
    if t.as_json:
        print(json.dumps(r, indent=2))
        return
    print(f"{sandbox_id}: {_fmt_bytes(r['pssBeforeBytes'])} -> {_fmt_bytes(r['pssAfterBytes'])} "
          f"({_fmt_bytes(r['freedBytes'])} given back in {r['seconds']:.1f} s)")


def _network_rows(d: dict[str, Any]) -> list[tuple[str, str]]:
    """The network settings of a ``GET /sandboxes/{id}`` answer, as (label, value) rows."""
    net = d.get("network") or {}
    allow, deny = net.get("allowOut") or [], net.get("denyOut") or []
    if "0.0.0.0/0" in deny and not allow:
        summary = "no egress (internet access off)"
    elif "0.0.0.0/0" in deny:
        summary = "only what allow-out names"
    elif deny:
        summary = "open, except what deny-out names"
    else:
        summary = "open (no rules)"
    rows = [("egress", summary), ("allow-out", ", ".join(allow) or "-"), ("deny-out", ", ".join(deny) or "-")]
    if net.get("dnsServers") is not None:
        rows.append(("dns servers", ", ".join(net["dnsServers"]) or "none"))
    if d.get("allowInternetAccess") is not None:
        rows.append(("internet access", "on" if d["allowInternetAccess"] else "off"))
    public = net.get("allowPublicTraffic", True)
    rows.append(("public traffic", "yes" if public else "no: requests need the traffic access token"))
    if net.get("maskRequestHost"):
        rows.append(("mask request host", net["maskRequestHost"]))
    return rows


def _print_rows(rows: list[tuple[str, str]]) -> None:
    print_table(out, [Column(style="bold"), Column(wrap=True)], rows, show_header=False)


@sandbox_app.command("info")
def info(sandbox_id: str, ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt,
         api_key: Optional[str] = KeyOpt, as_json: Optional[bool] = JsonOpt) -> None:
    """One sandbox: template, state, times, resources and its network rules (--json: everything)."""
    t = _merge(ip, port, api_key, as_json)
    d = Api(t).call("GET", f"/sandboxes/{sandbox_id}").json()
    if t.as_json:
        print(json.dumps(d, indent=2))
        return
    x = d.get("trenvx") or {}
    left = x.get("timeoutLeft")
    rows = [
        ("id", d["sandboxID"]), ("template", d["templateID"] + (f" (build {x['buildID']})" if x.get("buildID") else "")),
        ("state", d["state"]), ("age", _fmt_age(time.time() - _ts(d["startedAt"]))),
        ("timeout left", _fmt_age(left) if left else "-"),
        ("resources", f"{d['cpuCount']} vCPU, {d['memoryMB']} MiB RAM, {d['diskSizeMB']} MiB disk"),
        ("memory used", _fmt_bytes(x.get("pssBytes") or x.get("rssBytes"))),
        ("vmm", f"{x.get('vmm', '?')}/{x.get('accelerator', '?')}" + (f", pid {x['pid']}" if x.get("pid") else "")),
    ]
    pause = x.get("pause") or {}
    if pause:
        rows.append(("paused", f"{pause['kind']} since {pause['pausedAt']}, {_fmt_bytes(pause['storedBytes'])} stored "
                               f"({pause['ramPages']} pages of RAM), paused in {pause['pauseSeconds']:.1f} s"))
    lc = d.get("lifecycle") or {}
    if lc:
        on_timeout = lc.get("onTimeout", "kill")
        if on_timeout == "pause" and lc.get("autoPauseMemory") is False:
            on_timeout = "pause (filesystem only)"
        rows.append(("on timeout", on_timeout + (", traffic resumes it" if lc.get("autoResume") else "")))
    if d.get("envdUnresponsiveAtPause"):
        rows.append(("resumes", "only with --reboot: its agent did not answer when it was paused"))
    if d.get("metadata"):
        rows.append(("metadata", ", ".join(f"{k}={v}" for k, v in d["metadata"].items())))
    _print_rows(rows + _network_rows(d))


@sandbox_app.command("network")
def network(
    sandbox_id: str,
    no_internet: bool = NoInternetOpt,
    allow_out: list[str] = AllowOutOpt,
    deny_out: list[str] = DenyOutOpt,
    dns_server: list[str] = DnsServerOpt,
    clear: bool = typer.Option(False, "--clear", help="remove every rule: egress open again"),
    ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt, api_key: Optional[str] = KeyOpt,
    as_json: Optional[bool] = JsonOpt,
) -> None:
    """Show a sandbox's egress rules, or replace them: the options given become the whole rule set
    (E2B's PUT /network: what is not given is cleared; --clear alone opens everything)."""
    t = _merge(ip, port, api_key, as_json)
    api = Api(t)
    given = no_internet or allow_out or deny_out or dns_server
    if clear and given:
        fail("--clear removes every rule; give it alone, or give the new rules without it", 2)
    if given or clear:
        body = _egress_fields(allow_out, deny_out, dns_server)
        if no_internet:
            body["allow_internet_access"] = False
        api.call("PUT", f"/sandboxes/{sandbox_id}/network", json=body)
    d = api.call("GET", f"/sandboxes/{sandbox_id}").json()
    if t.as_json:
        print(json.dumps({"sandboxID": sandbox_id, "allowInternetAccess": d.get("allowInternetAccess"),
                          "network": d.get("network") or {}}, indent=2))
        return
    _print_rows(_network_rows(d))


@sandbox_app.command("metrics")
def metrics(
    sandbox_id: str,
    since: Optional[int] = typer.Option(None, "--since", min=1, help="only the last SECONDS (default: all kept, "
                                                                      "up to 30 minutes)"),
    ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt, api_key: Optional[str] = KeyOpt,
    as_json: Optional[bool] = JsonOpt,
) -> None:
    """A sandbox's CPU, memory and disk use over time, oldest first (E2B's metrics; a sample every 5 s)."""
    t = _merge(ip, port, api_key, as_json)
    params = {"start": int(time.time()) - since} if since else {}
    samples = Api(t).call("GET", f"/sandboxes/{sandbox_id}/metrics", params=params).json()
    if t.as_json:
        print(json.dumps(samples, indent=2))
        return
    rows = [[time.strftime("%H:%M:%S", time.localtime(m["timestampUnix"])),
             f"{m['cpuUsedPct']:.1f}% of {m['cpuCount']}", f"{_fmt_bytes(m['memUsed'])} / {_fmt_bytes(m['memTotal'])}",
             _fmt_bytes(m["memCache"]), f"{_fmt_bytes(m['diskUsed'])} / {_fmt_bytes(m['diskTotal'])}"] for m in samples]
    columns = [Column("TIME")] + [Column(h, justify="right") for h in ("CPU", "MEMORY", "CACHE", "DISK")]
    print_table(out, columns, rows)
    if not samples:
        err.print("[dim]no samples yet (the sandbox is paused, or its agent has not answered)[/]")


@sandbox_app.command("timeout")
def set_timeout(sandbox_id: str, seconds: int, ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt,
                api_key: Optional[str] = KeyOpt) -> None:
    """The sandbox is killed SECONDS from now."""
    t = _merge(ip, port, api_key, None)
    Api(t).call("POST", f"/sandboxes/{sandbox_id}/timeout", json={"timeout": seconds})


PAUSE_RESUME_TIMEOUT_S = 600.0
"""A resume that boots the sandbox from its disk takes minutes under software emulation."""


@sandbox_app.command("pause")
def pause(
    sandbox_id: str,
    filesystem: bool = typer.Option(False, "--filesystem", help="keep only its files (a resume boots it; its "
                                                                "processes are gone)"),
    strict: bool = typer.Option(False, "--strict", help="refuse when its agent does not answer (else it is "
                                                        "paused anyway, and resumes only with --reboot)"),
    ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt, api_key: Optional[str] = KeyOpt,
    as_json: Optional[bool] = JsonOpt,
) -> None:
    """Pause a sandbox to disk: its state is stored, its VM ends, its timeout stops. Resume it with
    `sandbox resume ID`."""
    t = _merge(ip, port, api_key, as_json)
    api = Api(t)
    body: dict[str, Any] = {"memory": not filesystem}
    if strict:
        body["requireHealthyGuest"] = True
    t0 = time.monotonic()
    api.call("POST", f"/sandboxes/{sandbox_id}/pause", json=body, timeout=PAUSE_RESUME_TIMEOUT_S)
    seconds = time.monotonic() - t0
    p = ((api.call("GET", f"/sandboxes/{sandbox_id}").json().get("trenvx") or {}).get("pause") or {})
    if t.as_json:
        print(json.dumps({"sandboxID": sandbox_id, "pause": p}, indent=2))
        return
    print(f"{sandbox_id} paused ({p.get('kind', 'memory' if not filesystem else 'filesystem')}) in {seconds:.1f} s, "
          f"{_fmt_bytes(p.get('storedBytes'))} stored")


@sandbox_app.command("resume")
def resume(
    sandbox_id: str,
    timeout: Optional[int] = typer.Option(None, "--timeout", "-t", help="live at least this many more seconds"),
    reboot: bool = typer.Option(False, "--reboot", help="boot it from its disk instead of resuming its memory"),
    ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt, api_key: Optional[str] = KeyOpt,
    as_json: Optional[bool] = JsonOpt,
) -> None:
    """Resume a paused sandbox (same id, files, tokens; with its memory, its processes go on). A
    running sandbox only gets its timeout extended."""
    t = _merge(ip, port, api_key, as_json)
    body: dict[str, Any] = {}
    if timeout is not None:
        body["timeout"] = timeout
    if reboot:
        body["memory"] = False
    t0 = time.monotonic()
    r = Api(t).call("POST", f"/sandboxes/{sandbox_id}/connect", json=body, timeout=PAUSE_RESUME_TIMEOUT_S)
    seconds = time.monotonic() - t0
    if t.as_json:
        print(json.dumps({**r.json(), "resumed": r.status_code == 201}, indent=2))
        return
    if r.status_code == 201:
        how = "booted from its disk" if reboot else "its memory restored"
        print(f"{sandbox_id} resumed in {seconds:.1f} s ({how})")
    else:
        print(f"{sandbox_id} was running")


@sandbox_app.command("fork")
def fork(
    sandbox_id: str,
    count: int = typer.Option(1, "--count", "-n", help="children to start (1-100)"),
    timeout: Optional[int] = typer.Option(None, "--timeout", "-t", help="children's lifetime in seconds "
                                                                        "(default: the server's)"),
    ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt, api_key: Optional[str] = KeyOpt,
    as_json: Optional[bool] = JsonOpt,
) -> None:
    """Fork a running sandbox: it is snapshotted once (it runs on, same id and timeout) and COUNT
    sandboxes start from the snapshot with its files, memory and processes, each its own identity.
    Prints one line per child: its id, or why it did not start (exit code 1 if any did not)."""
    t = _merge(ip, port, api_key, as_json)
    body: dict[str, Any] = {"count": count}
    if timeout is not None:
        body["timeout"] = timeout
    t0 = time.monotonic()
    results = Api(t).call("POST", f"/sandboxes/{sandbox_id}/fork", json=body, timeout=PAUSE_RESUME_TIMEOUT_S).json()
    seconds = time.monotonic() - t0
    failed = [r for r in results if not r.get("sandbox")]
    if t.as_json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if r.get("sandbox"):
                print(r["sandbox"]["sandboxID"])
            else:
                e = r.get("error") or {}
                err.print(f"[red]child failed:[/] {escape(str(e.get('message')))} (HTTP {e.get('code')})", markup=True)
        err.print(f"{len(results) - len(failed)} of {len(results)} children of {sandbox_id} started in {seconds:.1f} s")
    if failed:
        raise typer.Exit(1)


def _connect(t: Target, sandbox_id: str, user: str = "root") -> AgentClient:
    """The sandbox's agent, reached through the server's proxy."""
    detail = Api(t).call("GET", f"/sandboxes/{sandbox_id}").json()
    proxy = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(AGENT_PORT)}
    return AgentClient(t.url, access_token=detail.get("envdAccessToken"), user=user, headers=proxy)


def _exit_code(code: int) -> int:
    return code if 0 <= code <= 255 else 1


@sandbox_app.command("exec", context_settings={"allow_interspersed_args": False})
def exec_(
    sandbox_id: str = typer.Argument(..., help="sandbox id"),
    cmd: list[str] = typer.Argument(..., help="the command and its arguments (after --)"),
    cwd: Optional[str] = typer.Option(None, "--cwd", "-w", help="working directory in the sandbox"),
    env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE (repeatable)"),
    user: str = typer.Option("root", "--user", "-u", help="user to run as"),
    ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt, api_key: Optional[str] = KeyOpt,
) -> None:
    """Run a command in the sandbox; stream its output; exit with its exit code.

    A single argument containing spaces is run by /bin/sh -c (so `exec ID -- "ls | wc -l"` works).
    """
    t = _merge(ip, port, api_key, None)
    envs = _parse_pairs(env, "--env")
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        fail("give the command to run after --, e.g. sandbox exec ID -- python3 -V", 2)
    if len(cmd) == 1 and any(c in cmd[0] for c in " \t|&;<>()$`\\\"'*?"):
        argv = ["-c", cmd[0]]
    else:
        argv = ["-c", 'exec "$@"', "sh", *cmd]
    forward_stdin = not sys.stdin.isatty()
    code = asyncio.run(_exec(t, sandbox_id, argv, envs, cwd, user, forward_stdin))
    raise typer.Exit(code)


async def _exec(t: Target, sandbox_id: str, argv: list[str], envs: dict[str, str], cwd: str | None, user: str,
                forward_stdin: bool) -> int:
    client = _connect(t, sandbox_id, user)
    stdin_task: asyncio.Task[None] | None = None
    try:
        async for ev in client.start(["/bin/sh", *argv], envs=envs, cwd=cwd, stdin=forward_stdin):
            if ev.kind == "start" and forward_stdin:
                stdin_task = asyncio.ensure_future(_pump_stdin(client, ev.pid))
            elif ev.kind == "stdout":
                sys.stdout.buffer.write(ev.data)
                sys.stdout.buffer.flush()
            elif ev.kind == "stderr":
                sys.stderr.buffer.write(ev.data)
                sys.stderr.buffer.flush()
            elif ev.kind == "end":
                if ev.error and ev.exit_code == 0:
                    err.print(f"[red]error:[/] {escape(str(ev.error))}", markup=True)
                    return 1
                return _exit_code(ev.exit_code)
        return 1
    except AgentError as e:
        err.print(f"[red]error:[/] {escape(str(e.message or e))}", markup=True)
        return 1
    except httpx.HTTPError as e:
        err.print(f"[red]error:[/] connection to the sandbox failed: {escape(str(e))}", markup=True)
        return 1
    finally:
        if stdin_task is not None:
            stdin_task.cancel()
        await client.aclose()


async def _pump_stdin(client: AgentClient, pid: int) -> None:
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    try:
        while True:
            data = await loop.run_in_executor(None, os.read, fd, 65536)
            if not data:
                break
            await client.send_input(pid, data)
        await client.close_stdin(pid)
    except (AgentError, httpx.HTTPError, OSError):
        pass


@sandbox_app.command("run-code")
def run_code(
    sandbox_id: str = typer.Argument(..., help="sandbox id (of a code-interpreter template)"),
    code: str = typer.Argument(..., help="the code to run; - reads it from stdin"),
    language: Optional[str] = typer.Option(None, "--language", "-l", help="python (default), javascript, r, "
                                           "bash... (its default context); not with --context"),
    context: Optional[str] = typer.Option(None, "--context", "-c", help="id of a context to run in (made by the "
                                          "SDK's create_code_context)"),
    timeout: Optional[float] = typer.Option(None, "--timeout", "-t", min=0, help="seconds the code may run "
                                            "(default 300, 0: no limit); then it is interrupted"),
    out_dir: Path = typer.Option(Path("."), "--out-dir", "-o", help="where images and PDFs the code displays are "
                                 "saved, as <sandbox id>-<n>.png|jpg|svg|pdf"),
    env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE for this run (repeatable)"),
    ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt, api_key: Optional[str] = KeyOpt,
    as_json: Optional[bool] = JsonOpt,
) -> None:
    """Run code in the sandbox's code interpreter (variables stay for the next run): its output
    streams, each result's text is printed, its images are saved (paths printed). Exit code 1 when
    the code raised (its traceback is printed); --json prints the whole execution at the end."""
    from sandbox_sdk.exceptions import SandboxError

    from .run_code import run_blocking

    t = _merge(ip, port, api_key, as_json)
    if language and context:
        fail("give --language or --context, not both: a context has its own language", 2)
    envs = _parse_pairs(env, "--env")
    if code == "-":
        code = sys.stdin.read()
    detail = Api(t).call("GET", f"/sandboxes/{sandbox_id}").json()
    try:
        execution, files = run_blocking(t.url, t.api_key, detail, code, language=language, context=context,
                                        timeout=timeout, envs=envs, out_dir=out_dir, as_json=t.as_json)
    except SandboxError as e:
        fail(str(e))
    except (OSError, ValueError) as e:
        fail(f"cannot save a result in {out_dir}: {e}")
    if t.as_json:
        print(json.dumps({**execution.to_dict(), "files": [str(f) for f in files]}, indent=2))
    elif execution.error is not None:
        e = execution.error
        sys.stderr.write((e.traceback or f"{e.name}: {e.value}").rstrip("\n") + "\n")
        sys.stderr.flush()
    if execution.error is not None:
        raise typer.Exit(1)


@sandbox_app.command("shell")
def shell(
    sandbox_id: str = typer.Argument(..., help="sandbox id"),
    command: str = typer.Option("/bin/bash", "--command", "-c", help="shell to start"),
    ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt, api_key: Optional[str] = KeyOpt,
) -> None:
    """An interactive shell in the sandbox, through a PTY (like `ssh root@<id>`)."""
    t = _merge(ip, port, api_key, None)
    if not sys.stdin.isatty():
        fail("sandbox shell needs a terminal; use `sandbox exec ID -- CMD` in scripts", 2)
    raise typer.Exit(asyncio.run(_shell(t, sandbox_id, command)))


async def _shell(t: Target, sandbox_id: str, command: str) -> int:
    import termios
    import tty

    client = _connect(t, sandbox_id)
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()
    size = os.get_terminal_size(fd)
    pid = 0
    inputs: asyncio.Queue[bytes | None] = asyncio.Queue()

    def on_stdin() -> None:
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        inputs.put_nowait(data or None)

    async def sender() -> None:
        while True:
            data = await inputs.get()
            if data is None:
                return
            while not inputs.empty():  # coalesce keystrokes that arrived meanwhile
                more = inputs.get_nowait()
                if more is None:
                    break
                data += more
            await client.send_input(pid, data, pty=True)

    def on_resize() -> None:
        if pid:
            s = os.get_terminal_size(fd)
            asyncio.ensure_future(client.resize_pty(pid, s.columns, s.lines))

    send_task: asyncio.Task[None] | None = None
    code = 1
    try:
        tty.setraw(fd, termios.TCSANOW)  # TCSANOW: keep what was typed ahead
        shell_cmd, *shell_args = shlex.split(command)
        envs = {"TERM": os.environ.get("TERM", "xterm-256color")}
        async for ev in client.start([shell_cmd, *(shell_args or ["-l"])], envs=envs, cwd="/root",
                                     pty=(size.columns, size.lines)):
            if ev.kind == "start":
                pid = ev.pid
                loop.add_reader(fd, on_stdin)
                loop.add_signal_handler(signal.SIGWINCH, on_resize)
                send_task = asyncio.ensure_future(sender())
            elif ev.kind in ("pty", "stdout", "stderr"):
                os.write(sys.stdout.fileno(), ev.data)
            elif ev.kind == "end":
                code = _exit_code(ev.exit_code)
                break
    except (AgentError, httpx.HTTPError) as e:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        err.print(f"\n[red]error:[/] {escape(str(e))}", markup=True)
    finally:
        with_suppress(lambda: loop.remove_reader(fd))
        with_suppress(lambda: loop.remove_signal_handler(signal.SIGWINCH))
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        if send_task is not None:
            send_task.cancel()
        await client.aclose()
    return code


def with_suppress(fn: Any) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001
        pass


# -- ssh ------------------------------------------------------------------------------------------
# The logic is in .ssh_config (config, keys, pins) and .ssh_proxy (the ProxyCommand); these are its commands.


def _ssh_backend(t: Target, home: Path) -> Any:
    from .ssh_config import Backend, write_api_key

    return Backend(t.ip, t.port, write_api_key(home, t.api_key) if t.api_key else None)


@app.command("ssh-config")
def ssh_config(
    write: bool = typer.Option(False, "--write", help="write it to ~/.ssh/config.d/trenvx and include that at the "
                               "top of ~/.ssh/config (once; nothing else there changes); without it, print it"),
    identity: Optional[Path] = typer.Option(None, "--identity", help="the private key to log in with (its .pub "
                                            "goes into sandboxes); default ~/.ssh/id_ed25519, id_ecdsa or id_rsa, "
                                            "else one made in ~/.ssh/trenvx/"),
    ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt, api_key: Optional[str] = KeyOpt,
) -> None:
    """An ssh client config for `ssh root@<sandbox-id>`, `scp` and `ssh -L` into this backend's sandboxes.

    It matches only host names that are ids of the backend's sandboxes; ssh connects through the
    backend (sshd is started in the sandbox on the first ssh, your public key let in). The key
    files it needs (a key made for trenvx when you have none, the API key) are written either way."""
    from .ssh_config import SshSetupError, config_text, ensure_identity, install, known_hosts_path

    t = _merge(ip, port, api_key, None)
    home = Path.home()
    try:
        ident = ensure_identity(home, identity)
        text = config_text(_ssh_backend(t, home), ident, known_hosts_path(home))
        if ident.generated:
            err.print(f"made an ssh key for trenvx sandboxes: {ident.private} (public: {ident.public})")
        if not write:
            sys.stdout.write(text)
            return
        done = install(home, text)
    except (SshSetupError, OSError) as e:
        fail(str(e))
    err.print(f"{'wrote' if done.changed else 'unchanged:'} {done.path}"
              + (f"; included from {done.user_config}" if done.include_added else ""))
    err.print("try: ssh root@<sandbox-id>  (sandbox-cli sandbox ls lists the ids)")


@sandbox_app.command("ssh")
def ssh(
    sandbox_id: str = typer.Argument(..., help="sandbox id"),
    cmd: Optional[list[str]] = typer.Argument(None, help="a command to run instead of a login shell (after --: "
                                              "sandbox ssh ID -- ls -l)"),
    user: str = typer.Option("root", "--user", "-u", help="account to log in as (root, or the template's user)"),
    forward: list[str] = typer.Option([], "--forward", "-L", help="ssh -L forwarding, e.g. 8080:localhost:80 "
                                      "(repeatable)"),
    identity: Optional[Path] = typer.Option(None, "--identity", help="private key to log in with (default: as "
                                            "ssh-config picks it)"),
    ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt, api_key: Optional[str] = KeyOpt,
) -> None:
    """Log into the sandbox with OpenSSH (ssh root@<id>, no ssh-config needed); with a command, run it."""
    from .ssh_config import SANDBOX_ID_RE, SshSetupError, ensure_identity, known_hosts_path, proxy_argv, ssh_command

    t = _merge(ip, port, api_key, None)
    if not SANDBOX_ID_RE.match(sandbox_id):
        fail(f"{sandbox_id!r} is not a sandbox id (sandbox-cli sandbox ls lists them)", 2)
    client = shutil.which("ssh")
    if client is None:
        fail("no ssh client here: install the OpenSSH client (apt-get install openssh-client)")
    Api(t).call("GET", f"/sandboxes/{sandbox_id}")  # a clear error for an id the backend does not know
    home = Path.home()
    try:
        ident = ensure_identity(home, identity)
        known = known_hosts_path(home)
        proxy = ssh_command(proxy_argv(_ssh_backend(t, home), public_key=ident.public, known_hosts=known))
    except (SshSetupError, OSError) as e:
        fail(str(e))
    argv = [client, "-o", f"ProxyCommand={proxy}", "-o", f"IdentityFile={ident.private}", "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes", "-o", "CheckHostIP=no",
            "-o", "UpdateHostKeys=no", "-l", user]
    for spec in forward:
        argv += ["-L", spec]
    argv += ["--", sandbox_id, *(cmd or [])]  # "--": a command starting with "-" is not an ssh option
    sys.stdout.flush()
    os.execv(client, argv)


@sandbox_app.command("ssh-proxy")
def ssh_proxy(
    sandbox_id: str = typer.Argument(..., help="sandbox id (ssh's %h)"),
    public_key: Optional[Path] = typer.Option(None, "--public-key", help="the .pub of the key ssh logs in with "
                                              "(default: as ssh-config picks it)"),
    known_hosts: Optional[Path] = typer.Option(None, "--known-hosts", help="where to pin the sandbox's host key "
                                               "(default ~/.ssh/trenvx/known_hosts)"),
    ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt, api_key: Optional[str] = KeyOpt,
) -> None:
    """ssh ProxyCommand: start sshd in the sandbox, let the key in, relay stdin/stdout to its port 22.

    E.g. ssh -o ProxyCommand='sandbox-cli sandbox ssh-proxy %h' root@<id> (ssh-config's config runs the same
    code as python -m trenvx.cli.ssh_proxy, which starts faster)."""
    from . import ssh_proxy as proxy
    from .ssh_config import SshSetupError, ensure_identity, known_hosts_path

    t = _merge(ip, port, api_key, None)
    home = Path.home()
    try:
        pub = public_key or ensure_identity(home).public
        code = proxy.run_proxy(t.url, t.api_key, sandbox_id, pub, known_hosts or known_hosts_path(home))
    except (proxy.ProxyError, SshSetupError) as e:
        fail(str(e))
    raise typer.Exit(code)


# -- templates --------------------------------------------------------------------------------


@template_app.command("ls")
def template_ls(ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt, api_key: Optional[str] = KeyOpt,
                as_json: Optional[bool] = JsonOpt) -> None:
    """Templates the backend can start sandboxes from."""
    t = _merge(ip, port, api_key, as_json)
    items = Api(t).call("GET", "/templates").json()
    if t.as_json:
        print(json.dumps(items, indent=2))
        return
    rows = []
    for tpl in items:
        x = tpl.get("trenvx") or {}
        rows.append([tpl["templateID"] + (" (default)" if tpl.get("isDefault") else ""), tpl["buildID"],
                     str(tpl["cpuCount"]), f"{tpl['memoryMB']} MiB",
                     f"{x.get('vmmType', '?')}/{x.get('accelerator', '?')}", str(tpl.get("spawnCount", 0))])
    columns = [Column("TEMPLATE", whole=True), Column("BUILD", whole=True), Column("VCPU"), Column("MEMORY"),
               Column("VMM"), Column("SANDBOXES STARTED")]
    print_table(out, columns, rows)


# -- snapshots ------------------------------------------------------------------------------------


@snapshot_app.command("create")
def snapshot_create(
    sandbox_id: str,
    name: Optional[str] = typer.Option(None, "--name", help="publish it under this name (a new build of it "
                                                            "if it exists); default: a new id"),
    ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt, api_key: Optional[str] = KeyOpt,
    as_json: Optional[bool] = JsonOpt,
) -> None:
    """Snapshot a running sandbox (it runs on) and print the snapshot's id. Start sandboxes from it with `sandbox create -t ID`; it stays until `snapshot rm ID`, also after its sandbox ends."""
    t = _merge(ip, port, api_key, as_json)
    body: dict[str, Any] = {"name": name} if name else {}
    t0 = time.monotonic()
    info = Api(t).call("POST", f"/sandboxes/{sandbox_id}/snapshots", json=body, timeout=PAUSE_RESUME_TIMEOUT_S).json()
    if t.as_json:
        print(json.dumps(info, indent=2))
        return
    print(info["snapshotID"])
    err.print(f"snapshot of {sandbox_id} taken in {time.monotonic() - t0:.1f} s")


@snapshot_app.command("ls")
def snapshot_ls(
    sandbox_id: Optional[str] = typer.Option(None, "--sandbox", "-s", help="only the snapshots of this sandbox"),
    ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt, api_key: Optional[str] = KeyOpt,
    as_json: Optional[bool] = JsonOpt,
) -> None:
    """Snapshots on the backend, newest first."""
    t = _merge(ip, port, api_key, as_json)
    api = Api(t)
    params: dict[str, Any] = {"sandboxID": sandbox_id} if sandbox_id else {}
    items: list[dict[str, Any]] = []
    while True:
        r = api.call("GET", "/snapshots", params=params)
        items += r.json()
        token = r.headers.get("x-next-token")
        if not token:
            break
        params["nextToken"] = token
    if t.as_json:
        print(json.dumps(items, indent=2))
        return
    rows = [[s["snapshotID"], ", ".join(s.get("names") or []) or "-"] for s in items]
    print_table(out, [Column("SNAPSHOT", whole=True), Column("NAMES", wrap=True)], rows)


@snapshot_app.command("rm")
def snapshot_rm(
    snapshot_ids: list[str] = typer.Argument(..., help="snapshot ids (or names)"),
    ip: Optional[str] = IpOpt, port: Optional[int] = PortOpt, api_key: Optional[str] = KeyOpt,
    as_json: Optional[bool] = JsonOpt,
) -> None:
    """Delete snapshots: no sandbox starts from them any more (those started from one run on)."""
    t = _merge(ip, port, api_key, as_json)
    api = Api(t)
    for sid in snapshot_ids:
        api.call("DELETE", "/templates/" + urllib.parse.quote(sid, safe=""))
        if not t.as_json:
            print(f"{sid} deleted")
    if t.as_json:
        print(json.dumps({"deleted": snapshot_ids}))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
