"""What the benchmark scripts share: percentiles, and running ``main`` so that Ctrl-C or SIGTERM
cancels it (its ``finally`` blocks then stop every backend and sandbox it started)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
"""Where a benchmark's JSON goes unless ``--json`` names a file."""


def pct(xs: list[float], p: float) -> float:
    """The ``p``-th percentile of ``xs`` (linear interpolation); NaN when empty."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def summary(xs: list[float]) -> dict[str, float]:
    """n, p50, p99 and max of ``xs`` (NaN for an empty list)."""
    return {"n": len(xs), "p50": pct(xs, 50), "p99": pct(xs, 99), "max": max(xs) if xs else float("nan")}


def summarize_rounds(rounds: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """:func:`summary` of each measurement over the rounds that have it (some run only every K-th
    round), in the order the measurements first appear."""
    keys = list(dict.fromkeys(k for r in rounds for k in r))
    return {k: summary([r[k] for r in rounds if k in r]) for k in keys}


def run_cancellable(main: Callable[[], Awaitable[int]]) -> int:
    """``asyncio.run(main())``, cancelled on SIGINT/SIGTERM; exit status 130 when interrupted."""

    async def guarded() -> int:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)  # type: ignore[union-attr]
        try:
            return await main()
        except asyncio.CancelledError:
            print("interrupted: everything started was stopped", file=sys.stderr)
            return 130

    return asyncio.run(guarded())


def config_as_toml_data(cfg: Any) -> dict[str, Any]:
    """A :class:`trenvx.config.Config` as the dict a config file holds (``tomli_w.dumps`` of it is
    loadable by ``trenvx serve --config``): template tables without their derived ``name``."""
    data = cfg.model_dump(mode="json", exclude_none=True)
    for t in data.get("template", {}).values():
        t.pop("name", None)
    return data


def write_results(name: str, data: dict[str, Any], json_arg: str = "") -> Path:
    """``data`` as JSON in ``json_arg`` or, without one, ``results/<name>-<UTC time>.json``."""
    path = Path(json_arg) if json_arg else RESULTS / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def solo_backend_config(base: Any, template: str, port: int, pool: Any = None) -> Any:
    """``base`` (a :class:`trenvx.config.Config`) as a benchmark's own backend serves it: on
    127.0.0.1:``port``, no API key, long sandbox timeouts, nothing kept at exit, and ``pool`` for
    ``template`` (default: no pool, so every create is a cold restore, a new VMM process)."""
    from trenvx.config import PoolConfig

    orch = base.orchestrator.model_copy(update={"port": port, "host": "127.0.0.1", "api_key": "",
                                                "max_timeout_s": 3600, "keep_on_exit": False})
    pool = pool or PoolConfig(templates=[template], warm_min=0, warm_max=0, hot_min=0, hot_max=0)
    return base.model_copy(update={"orchestrator": orch, "pool": pool})
