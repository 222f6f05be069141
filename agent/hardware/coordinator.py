"""Polls one hardware source on a fixed schedule and owns its availability.

Modelled on Home Assistant's update coordinator: a source that fails is logged once when it becomes unavailable
and once when it recovers, never on every poll, however flaky the bus. Polls run on a fixed-rate schedule
(start + k * interval, skipping missed slots), so the lateness of each poll against its slot is a true jitter
figure for the event loop and the bus; /v1/health reports it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import structlog

from drivers.base import Driver, DriverError, DriverState

log = structlog.get_logger("agent.hardware.drivers")

T = TypeVar("T")

_JITTER_WINDOW = 1000


class Coordinator(Generic[T]):
    """One polled source: `fetch()` every `interval` seconds; `on_data`/`on_failure` hear every outcome."""

    def __init__(
        self,
        name: str,
        driver: Driver,
        fetch: Callable[[], Awaitable[T]],
        interval: float,
        *,
        on_data: Callable[[T], None] | None = None,
        on_failure: Callable[[DriverError], None] | None = None,
        after_poll: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.driver = driver
        self.interval = interval
        self._fetch = fetch
        self._on_data = on_data
        self._on_failure = on_failure
        self._after_poll = after_poll
        self.data: T | None = None
        self.available = False
        self.last_error: str | None = None
        self.polls = 0
        self.failed_polls = 0
        self.outages = 0
        self._outage_started: float | None = None
        self._failed_in_outage = 0
        self._ever_polled = False
        self._lateness: deque[float] = deque(maxlen=_JITTER_WINDOW)

    async def run(self) -> None:
        """Poll until cancelled."""
        loop = asyncio.get_running_loop()
        next_slot = loop.time()
        while True:
            lateness = loop.time() - next_slot
            self._lateness.append(max(0.0, lateness))
            await self.poll_once()
            if self._after_poll is not None:
                self._after_poll()
            next_slot += self.interval
            now = loop.time()
            if next_slot < now:  # a slow poll: skip the slots it overran instead of bursting to catch up
                next_slot += ((now - next_slot) // self.interval + 1) * self.interval
            await asyncio.sleep(next_slot - now)

    async def poll_once(self) -> None:
        """One poll: (re)open the driver if needed, fetch, and update availability."""
        self.polls += 1
        try:
            if self.driver.state is not DriverState.OPEN:
                await self.driver.open()
            data = await self._fetch()
        except DriverError as exc:
            self._failed(exc)
            return
        self.data = data
        self._succeeded()
        if self._on_data is not None:
            self._on_data(data)

    def _failed(self, error: DriverError) -> None:
        self.failed_polls += 1
        self.last_error = f"{type(error).__name__}: {error}"
        if self.available or not self._ever_polled:
            self.available = False
            self.outages += 1
            self._outage_started = time.monotonic()
            self._failed_in_outage = 0
            log.warning("hardware_source_unavailable", source=self.name, driver=self.driver.name, error=self.last_error)
        self._ever_polled = True
        self._failed_in_outage += 1
        if self._on_failure is not None:
            self._on_failure(error)

    def _succeeded(self) -> None:
        if not self.available:
            if self._outage_started is not None:
                log.info(
                    "hardware_source_recovered",
                    source=self.name,
                    driver=self.driver.name,
                    outage_s=round(time.monotonic() - self._outage_started, 3),
                    failed_polls=self._failed_in_outage,
                )
            self._outage_started = None
            self.available = True
            self.last_error = None
        self._ever_polled = True

    def jitter_ms(self) -> dict[str, float]:
        """Poll lateness against the fixed schedule, over the last 1000 polls."""
        if not self._lateness:
            return {}
        ordered = sorted(self._lateness)

        def percentile(p: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 3)

        return {"p50": percentile(0.5), "p99": percentile(0.99), "max": round(ordered[-1] * 1000, 3)}

    def report(self) -> dict[str, Any]:
        """This source's part of /v1/health."""
        return {
            "driver": self.driver.name,
            "available": self.available,
            "state": self.driver.state.value,
            "interval_s": self.interval,
            "polls": self.polls,
            "failed_polls": self.failed_polls,
            "outages": self.outages,
            "last_error": self.last_error,
            "poll_jitter_ms": self.jitter_ms(),
        }
