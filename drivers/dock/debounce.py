"""Dock switch debouncing: a pure, clock-injected state machine, and the small asyncio pump that drives it.

A hall switch under a module snapping on chatters (the magnet wobbles through the switch's hysteresis band), and a
module slid across the top of the box passes its magnet over the switch without docking. Two stages separate them:

1. debounce: a raw level counts only once it has held for `debounce` seconds; shorter pulses are bounce.
2. confirm: "docked" is reported only after the debounced level has said "magnet present" for a further `confirm`
   seconds; a debounced "absent" is reported at once, because the agent must react quickly to a module being lifted.

`Debouncer` takes timestamps from its caller and never reads a clock, so the tables in its tests are exact. Every
event carries the time at which it became true (level change + debounce, or + debounce + confirm), not the time
somebody happened to look. `DebouncePump` binds one to an event loop: loop timers complete pending stages, and
confirmed events go to an asyncio queue that `events()` iterates. Both the GPIO driver and the sim twin use it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from drivers.base import DockEvent, DriverError, DriverStateError

DEFAULT_DEBOUNCE = 0.02
DEFAULT_CONFIRM = 0.3


class Debouncer:
    """Raw switch levels (True = magnet present) with timestamps in, confirmed DockEvents out."""

    def __init__(
        self,
        debounce: float = DEFAULT_DEBOUNCE,
        confirm: float = DEFAULT_CONFIRM,
        *,
        level: bool = False,
        at: float = 0.0,
    ) -> None:
        if debounce < 0 or confirm < 0:
            raise ValueError(f"debounce ({debounce}) and confirm ({confirm}) must be >= 0 seconds")
        self.debounce = debounce
        self.confirm = confirm
        # The initial level is taken as settled and already reported: a caller that wants an event for a
        # module present at start begins absent and feeds the level it reads.
        self._raw = level
        self._raw_since = at
        self._stable = level
        self._stable_since = at
        self._docked = level
        self._now = at

    @property
    def docked(self) -> bool:
        """The confirmed state: what has been reported."""
        return self._docked

    @property
    def level(self) -> bool:
        """The last raw level fed."""
        return self._raw

    @property
    def stable(self) -> bool:
        """The debounced level (held for at least `debounce`)."""
        return self._stable

    @property
    def now(self) -> float:
        """The latest time the machine has been advanced to."""
        return self._now

    def deadline(self) -> float | None:
        """When `poll` has something to do next (a pending level or confirmation), or None."""
        if self._raw != self._stable:
            return self._raw_since + self.debounce
        if self._stable and not self._docked:
            return self._stable_since + self.confirm
        return None

    def poll(self, now: float) -> list[DockEvent]:
        """Advance time to `now` and return the events that became true on the way, in order."""
        self._advance(now)
        events: list[DockEvent] = []
        while (due := self.deadline()) is not None and due <= now:
            if self._raw != self._stable:
                self._stable = self._raw
                self._stable_since = due
                if not self._stable and self._docked:
                    self._docked = False
                    events.append(DockEvent(docked=False, at=due))
            else:
                self._docked = True
                events.append(DockEvent(docked=True, at=due))
        return events

    def feed(self, level: bool, at: float) -> list[DockEvent]:
        """The switch read `level` at time `at` (not earlier than any time already fed or polled)."""
        events = self.poll(at)
        if level == self._raw:
            return events
        self._raw = level
        self._raw_since = at
        if level == self._stable and self._stable and not self._docked:
            # A bounce ended before it counted. If the confirmation came due during it, the magnet has now
            # been present (debounced) for longer than `confirm`: confirm at this instant, not at the old deadline,
            # because during the bounce it was not yet clear that the magnet was staying.
            if self._stable_since + self.confirm <= at:
                self._docked = True
                events.append(DockEvent(docked=True, at=at))
        return events

    def _advance(self, now: float) -> None:
        if now < self._now:
            raise ValueError(f"time went backwards: {now} after {self._now}")
        self._now = now


class DebouncePump:
    """Drives a Debouncer on the running loop: timers complete pending stages, events go to one queue."""

    def __init__(self, debouncer: Debouncer) -> None:
        self.debouncer = debouncer
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[DockEvent | DriverError | None] = asyncio.Queue()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closed = False

    @property
    def present(self) -> bool:
        """The confirmed dock state."""
        return self.debouncer.docked

    def feed(self, level: bool, at: float | None = None) -> None:
        """A raw level, read at loop time `at` (now when None); must be called on the loop thread."""
        if self._closed:
            return
        now = self._loop.time()
        # Kernel timestamps can trail what has already been polled by a timer, and never lie in the future.
        at = now if at is None else min(at, now)
        at = max(at, self.debouncer.now)
        self._publish(self.debouncer.feed(level, at))

    def fail(self, error: DriverError) -> None:
        """The source broke: iterators raise `error` after the events already queued."""
        if not self._closed:
            self._stop()
            self._queue.put_nowait(error)

    def close(self) -> None:
        """Stop timers; iterators end after the events already queued."""
        if not self._closed:
            self._stop()
            self._queue.put_nowait(None)

    async def events(self) -> AsyncIterator[DockEvent]:
        """Confirmed events in order, until close() (ends) or fail() (raises)."""
        while True:
            item = await self._queue.get()
            if item is None or isinstance(item, DriverError):
                # Leave the end marker for any later iterator.
                self._queue.put_nowait(item)
                if item is None:
                    return
                raise item
            yield item

    def _stop(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at = None

    def _publish(self, events: list[DockEvent]) -> None:
        for event in events:
            self._queue.put_nowait(event)
        self._schedule()

    def _schedule(self) -> None:
        due = self.debouncer.deadline()
        if due == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = due
        if due is not None:
            self._timer = self._loop.call_at(due, self._on_timer, due)

    def _on_timer(self, due: float) -> None:
        self._timer = self._timer_at = None
        # The loop may run a timer up to its clock resolution early; the deadline itself has certainly passed.
        self._publish(self.debouncer.poll(max(self._loop.time(), due, self.debouncer.now)))


def require_pump(pump: DebouncePump | None, name: str) -> DebouncePump:
    """The open driver's pump, or DriverStateError naming the driver."""
    if pump is None:
        raise DriverStateError(f"dock sensor {name} is not open; call open() first")
    return pump
