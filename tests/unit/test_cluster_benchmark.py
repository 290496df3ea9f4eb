"""``benchmarks/cluster.py --short`` end to end: a real 3-member etcd, 3 real and 10 simulated
stand-in nodes, 300 creates through the front nodes; the JSON it writes (what the README's
"Scaling out" table is made from) has every figure, and the figures are sane.

No timing thresholds: how fast this machine is, is not what is tested. What is: creates were
placed over the simulated nodes too, the nodes' etcd traffic was counted, routed requests were
answered by the sandbox's owner, lists were complete, and every percentile is ordered.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARK = ROOT / "benchmarks" / "cluster.py"

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None,
                                reason="etcd is not installed (Debian's etcd-server; scripts/start.sh setup)")


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("cluster-bench") / "cluster.json"
    proc = subprocess.run([sys.executable, str(BENCHMARK), "--short", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert f"JSON: {out}" in proc.stdout
    assert "creates through the front nodes" in proc.stdout  # the table was printed
    return json.loads(out.read_text())


def ordered(s: dict[str, float], what: str) -> None:
    """A summary of at least one sample: 0 < p50 <= p99 <= max, all finite."""
    assert s["n"] > 0, f"{what}: no samples"
    assert all(math.isfinite(s[k]) for k in ("p50", "p99", "max")), f"{what}: {s}"
    assert 0 < s["p50"] <= s["p99"] <= s["max"], f"{what}: {s}"


def test_the_run_is_described(result: dict[str, Any]) -> None:
    assert result["benchmark"] == "cluster"
    assert {"host", "args", "real_vs_simulated", "solo", "clusters"} <= result.keys()
    assert result["args"]["short"] is True
    assert "simulated" in result["real_vs_simulated"] and "stand-in" in result["real_vs_simulated"]
    assert result["host"]["cores"] >= 1 and result["host"]["etcd"].startswith("etcd Version")


def test_the_no_cluster_baseline(result: dict[str, Any]) -> None:
    solo = result["solo"]
    assert solo["ok"] > 0 and solo["failed"] == 0, solo["errors"]
    assert solo["creates_per_s"] > 0
    for key in ("latency_ms", "standin_ms", "get_ms", "proxy_ms"):
        ordered(solo[key], f"solo {key}")


def test_creates_are_placed_over_real_and_simulated_nodes(result: dict[str, Any]) -> None:
    [cluster] = result["clusters"]
    assert (cluster["nodes"], cluster["real_nodes"], cluster["simulated_nodes"]) == (13, 3, 10)
    [point] = cluster["checkpoints"]
    create = point["create"]
    assert create["failed"] == 0, create["errors"]
    assert create["ok"] >= 300 and point["sandboxes"] >= 300
    assert create["creates_per_s"] > 0
    for key in ("latency_ms", "standin_ms", "placement_ms", "placement_candidates_ms", "entry_write_ms"):
        ordered(create[key], f"create {key}")
    assert create["placement_ms"]["n"] == create["ok"]  # every create was timed on its front node
    if create["placement_check_store_ms"]["n"]:  # a node that checks etcd answers before it places
        ordered(create["placement_check_store_ms"], "create placement_check_store_ms")
        assert create["placement_check_store_ms"]["p50"] <= create["placement_ms"]["p50"]
    assert 0 <= create["placement_etcd_reads"] <= create["ok"]
    # more nodes took sandboxes than the 3 real ones: the simulated nodes are placed on too
    assert cluster["real_nodes"] < create["spread"]["nodes_used"] <= cluster["nodes"]
    assert create["spread"]["on_kind"]["real"] > 0 and create["spread"]["on_kind"]["simulated"] > 0
    # every node kept its lease through the run
    assert point["nodes_registered"] == 13 and point["lease_expiries"] == 0
    ordered(create["sequential"]["latency_ms"], "one-at-a-time creates")


def test_etcd_traffic_is_counted(result: dict[str, Any]) -> None:
    [cluster] = result["clusters"]
    [point] = cluster["checkpoints"]
    per_create = point["create"]["etcd_per_create"]
    assert per_create["requests"] > 0 and per_create["bytes"] > 0
    assert per_create["by_call"].get("/v3/kv/put", 0) >= 1  # each create's entry is written
    assert per_create["bytes_by_call"]["streams (watch, keepalive)"] > 0  # and reaches the nodes' watches
    for idle in (cluster["idle_empty"], point["idle"]):
        assert idle["requests_per_s"] > 0 and idle["bytes_per_s"] > 0
        assert idle["requests_per_s_per_node"] == pytest.approx(idle["requests_per_s"] / 13)
        assert set(idle["per_node_by_kind"]) == {"real", "simulated"}
        assert idle["per_node_by_kind"]["simulated"]["nodes"] == 10
    renewals = cluster["idle_empty"]["by_call_per_s"].get("/v3/lease/keepalive", 0) + \
        point["idle"]["by_call_per_s"].get("/v3/lease/keepalive", 0)
    assert renewals > 0


def test_routing_reaches_the_owner_and_lists_are_complete(result: dict[str, Any]) -> None:
    [cluster] = result["clusters"]
    [point] = cluster["checkpoints"]
    routing = point["routing"]
    assert routing["wrong"] == {}  # every answer came from the sandbox's owner (X-Bench-Node)
    for key in ("get_owner_ms", "get_other_first_ms", "get_other_again_ms", "proxy_owner_ms", "proxy_other_ms"):
        ordered(routing[key], f"routing {key}")
    assert routing["hop_ms"]["n"] == routing["get_owner_ms"]["n"]
    assert point["list"]["wrong"] == 0
    ordered(point["list"]["latency_ms"], "list")
    assert point["etcd_db_bytes"] > 0
