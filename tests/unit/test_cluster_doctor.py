"""``trenvx doctor`` with ``[cluster]``: etcd reachable or not, the nodes registered."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from trenvx.cli.admin import _cluster_checks
from trenvx.cluster.etcd_local import LocalEtcdCluster, free_ports
from trenvx.config import ClusterConfig, Config

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed (scripts/start.sh setup)")


def test_doctor_reports_etcd_and_the_nodes(tmp_path: Path) -> None:
    with LocalEtcdCluster(tmp_path / "etcd", 1) as etcd:
        cfg = Config(data_root=tmp_path, cluster=ClusterConfig(etcd=etcd.url, name="me"))
        checks = {name: (ok, detail) for name, ok, detail in _cluster_checks(cfg)}
        assert checks["cluster etcd"][0] is True and "1 members (m0)" in checks["cluster etcd"][1]
        assert checks["cluster nodes"][0] is None and "this node (me) is not among them" in checks["cluster nodes"][1]


def test_doctor_fails_clearly_without_etcd(tmp_path: Path) -> None:
    port = free_ports("127.0.0.1", 1)[0]
    cfg = Config(data_root=tmp_path, cluster=ClusterConfig(etcd=f"etcd://127.0.0.1:{port}", etcd_timeout_s=1))
    (name, ok, detail), = _cluster_checks(cfg)
    assert (name, ok) == ("cluster etcd", False)
    assert f"127.0.0.1:{port}" in detail and "etcd" in detail
