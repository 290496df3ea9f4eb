"""``benchmarks/load.py`` and ``benchmarks/soak.py`` in their short modes, with real VMs (issue 18,
item 3; the 200-client load and the 30-minute soak run as benchmarks, these are their CI form).

No timing thresholds: how fast this shared 2-core machine is, is not what is tested. What is: every
call answered right (zero errors), every client was admitted, the JSON carries every figure the
README's table is made from, each soak metric got its fit and a verdict, and nothing was left behind
(sandbox directories, VMM processes, network slots, nftables tables, namespaces).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from trenvx.config import Config

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "tests" / "e2e" / "e2e_config.toml"
VERDICTS = {"flat", "grows", "shrinks", "grew, then flat", "shrank, then flat", "noisy"}


def run_benchmark(name: str, template: str, out: Path, *extra: str) -> tuple[dict[str, Any], str]:
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--quick", "--config", str(CONFIG),
                        "--template", template, "--json", str(out), *extra],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"JSON: {out}" in r.stdout
    return json.loads(out.read_text()), r.stdout


def ordered(p: dict[str, float], what: str) -> None:
    assert p["n"] > 0 and 0 < p["p50"] <= p["p90"] <= p["p99"] <= p["max"], f"{what}: {p}"


def test_load_short_mode(e2e_config: Config, test_template: str, tmp_path: Path) -> None:
    """10 clients, each its own SDK object, create/commands/files/kill for a 10 s steady phase."""
    data, stdout = run_benchmark("load", test_template, tmp_path / "load.json")
    meta = data["meta"]
    assert meta["clients"] == 10 and meta["accelerator"] in ("kvm", "tcg")
    assert data["admitted"] == 10 and data["not_admitted"] == 0
    assert data["errors"]["errors"] == 0, (data["errors"], data["error_samples"])
    assert data["errors"]["calls"] > 10 * 4 and data["errors"]["error_rate"] == 0
    assert data["peak_alive"] == 10
    for kind in ("create", "command", "python", "write", "read", "list", "kill", "file"):
        ordered(data["latency_ms"][kind], kind)
    for kind in ("create", "command", "file"):
        ordered(data["reference_ms"][kind], f"reference {kind}")
    assert data["latency_ms"]["create"]["n"] == 10 and data["latency_ms"]["kill"]["n"] == 10
    t = data["throughput"]  # the steady phase's may be empty on a loaded host: a round can outlast it
    assert t["overall_calls"] == data["errors"]["calls"] - 20 and t["overall_calls_per_s"] > 0
    assert {"calls_per_s", "commands_per_s", "file_calls_per_s", "creates_per_s"} <= set(t)
    assert data["steady_seconds"] >= 10
    assert isinstance(data["degraded"], list)
    assert all({"signal", "t_s", "detail"} <= set(ev) for ev in data["degraded"])
    assert data["timeline"] and {"alive", "server_fds", "server_rss_mib", "mem_available_mib"} <= set(data["timeline"][0])
    assert data["left_behind"] == {"sandbox_dirs": [], "vmm_processes": 0, "network_slots": 0}
    assert data["sandboxes_listed_after"] == 0
    assert "p99" in stdout and ("what degraded first" in stdout or "nothing degraded" in stdout)
    assert not Path(meta["data_root"]).exists()  # the benchmark's own data_root is removed


def test_soak_short_mode(e2e_config: Config, test_template: str, tmp_path: Path) -> None:
    """40 s of create/exec/kill churn, 3 at once, sampled every 2 s: fits and verdicts computed."""
    data, stdout = run_benchmark("soak", test_template, tmp_path / "soak.json")
    assert data["errors"]["errors"] == 0, (data["errors"], data["error_samples"])
    assert data["cycles"] >= 3
    assert len(data["timeline"]) >= 10
    metrics = data["metrics"]
    assert {"server_fds", "server_threads", "server_rss_mib", "data_files", "data_mib", "network_slots",
            "vmm_processes", "orphan_netns", "owner_nft_tables", "owner_cgroups"} <= set(metrics)
    for name, m in metrics.items():
        assert m["verdict"] in VERDICTS, (name, m)
        assert m["start"] <= m["max"] and m["end"] <= m["max"], (name, m)
        for f in (m["fit_after_warmup"], m["fit_second_half"]):
            assert f["n"] >= 3 and not math.isnan(f["slope_per_h"]), (name, f)
    assert metrics["owner_nft_tables"]["max"] == 1  # the server's one host table, while it ran
    assert metrics["server_fds"]["max"] > 0 and metrics["server_threads"]["max"] > 0
    assert data["left_behind"] == {"sandbox_dirs": 0, "network_slots": 0, "vmm_processes": 0, "owner_nft_tables": 0,
                                   "owner_cgroups": 0, "orphan_netns": 0, "orphan_host_ifs": 0}
    assert "verdict" in stdout
    assert not Path(data["meta"]["data_root"]).exists()
