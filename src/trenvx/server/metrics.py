"""Prometheus metrics at ``GET /metrics`` (text exposition format).

Counters and histograms of creates come from the manager's create events
(:class:`trenvx.sandbox.manager.CreateEvent`); gauges (sandboxes running, pool sizes) are read at
scrape time. Every series is labelled with the template; create series also with ``source``:
``hot`` / ``warm`` (taken from a pool) or ``cold`` (restored into a new VMM process).

- ``trenvx_creates_total{template,source,outcome}``
- ``trenvx_create_seconds{template,source}``: create -> agent answered (histogram)
- ``trenvx_create_stage_seconds{stage,source}``: disk, spawn, load, resume, init (histogram)
- ``trenvx_sandboxes_running{template}``, ``trenvx_sandboxes_paused{template}``
- ``trenvx_paused_stored_bytes{template}``: bytes the paused sandboxes' memory takes on disk now
- ``trenvx_pauses_total{template,kind,reason,outcome}``, ``trenvx_resumes_total{template,kind,reason,outcome}``
  (kind: memory / filesystem; a resume: memory / boot; reason: requested, a pause's timeout (auto-pause),
  a resume's traffic (auto-resume)), ``trenvx_pause_seconds{kind}``,
  ``trenvx_resume_seconds{kind}`` (histograms), ``trenvx_pause_stored_bytes_total{template}``
- ``trenvx_pool_ready{template,tier}``, ``trenvx_pool_target{template,tier}``
- ``trenvx_pool_takes_total{template,result}``: hot, warm or miss
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..sandbox.manager import CreateEvent, SandboxManager, SuspendEvent
from .auth import require_api_key
from .models import Error

# Seconds: from a hot pool (a few ms) up to a cold boot (several seconds under TCG).
BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)


class _StateCollector(Collector):
    """Gauges read from the manager when scraped."""

    def __init__(self, manager: SandboxManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        sandboxes = self.manager.list()
        running = GaugeMetricFamily("trenvx_sandboxes_running", "Sandboxes running now.", labels=["template"])
        for template, n in sorted(Tally(sb.template for sb in sandboxes if not sb.paused).items()):
            running.add_metric([template], n)
        yield running
        paused = GaugeMetricFamily("trenvx_sandboxes_paused", "Sandboxes paused now.", labels=["template"])
        stored = GaugeMetricFamily("trenvx_paused_stored_bytes",
                                   "Bytes stored for the memory and device state of the sandboxes paused now.",
                                   labels=["template"])
        bytes_of: Tally[str] = Tally()
        for sb in sandboxes:
            if sb.paused:
                bytes_of[sb.template] += sb.pause_info.stored_bytes if sb.pause_info is not None else 0
        for template, n in sorted(Tally(sb.template for sb in sandboxes if sb.paused).items()):
            paused.add_metric([template], n)
            stored.add_metric([template], bytes_of[template])
        yield paused
        yield stored
        ready = GaugeMetricFamily("trenvx_pool_ready", "Pooled VMs ready to be taken.", labels=["template", "tier"])
        target = GaugeMetricFamily("trenvx_pool_target", "Size each pool tier is refilled to.", labels=["template", "tier"])
        takes = CounterMetricFamily("trenvx_pool_takes", "Creates served by a pool tier, or missed.",
                                    labels=["template", "result"])
        made = CounterMetricFamily("trenvx_pool_made", "VMs made by pool refills.", labels=["template", "tier"])
        for s in self.manager.pool_stats():
            ready.add_metric([s.template, "warm"], s.warm)
            ready.add_metric([s.template, "hot"], s.hot)
            target.add_metric([s.template, "warm"], s.target_warm)
            target.add_metric([s.template, "hot"], s.target_hot)
            for tier, n in s.hits.items():
                takes.add_metric([s.template, tier], n)
            takes.add_metric([s.template, "miss"], s.misses)
            for tier, n in s.made.items():
                made.add_metric([s.template, tier], n)
        yield ready
        yield target
        yield takes
        yield made


class ServerMetrics:
    """The server's registry; :meth:`observe` is registered as a create observer of the manager."""

    def __init__(self, manager: SandboxManager) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.creates = Counter("trenvx_creates", "Sandbox creates, by how they ended.",
                               ["template", "source", "outcome"], registry=self.registry)
        self.create_seconds = Histogram("trenvx_create_seconds", "Create -> agent answered, in seconds.",
                                        ["template", "source"], buckets=BUCKETS, registry=self.registry)
        self.stage_seconds = Histogram("trenvx_create_stage_seconds", "Seconds per stage on the create path.",
                                       ["stage", "source"], buckets=BUCKETS, registry=self.registry)
        self.pauses = Counter("trenvx_pauses", "Pauses to disk, by kind, why (requested or timeout) and how they "
                              "ended.", ["template", "kind", "reason", "outcome"], registry=self.registry)
        self.resumes = Counter("trenvx_resumes", "Resumes of paused sandboxes, by kind, why (requested or traffic) "
                               "and how they ended.", ["template", "kind", "reason", "outcome"], registry=self.registry)
        self.pause_seconds = Histogram("trenvx_pause_seconds", "Pause to disk, in seconds.", ["kind"],
                                       buckets=BUCKETS, registry=self.registry)
        self.resume_seconds = Histogram("trenvx_resume_seconds", "Resume -> agent answered, in seconds.", ["kind"],
                                        buckets=BUCKETS, registry=self.registry)
        self.stored = Counter("trenvx_pause_stored_bytes", "Bytes written by pauses (memory and device state).",
                              ["template"], registry=self.registry)
        self.registry.register(_StateCollector(manager))
        manager.observers.append(self.observe)
        manager.suspend_observers.append(self.observe_suspend)

    def observe(self, event: CreateEvent) -> None:
        self.creates.labels(event.template, event.source, event.outcome).inc()
        if event.outcome != "ok":
            return
        self.create_seconds.labels(event.template, event.source).observe(event.total_s)
        for stage, seconds in event.stages.items():
            self.stage_seconds.labels(stage, event.source).observe(seconds)

    def observe_suspend(self, event: SuspendEvent) -> None:
        counter, seconds = (self.pauses, self.pause_seconds) if event.op == "pause" else (self.resumes, self.resume_seconds)
        counter.labels(event.template, event.kind, event.reason, event.outcome).inc()
        if event.outcome != "ok":
            return
        seconds.labels(event.kind).observe(event.seconds)
        if event.stored_bytes:
            self.stored.labels(event.template).inc(event.stored_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)


router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics", dependencies=[Depends(require_api_key)], response_class=Response,
    summary="Prometheus metrics: creates, stage timings, sandboxes, pools",
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
               401: {"model": Error, "description": "Missing or invalid X-API-Key"}},
)
async def metrics(request: Request) -> Response:
    m: ServerMetrics = request.app.state.metrics
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)
