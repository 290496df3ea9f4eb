"""What the benchmark scripts share: percentiles, and running ``main`` so that Ctrl-C or SIGTERM
cancels it (its ``finally`` blocks then stop every backend and sandbox it started)."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any


def pct(xs: list[float], p: float) -> float:
    """The ``p``-th percentile of ``xs`` (linear interpolation); NaN when empty."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


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
