"""Event-loop lag: how late the loop wakes a task that asked to sleep, which every coroutine suffers alike.

The thermal governor, power negotiation and every HTTP stream share this loop, so its lag is the agent's most
honest health figure; /v1/health reports percentiles over a recent window.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

# 50 samples per second: fine enough to catch a 10 ms stall, cheap enough to run forever.
_INTERVAL_S = 0.02
_WINDOW_S = 60.0


class EventLoopMonitor:
    """Samples scheduling lag continuously; `report()` summarises the last minute."""

    def __init__(self, interval: float = _INTERVAL_S, window: float = _WINDOW_S) -> None:
        self.interval = interval
        self.window = window
        self._samples: deque[tuple[float, float]] = deque(maxlen=int(window / interval) + 1)

    async def run(self) -> None:
        """Measure until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(self.interval)
            woke = loop.time()
            self._samples.append((woke, max(0.0, woke - asked - self.interval)))

    def report(self) -> dict[str, Any]:
        """Lag percentiles in milliseconds over the window."""
        if not self._samples:
            return {"window_s": self.window, "samples": 0}
        newest = self._samples[-1][0]
        lags = sorted(lag for at, lag in self._samples if newest - at <= self.window)

        def percentile(p: float) -> float:
            return round(lags[min(len(lags) - 1, int(p * len(lags)))] * 1000, 3)

        return {
            "lag_p50_ms": percentile(0.50),
            "lag_p99_ms": percentile(0.99),
            "lag_max_ms": round(lags[-1] * 1000, 3),
            "window_s": self.window,
            "samples": len(lags),
        }
