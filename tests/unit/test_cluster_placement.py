"""Placement of creates across a cluster's nodes (best of K), over node records only."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from trenvx.cluster.placement import NoNodeAvailable, candidates
from trenvx.cluster.records import NodeCapacity, NodeRecord


def node(name: str, headroom: int = 8192, *, templates: dict[str, str] | None = None, pools: dict[str, int] | None = None,
         sandboxes: int = 0, max_sandboxes: int = 100, accepting: bool = True, snapshots: list[str] | None = None
         ) -> NodeRecord:
    return NodeRecord(name=name, url=f"http://{name}:5000", accepting=accepting,
                      capacity=NodeCapacity(mem_headroom_mb=headroom, sandboxes=sandboxes, max_sandboxes=max_sandboxes),
                      templates=templates or {}, pools=pools or {}, snapshots=snapshots or [])


def test_a_node_with_a_pool_and_the_build_beats_more_headroom() -> None:
    nodes = [node("a", 20000), node("b", 4000, templates={"t": "d"}), node("c", 3000, templates={"t": "d"}, pools={"t": 2})]
    assert [n.name for n in candidates(nodes, "t", 256, 3)] == ["c", "b", "a"]


def test_the_wrong_build_counts_as_none() -> None:
    nodes = [node("a", 4000, templates={"t": "old"}), node("b", 3000, templates={"t": "new"})]
    assert candidates(nodes, "t", 256, 2, digest="new")[0].name == "b"


def test_full_stopping_and_small_nodes_are_never_candidates() -> None:
    nodes = [node("full", sandboxes=100), node("stopping", accepting=False), node("small", 100), node("ok")]
    assert [n.name for n in candidates(nodes, "t", 256, 4)] == ["ok"]


def test_no_room_anywhere_says_why() -> None:
    with pytest.raises(NoNodeAvailable, match="small .100 MiB free"):
        candidates([node("small", 100)], "t", 256, 3)
    with pytest.raises(NoNodeAvailable, match="no node of the cluster is alive"):
        candidates([], "t", 256, 3)


def test_best_of_k_samples_k_and_spreads_equals() -> None:
    rng = random.Random(7)
    nodes = [node(f"n{i}", 8000 + i) for i in range(100)]  # within one headroom step, as busy: equals
    firsts = Counter(candidates(nodes, "t", 256, 3, rng)[0].name for _ in range(3000))
    assert len(firsts) > 90, "equal nodes must share the creates"
    assert max(firsts.values()) < 100
    assert len(candidates(nodes, "t", 256, 3, rng)) == 3


def test_snapshots_go_only_where_they_are() -> None:
    nodes = [node("a", 30000), node("b", 1000, snapshots=["snap"])]
    assert [n.name for n in candidates(nodes, "snap", 256, 3)] == ["b"]
    with pytest.raises(NoNodeAvailable):
        candidates([node("a", 30000), node("b", 100, snapshots=["snap"])], "snap", 256, 3)


def test_among_equals_fewer_sandboxes_first() -> None:
    nodes = [node("busy", 8000, sandboxes=9), node("idle", 8100, sandboxes=1), node("mid", 8050, sandboxes=4)]
    assert [n.name for n in candidates(nodes, "t", 256, 3)] == ["idle", "mid", "busy"]
