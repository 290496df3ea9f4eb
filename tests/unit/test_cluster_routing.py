"""Two real nodes (the real app, router and ClusterNode over the real manager with fake VMs) on a
real etcd: registration, placement across nodes, list through any node, a sandbox's API calls and
proxied traffic through a node that does not own it, the secret on internal routes, a dead node's
sandboxes reported lost and a kill of one remembered, and creates refused with a 503 while etcd is
down. tests/e2e/test_cluster.py does the same with real VMs and 3 nodes."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest

from trenvx.cluster.etcd_local import LocalEtcdCluster
from trenvx.config import ClusterConfig
from trenvx.server.app import create_app

from .server_fakes import ThreadedServer, UpstreamState, fake_manager, free_port, make_config, make_template, upstream_app

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed (scripts/start.sh setup)")

KEY = "cluster-unit-key"


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    with LocalEtcdCluster(tmp_path_factory.mktemp("etcd"), 1) as e:
        yield e


@pytest.fixture(scope="module")
def upstream():
    with ThreadedServer(upstream_app(UpstreamState())) as s:
        yield s


class Node:
    def __init__(self, root: Path, name: str, etcd_url: str, agent_port: int, *, template: bool = True) -> None:
        if template:
            make_template(root, "tpl")
        self.port = free_port()
        cfg = make_config(root, api_key=KEY, port=self.port)
        cfg = cfg.model_copy(update={"cluster": ClusterConfig(etcd=etcd_url, name=name, lease_ttl_s=2,
                                                              advertise_url=f"http://127.0.0.1:{self.port}")})
        self.manager = fake_manager(cfg, agent_port)
        self.app = create_app(cfg, manager=self.manager)
        self.server = ThreadedServer(self.app, port=self.port, lifespan="on")
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Node":
        self.server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": KEY}, timeout=30)


def wait(cond, timeout: float = 10.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


def test_two_nodes_one_api(tmp_path: Path, etcd, upstream) -> None:
    with Node(tmp_path / "a", "a", etcd.url, upstream.port) as a, Node(tmp_path / "b", "b", etcd.url, upstream.port) as b:
        ca, cb = a.client(), b.client()
        assert wait(lambda: len(ca.get("/cluster/nodes").json()) == 2)
        assert {n["name"] for n in cb.get("/cluster/nodes").json()} == {"a", "b"}

        ids = []
        for _ in range(12):
            r = ca.post("/sandboxes", json={"templateID": "tpl", "metadata": {"who": "unit"}})
            assert r.status_code == 201, r.text
            ids.append(r.json()["sandboxID"])
        owners = {s["sandboxID"]: s["trenvx"]["node"] for s in cb.get("/v2/sandboxes").json()}
        assert set(ids) <= set(owners), "a list through b misses sandboxes"
        assert set(owners[i] for i in ids) == {"a", "b"}, f"placement used one node: {owners}"
        assert len(ca.get("/sandboxes", params={"metadata": "who=unit"}).json()) == 12

        on_b = [i for i in ids if owners[i] == "b"]
        on_a = [i for i in ids if owners[i] == "a"]
        # b's sandbox through a: the API (forwarded) and the proxy (E2B's header form)
        r = ca.get(f"/sandboxes/{on_b[0]}")
        assert r.status_code == 200 and r.json()["sandboxID"] == on_b[0] and r.json()["envdAccessToken"]
        r = ca.get("/health", headers={"E2b-Sandbox-Id": on_b[0], "E2b-Sandbox-Port": "49983"})
        assert r.status_code == 204, r.text  # the stand-in agent's answer, through a to b's proxy
        from websockets.sync.client import connect

        with connect(f"ws://127.0.0.1:{a.port}/ws", additional_headers={
                "E2b-Sandbox-Id": on_b[0], "E2b-Sandbox-Port": "49983"}, open_timeout=10) as ws:  # a websocket too
            ws.send("over two nodes")
            assert ws.recv(timeout=10) == "echo:over two nodes"
            ws.send(b"\x00bytes")
            assert ws.recv(timeout=10) == b"echo:\x00bytes"
        assert ca.post(f"/sandboxes/{on_b[0]}/timeout", json={"timeout": 120}).status_code == 204
        assert ca.delete(f"/sandboxes/{on_b[0]}").status_code == 204
        assert wait(lambda: on_b[0] not in {sb.id for sb in b.manager.list()})
        assert on_b[0] not in {s["sandboxID"] for s in ca.get("/sandboxes").json()}

        # internal routes want the cluster's secret; a client's claim to be a node is dropped
        assert ca.get("/cluster/templates/tpl").status_code == 403
        assert ca.get("/cluster/templates/tpl", headers={"X-Trenvx-Cluster": "guess"}).status_code == 403
        r = ca.get("/cluster/templates/tpl", headers={"X-Trenvx-Cluster": a.app.state.cluster.secret})
        # past the check (the fake template's kernel is nowhere: the offer says so)
        assert r.status_code == 409 and "kernel" in r.json()["message"], r.text

        # b stops: its sandboxes end with it, and the cluster reports them exited
        node_b = b.app.state.cluster
        b.server.server.should_exit = True  # noqa - stop serving; the lifespan revokes b's lease
        b.server.thread.join(15)
        lost = on_b[1]
        assert wait(lambda: ca.get("/v2/sandboxes", params={"state": "exited"}).json() and any(
            s["sandboxID"] == lost for s in ca.get("/v2/sandboxes", params={"state": "exited"}).json()), 10)
        del node_b
        r = ca.get(f"/sandboxes/{lost}")
        assert r.status_code == 404, r.text

        # etcd down: creates 503 (after the node noticed), a's own sandboxes still answer
        etcd.kill_member(0)
        try:
            assert wait(lambda: ca.post("/sandboxes", json={"templateID": "tpl"}).status_code == 503, 10)
            r = ca.post("/sandboxes", json={"templateID": "tpl"})
            assert "etcd" in r.json()["message"], r.text
            assert ca.get(f"/sandboxes/{on_a[0]}").status_code == 200
        finally:
            etcd.restart_member(0)
        assert wait(lambda: ca.post("/sandboxes", json={"templateID": "tpl"}).status_code == 201, 15)


def test_a_paused_sandbox_resumes_on_another_node(tmp_path: Path, etcd, upstream) -> None:
    with Node(tmp_path / "a", "a", etcd.url, upstream.port) as a, Node(tmp_path / "b", "b", etcd.url, upstream.port) as b:
        ca = a.client()
        assert wait(lambda: len(ca.get("/cluster/nodes").json()) == 2)
        sid = None
        for _ in range(10):  # one on a
            r = ca.post("/sandboxes", json={"templateID": "tpl", "metadata": {"keep": "me"}})
            assert r.status_code == 201, r.text
            if r.json()["sandboxID"] in {s.id for s in a.manager.list()}:
                sid = r.json()["sandboxID"]
                break
        assert sid is not None
        token = ca.get(f"/sandboxes/{sid}").json()["envdAccessToken"]
        # running: it cannot move
        r = ca.post(f"/sandboxes/{sid}/resume", params={"node": "b"})
        assert r.status_code == 409 and "paused" in r.json()["message"], r.text
        assert ca.post(f"/sandboxes/{sid}/pause").status_code == 204
        r = ca.post(f"/sandboxes/{sid}/resume", params={"node": "nosuchnode"})
        assert r.status_code == 400 and "'nosuchnode'" in r.json()["message"]

        r = ca.post(f"/sandboxes/{sid}/resume", params={"node": "b"})  # through a, to b
        assert r.status_code == 201, r.text
        assert sid in {s.id for s in b.manager.list()} and sid not in {s.id for s in a.manager.list()}
        assert not a.manager.data_root.sandbox_dir(sid).exists(), "the giver kept its files"
        assert b.manager.get(sid).state == "running" and b.manager.get(sid).access_token == token
        assert b.manager.get(sid).metadata == {"keep": "me"}
        listed = {s["sandboxID"]: s for s in ca.get("/v2/sandboxes").json()}
        assert wait(lambda: {s["sandboxID"]: s for s in ca.get("/v2/sandboxes").json()}[sid]["trenvx"]["node"] == "b")
        assert listed[sid]["state"] == "running"
        assert ca.delete(f"/sandboxes/{sid}").status_code == 204
        assert wait(lambda: sid not in {s.id for s in b.manager.list()})


def test_a_single_machine_has_no_cluster_parts(tmp_path: Path) -> None:
    """Single-machine stays the default (issue 17 item 5): the shipped config has no [cluster], and
    an app made without one has no node, no router in front of the proxy and no cluster routes."""
    from trenvx.config import load_config
    from trenvx.server.cluster_routing import ClusterRouter

    shipped = load_config(Path(__file__).resolve().parents[2] / "configs" / "example_config.toml")
    assert not shipped.cluster.enabled
    cfg = make_config(tmp_path)
    assert not cfg.cluster.enabled
    app = create_app(cfg, manager=fake_manager(cfg, free_port()))
    assert app.state.cluster is None
    assert not any(m.cls is ClusterRouter or (isinstance(m.cls, type) and issubclass(m.cls, ClusterRouter))
                   for m in app.user_middleware)
    assert not any(getattr(r, "path", "").startswith("/cluster") for r in app.routes)
