"""Prometheus series of snapshots and forks, in the server's registry (``GET /metrics``):

- ``trenvx_snapshots_total{template,outcome}``: snapshots taken through the API (not a fork's);
- ``trenvx_forks_total{template,outcome}``: fork requests (outcome ``ok`` once the snapshot was
  taken, whatever became of its children);
- ``trenvx_fork_children_total{template,outcome}``: children asked for, ``ok`` or ``failed``;
- ``trenvx_snapshot_seconds{op}`` (histogram): a snapshot, or a fork until its last child answered;
- ``trenvx_snapshot_stopped_seconds{op}`` (histogram): how long the source sandbox stood still;
- ``trenvx_snapshot_stored_bytes_total{template}``: memory file and device state written;
- ``trenvx_snapshot_builds{state}`` (gauge): published snapshots, and ``unpublished`` builds still on
  disk (deleted ones a sandbox still uses, forks' snapshots with children running).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..sandbox.manager import SandboxManager
from ..sandbox.snapshots import SnapshotEvent
from ..template.store import MANIFEST, TemplateManifest

BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0)


class _SnapshotsOnDisk(Collector):
    def __init__(self, manager: SandboxManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("trenvx_snapshot_builds", "Snapshot builds on disk: published, or unpublished "
                                                      "(still used by a sandbox).", labels=["state"])
        published = len(self.manager.snapshots.list())
        on_disk = 0
        root = self.manager.data_root.templates
        for manifest in root.glob(f"*/*/{MANIFEST}") if root.is_dir() else ():
            if manifest.parent.is_symlink() or manifest.parent.name.startswith("."):
                continue  # a current link, a staging directory
            try:
                if TemplateManifest.model_validate_json(manifest.read_text()).snapshot is not None:
                    on_disk += 1
            except (OSError, ValueError):
                continue
        gauge.add_metric(["published"], published)
        gauge.add_metric(["unpublished"], max(0, on_disk - published))
        yield gauge


class SnapshotMetrics:
    def __init__(self, registry: CollectorRegistry, manager: SandboxManager) -> None:
        self.snapshots = Counter("trenvx_snapshots", "Snapshots of running sandboxes, by how they ended.",
                                 ["template", "outcome"], registry=registry)
        self.forks = Counter("trenvx_forks", "Fork requests, by how their snapshot ended.", ["template", "outcome"],
                             registry=registry)
        self.children = Counter("trenvx_fork_children", "Children asked of forks: started (ok) or failed.",
                                ["template", "outcome"], registry=registry)
        self.seconds = Histogram("trenvx_snapshot_seconds", "A snapshot, or a fork until its last child answered.",
                                 ["op"], buckets=BUCKETS, registry=registry)
        self.stopped = Histogram("trenvx_snapshot_stopped_seconds", "How long the source sandbox stood still.",
                                 ["op"], buckets=BUCKETS, registry=registry)
        self.stored = Counter("trenvx_snapshot_stored_bytes", "Bytes of memory file and device state written by "
                                                              "snapshots.", ["template"], registry=registry)
        registry.register(_SnapshotsOnDisk(manager))
        manager.snapshots.observers.append(self.observe)

    def observe(self, event: SnapshotEvent) -> None:
        counter = self.forks if event.op == "fork" else self.snapshots
        counter.labels(event.template, event.outcome).inc()
        if event.outcome != "ok":
            return
        if event.op == "fork":
            if event.children_ok:
                self.children.labels(event.template, "ok").inc(event.children_ok)
            if event.children - event.children_ok:
                self.children.labels(event.template, "failed").inc(event.children - event.children_ok)
        self.seconds.labels(event.op).observe(event.seconds)
        self.stopped.labels(event.op).observe(event.stopped_s)
        if event.stored_bytes:
            self.stored.labels(event.template).inc(event.stored_bytes)


def register_snapshot_metrics(registry: CollectorRegistry, manager: SandboxManager) -> SnapshotMetrics:
    return SnapshotMetrics(registry, manager)
