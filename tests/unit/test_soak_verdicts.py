"""The soak benchmark's growth verdicts (``benchmarks/soak.py``): a least-squares slope per hour and
a verdict that tells a leak from noise and from a bounded cache filling up."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
soak = pytest.importorskip("soak")


def series(f, n: int = 180, dt: float = 10.0) -> list[dict[str, float]]:  # noqa: ANN001
    """``n`` samples ``dt`` seconds apart of ``server_fds`` = f(t)."""
    return [{"t": i * dt, "server_fds": f(i * dt)} for i in range(n)]


def test_fit_recovers_a_known_slope() -> None:
    ts = [i * 10.0 for i in range(100)]
    f = soak.fit(ts, [5 + 0.01 * t for t in ts])  # 36 per hour, exactly
    assert f["slope_per_h"] == pytest.approx(36.0)
    assert f["stderr_per_h"] == pytest.approx(0.0, abs=1e-9)
    assert f["window_h"] == pytest.approx(990 / 3600)


def test_fit_needs_three_points() -> None:
    assert math.isnan(soak.fit([0.0, 1.0], [1.0, 2.0])["slope_per_h"])


def test_a_steady_leak_grows() -> None:
    rnd = random.Random(1)
    out = soak.analyse(series(lambda t: 40 + t / 30 + rnd.randint(-3, 3)), warmup_s=300)  # +120 fds/h
    assert out["server_fds"]["verdict"] == "grows"
    assert out["server_fds"]["fit_after_warmup"]["slope_per_h"] == pytest.approx(120, rel=0.1)


def test_noise_around_a_level_is_flat() -> None:
    rnd = random.Random(2)
    out = soak.analyse(series(lambda t: 40 + rnd.randint(-6, 6)), warmup_s=300)
    assert out["server_fds"]["verdict"] == "flat"


def test_growth_under_the_tolerance_is_flat() -> None:
    # +2 fds over the whole half hour: significant with no noise, but under the tolerance (4)
    out = soak.analyse(series(lambda t: 40 + 2 * t / 1800), warmup_s=0)
    assert out["server_fds"]["verdict"] == "flat"


def test_a_cache_filling_then_full_grew_then_flat() -> None:
    rnd = random.Random(3)
    out = soak.analyse(series(lambda t: 40 + min(t, 700) / 10 + rnd.randint(-2, 2)), warmup_s=0)
    assert out["server_fds"]["verdict"] == "grew, then flat"
    assert out["server_fds"]["max"] >= 108
