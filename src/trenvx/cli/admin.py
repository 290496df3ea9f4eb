"""trenvx: run and check the backend.

    trenvx serve  --config configs/example_config.toml [--keep] [--host H] [--port P]
                  (a --host other than loopback needs [orchestrator] api_key or TRENVX_API_KEY)
    trenvx doctor --config configs/example_config.toml [--json]
"""

from __future__ import annotations

import json
import shutil
from typing import Optional

import psutil
import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from ..config import Config, ConfigError, load_config
from .tables import Column, print_table

err = Console(stderr=True)
app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run and check the trenvx backend: serve (foreground), doctor.")

DEFAULT_CONFIG = "configs/example_config.toml"
ConfigOpt = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="TOML config file", envvar="TRENVX_CONFIG")


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@app.command()
def serve(
    config: str = ConfigOpt,
    keep: bool = typer.Option(False, "--keep", help="leave sandboxes running on exit, for the next server to adopt"),
    host: Optional[str] = typer.Option(None, "--host", help="override [orchestrator] host (default 127.0.0.1; "
                                       "any other address needs an API key)"),
    port: Optional[int] = typer.Option(None, "--port", "-p", help="override [orchestrator] port"),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning, error"),
    access_log: bool = typer.Option(False, "--access-log", help="log every HTTP request"),
    cluster: Optional[str] = typer.Option(None, "--cluster", help="join a cluster: etcd://HOST:PORT[,HOST:PORT...] "
                                          "(overrides [cluster] etcd)"),
    node_name: Optional[str] = typer.Option(None, "--node-name", help="this node's name in the cluster "
                                            "(overrides [cluster] name; default: host name and port)"),
    advertise_url: Optional[str] = typer.Option(None, "--advertise-url", help="where the other nodes reach this "
                                                "one (overrides [cluster] advertise_url)"),
) -> None:
    """Start the backend in the foreground (Ctrl-C stops it and kills its sandboxes, unless --keep).

    It listens on 127.0.0.1 unless told otherwise; another address needs an API key
    ([orchestrator] api_key, or TRENVX_API_KEY in the environment), else it exits with 2.
    With --cluster it is one node of a cluster whose state lives in etcd (docs: README, Scaling out).
    """
    from ..server.runner import ServerError, UnsafeBind, serve as run_server

    cfg = _load(config)
    updates = {k: v for k, v in (("etcd", cluster), ("name", node_name), ("advertise_url", advertise_url))
               if v is not None}
    if updates:
        from pydantic import ValidationError

        from ..config import ClusterConfig

        try:
            merged = ClusterConfig.model_validate({**cfg.cluster.model_dump(), **updates})
        except ValidationError as e:
            err.print(f"[red]error:[/] {escape(e.errors()[0]['msg'])}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        cfg = cfg.model_copy(update={"cluster": merged})
    try:
        run_server(cfg, keep=keep, host=host, port=port, log_level=log_level, access_log=access_log)
    except UnsafeBind as e:
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except ServerError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _network_check(cfg: Config) -> tuple[str, bool | None, str]:
    """Which network mode sandboxes get here, and why (a warning when they fall back to user networking)."""
    from ..config import NetworkMode
    from ..network.mode import resolve

    try:
        mode, why = resolve(cfg.network)
    except RuntimeError as e:
        return "network", False, str(e)
    if mode is NetworkMode.netns:
        return "network", True, (f"netns: a network namespace per sandbox, slots in {cfg.network.slot_cidr}, "
                                 f"egress rules enforced ({why})")
    return "network", None, (f"user: QEMU user networking, restricted (no egress, allowOut refused) because {why}; "
                             "run as root with tap and nftables (scripts/start.sh setup) for netns")


def _checks(cfg: Config) -> list[tuple[str, bool | None, str]]:
    """(check, ok / None for a warning, detail)."""
    from ..layout import DataRoot
    from ..template.store import TemplateNotFound, TemplateStore
    from ..vmm.accel import kvm_obstacle

    out: list[tuple[str, bool | None, str]] = []
    qemu = shutil.which(cfg.vmm.qemu_binary)
    out.append(("qemu", bool(qemu), qemu or f"{cfg.vmm.qemu_binary} not on PATH: run scripts/start.sh setup"))
    qimg = shutil.which("qemu-img")
    out.append(("qemu-img", bool(qimg), qimg or "not on PATH: run scripts/start.sh setup"))
    obstacle = kvm_obstacle()
    out.append(("kvm", None if obstacle else True,
                obstacle + " -> sandboxes run under TCG (software emulation, slower)" if obstacle else "/dev/kvm usable"))
    out += _vmm_checks(cfg)
    out.append(_network_check(cfg))
    root = cfg.data_root
    try:
        dr = DataRoot(root).ensure()
        probe = dr.run / ".doctor"
        probe.write_text("ok")
        probe.unlink()
        out.append(("data_root", True, f"{root} writable"))
    except OSError as e:
        out.append(("data_root", False, f"{root}: {e.strerror}"))
        return out
    from ..vmm.hostcheck import reflink_availability

    rl = reflink_availability(root)
    out.append(("reflink", True if rl.usable else None, rl.detail))
    kernels = sorted(p.name for p in dr.kernels.iterdir() if not p.name.startswith(".")) if dr.kernels.is_dir() else []
    out.append(("kernel", bool(kernels), ", ".join(kernels) or "none: run scripts/start.sh setup"))
    store = TemplateStore(dr)
    for name in sorted(set(cfg.template) | set(store.names()) | {cfg.default_template}):
        try:
            m = store.current(name).manifest
            out.append((f"template {name}", True, f"build {m.build_id}, {m.vmm_type}/{m.machine.accelerator}"))
        except TemplateNotFound:
            ok = None if name != cfg.default_template else False
            out.append((f"template {name}", ok, f"not built: template-manager --config <config> --template {name}"))
    lock = dr.run / "server.lock"
    holder = lock.read_text().strip() if lock.exists() else ""
    from ..server.runner import ServerError, acquire_lock

    try:
        acquire_lock(dr.run).release()
        out.append(("server", None, "not running on this data_root (start: trenvx serve --config ...)"))
    except ServerError:
        out.append(("server", True, f"running (pid {holder}) on {cfg.orchestrator.host}:{cfg.orchestrator.port}"))
    if cfg.cluster.enabled:
        out += _cluster_checks(cfg)
    mem = psutil.virtual_memory()
    headroom = cfg.orchestrator.memory_headroom_mb
    out.append(("memory", mem.available // 2**20 > headroom,
                f"{mem.available // 2**20} MiB available, headroom {headroom} MiB"))
    return out


def _cluster_checks(cfg: Config) -> list[tuple[str, bool | None, str]]:
    """With ``[cluster]``: etcd reachable (its members, its leader), and the nodes registered."""
    import asyncio

    from ..cluster.etcd import EtcdClient, EtcdError, parse_etcd_url
    from ..cluster.node import node_name
    from ..cluster.records import KeyLayout, NodeRecord

    async def probe() -> list[tuple[str, bool | None, str]]:
        async with EtcdClient(parse_etcd_url(cfg.cluster.etcd), timeout_s=cfg.cluster.etcd_timeout_s) as etcd:
            try:
                members = await etcd.members()
                status = await etcd.status()
                nodes = [NodeRecord.model_validate_json(kv.value)
                         for kv in await etcd.range(KeyLayout(cfg.cluster.prefix).nodes)]
            except EtcdError as e:
                return [("cluster etcd", False, str(e))]
        me = node_name(cfg)
        return [
            ("cluster etcd", True, f"{len(members)} members ({', '.join(m['name'] for m in members)}), "
                                   f"etcd {status.get('version')}, leader {status.get('leader') or 'none'}"),
            ("cluster nodes", True if nodes else None,
             f"{len(nodes)} alive: " + ", ".join(f"{n.name} {n.url} ({n.capacity.sandboxes} sandboxes)" for n in nodes)
             + ("" if any(n.name == me for n in nodes) else f"; this node ({me}) is not among them (not started?)")),
        ]

    return asyncio.run(probe())


def _vmm_checks(cfg: Config) -> list[tuple[str, bool | None, str]]:
    """Which VMMs and accelerators are usable here, and why not. A VMM that a configured template
    names is a failure when unusable; any other is a warning."""
    from ..vmm.hostcheck import accelerator_availability, vhost_vsock_availability, vmm_availability

    wanted = {t.vmm_type.value for t in cfg.template.values()}
    out: list[tuple[str, bool | None, str]] = []
    for a in vmm_availability(cfg):
        ok: bool | None = True if a.usable else (False if a.name in wanted else None)
        out.append((f"vmm {a.name}", ok, a.detail))
    for a in accelerator_availability(cfg):
        out.append((f"accel {a.name}", True if a.usable else None, a.detail))
    vs = vhost_vsock_availability()
    out.append((vs.name, True if vs.usable else None, vs.detail))
    from ..vmm.hostcheck import jail_availability

    for a in jail_availability(cfg):  # a piece the host refuses is a warning: the VMM runs without it
        out.append((a.name, True if a.usable else None, a.detail))
    return out


@app.command()
def doctor(config: str = ConfigOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Check that this host can run sandboxes: VMMs (QEMU, Firecracker, Cloud Hypervisor), KVM or TCG, vhost-vsock,
    reflink, kernel, templates, server, memory."""
    cfg = _load(config)
    checks = _checks(cfg)
    failed = any(ok is False for _, ok, _ in checks)
    if as_json:
        print(json.dumps([{"check": c, "ok": ok, "detail": d} for c, ok, d in checks], indent=2))
    else:
        marks = {True: Text("ok", "green"), None: Text("warn", "yellow"), False: Text("FAIL", "red")}
        rows = [(marks[None if ok is None else bool(ok)], c, d) for c, ok, d in checks]
        print_table(Console(), [Column(), Column(), Column(wrap=True)], rows, show_header=False)
    raise typer.Exit(1 if failed else 0)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
