"""MetricsSampler without VMs: sandboxes are stand-ins whose "agent" answers ``metrics()`` as told.

Covers the sample parsing (CPU from the guest's raw counters, sanity checks on what a hostile
guest may answer), the schedule (due samples, the budget, paused and ended sandboxes), the ring
bound, backoff of failing agents, and that a hanging agent holds up no other sandbox.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from trenvx.sandbox.metrics_sampler import BadSample, MetricsSampler, parse_sample

GOOD = {"cpu_count": 99, "cpu_used_pct": 12.5, "cpu_ticks_total": 1000, "cpu_ticks_idle": 900,
        "mem_total": 512 << 20, "mem_used": 100 << 20, "mem_cache": 10 << 20,
        "disk_total": 1 << 30, "disk_used": 300 << 20}


@dataclass
class FakeAgent:
    answers: list[Any] = field(default_factory=list)
    """Popped one per call; an Exception is raised; ``"hang"`` never answers."""
    calls: int = 0

    async def metrics(self) -> Any:
        self.calls += 1
        a = self.answers.pop(0) if len(self.answers) > 1 else (self.answers[0] if self.answers else dict(GOOD))
        if a == "hang":
            await asyncio.Event().wait()
        if isinstance(a, Exception):
            raise a
        return a


@dataclass
class FakeSandbox:
    id: str
    agent: FakeAgent = field(default_factory=FakeAgent)
    paused: bool = False
    ending: bool = False
    vcpu: int = 2


def sampler_over(boxes: dict[str, FakeSandbox], **kw: Any) -> MetricsSampler:
    """A sampler over ``boxes``; without a budget to speak of unless the test sets one."""
    kw.setdefault("max_per_s", 1e6)
    return MetricsSampler(lambda: list(boxes.values()), lambda sb: sb.vcpu, **kw)


# -- parsing ----------------------------------------------------------------------------------

def test_first_sample_uses_the_agents_cpu_figure_and_the_hosts_vcpus_and_clock() -> None:
    s, ticks = parse_sample(GOOD, 1234.5, 2, None)
    assert (s.t, s.cpu_count, s.cpu_used_pct) == (1234.5, 2, 12.5)
    assert (s.mem_total, s.mem_used, s.mem_cache, s.disk_total, s.disk_used) == (
        512 << 20, 100 << 20, 10 << 20, 1 << 30, 300 << 20)
    assert ticks == (1000, 900)


def test_cpu_between_samples_comes_from_the_raw_counters() -> None:
    raw = {**GOOD, "cpu_used_pct": 99.0, "cpu_ticks_total": 2000, "cpu_ticks_idle": 1500}
    s, _ = parse_sample(raw, 0, 2, (1000, 900))
    assert s.cpu_used_pct == 40.0  # 1000 ticks passed, 600 of them idle
    idle_only, _ = parse_sample({**raw, "cpu_ticks_total": 1000, "cpu_ticks_idle": 900}, 0, 2, (1000, 900))
    assert idle_only.cpu_used_pct == 0.0  # no guest time passed (paused in between)


def test_an_agent_without_counters_falls_back_and_cpu_is_clamped() -> None:
    old = {k: v for k, v in GOOD.items() if not k.startswith("cpu_ticks")}
    s, ticks = parse_sample({**old, "cpu_used_pct": 250.0}, 0, 1, (1, 1))
    assert ticks is None and s.cpu_used_pct == 100.0
    s, _ = parse_sample({**old, "cpu_used_pct": -3}, 0, 1, None)
    assert s.cpu_used_pct == 0.0
    # counters going backwards (a lying guest): the agent's own figure, clamped
    s, _ = parse_sample({**GOOD, "cpu_ticks_total": 10, "cpu_ticks_idle": 5}, 0, 1, (1000, 900))
    assert s.cpu_used_pct == 12.5


@pytest.mark.parametrize("raw", [
    [], "x", None,
    {**GOOD, "mem_used": -1}, {**GOOD, "mem_total": "512"}, {**GOOD, "mem_used": True},
    {**GOOD, "disk_used": float("nan")}, {**GOOD, "mem_total": 1 << 70}, {**GOOD, "cpu_used_pct": "high"},
    {k: v for k, v in GOOD.items() if k != "mem_total"},
])
def test_what_a_hostile_guest_answers_is_not_a_sample(raw: Any) -> None:
    with pytest.raises(BadSample):
        parse_sample(raw, 0, 1, None)


# -- the schedule -----------------------------------------------------------------------------

async def test_each_running_sandbox_is_sampled_when_due_and_kept_in_a_bounded_ring() -> None:
    boxes = {i: FakeSandbox(i) for i in ("a", "b")}
    sampler = sampler_over(boxes, interval_s=1e-9, keep=3)
    for _ in range(5):
        assert sorted(await sampler.run_once()) == ["a", "b"]
    assert len(sampler.samples("a")) == 3 and boxes["a"].agent.calls == 5
    ts = [s.t for s in sampler.samples("a")]
    assert ts == sorted(ts) and sampler.latest("a") == sampler.samples("a")[-1]
    assert sampler.samples("a", start=ts[1]) == sampler.samples("a")[1:]
    assert sampler.samples("nobody") == [] and sampler.latest("nobody") is None


async def test_a_sample_is_not_taken_again_before_the_interval() -> None:
    boxes = {"a": FakeSandbox("a")}
    sampler = sampler_over(boxes, interval_s=3600)
    assert await sampler.run_once() == ["a"]
    assert await sampler.run_once() == []
    assert boxes["a"].agent.calls == 1


async def test_paused_sandboxes_are_not_sampled_and_keep_their_ring() -> None:
    boxes = {"a": FakeSandbox("a")}
    sampler = sampler_over(boxes, interval_s=1e-9)
    await sampler.run_once()
    boxes["a"].paused = True
    assert await sampler.run_once() == [] and await sampler.sample_now(boxes["a"]) is None
    assert boxes["a"].agent.calls == 1 and len(sampler.samples("a")) == 1
    boxes["a"].paused = False
    assert await sampler.run_once() == ["a"] and len(sampler.samples("a")) == 2


async def test_ended_sandboxes_are_forgotten() -> None:
    boxes = {"a": FakeSandbox("a"), "b": FakeSandbox("b")}
    sampler = sampler_over(boxes, interval_s=1e-9)
    await sampler.run_once()
    boxes["b"].ending = True
    assert await sampler.run_once() == ["a"]  # ending: not sampled any more
    del boxes["b"]
    await sampler.run_once()
    assert sampler.samples("b") == [] and len(sampler.samples("a")) == 3


async def test_the_budget_stretches_the_interval_instead_of_the_cost() -> None:
    boxes = {str(i): FakeSandbox(str(i)) for i in range(10)}
    sampler = sampler_over(boxes, interval_s=5, max_per_s=3, tick_s=1.0)
    first = await sampler.run_once()
    assert len(first) == 3  # at most max_per_s * tick_s per pass
    second = await sampler.run_once()
    assert len(second) == 3 and not set(first) & set(second)  # the most overdue go first
    assert sampler.interval_for(10) == 5 and sampler.interval_for(30) == 10  # 3 samples a second at most


async def test_a_failing_agent_is_skipped_with_backoff_and_counted() -> None:
    boxes = {"a": FakeSandbox("a", FakeAgent([RuntimeError("agent down")]))}
    sampler = sampler_over(boxes, interval_s=60)
    await sampler.run_once()
    assert sampler.failures == 1 and sampler.samples("a") == []
    assert await sampler.run_once() == []  # backing off (2 intervals)
    boxes["a"].agent.answers = [dict(GOOD)]
    assert await sampler.sample_now(boxes["a"]) is not None and len(sampler.samples("a")) == 1


async def test_a_hanging_agent_holds_up_no_other_sandbox() -> None:
    boxes = {"slow": FakeSandbox("slow", FakeAgent(["hang"])), "ok": FakeSandbox("ok")}
    sampler = sampler_over(boxes, interval_s=1e-9, timeout_s=0.2, max_inflight=1)
    await asyncio.wait_for(sampler.run_once(), 10)
    assert len(sampler.samples("ok")) == 1 and sampler.samples("slow") == [] and sampler.failures == 1


async def test_sample_now_joins_a_sample_in_flight() -> None:
    gate = asyncio.Event()

    class GatedAgent(FakeAgent):
        async def metrics(self) -> Any:
            self.calls += 1
            await gate.wait()
            return dict(GOOD)

    sb = FakeSandbox("a", GatedAgent())
    sampler = sampler_over({"a": sb}, interval_s=3600)
    first = asyncio.ensure_future(sampler.sample_now(sb))
    second = asyncio.ensure_future(sampler.sample_now(sb))
    await asyncio.sleep(0)
    gate.set()
    assert (await first) is (await second) and sb.agent.calls == 1


async def test_start_and_stop_leave_no_task_behind() -> None:
    boxes = {"a": FakeSandbox("a", FakeAgent(["hang"]))}
    sampler = sampler_over(boxes, tick_s=0.01)
    sampler.start()
    while boxes["a"].agent.calls == 0:
        await asyncio.sleep(0.01)
    await sampler.stop()
    mine = [t for t in asyncio.all_tasks() if t.get_name().startswith(("metrics-", "trenvx-metrics"))]
    assert all(t.done() for t in mine)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        MetricsSampler(list, lambda sb: 1, interval_s=0)
