"""The systemd watchdog, fed only while the agent is really healthy.

A bare timer would keep pinging while the thermal governor or the power negotiation is wedged, as long as the timer
itself still runs. So each ping is conditional: (a) the event loop is not stuck (the ping task measures how late it
wakes up; a loop blocked by a stray synchronous call wakes it late), and (b) every registered subsystem has beaten
its heartbeat recently. When either fails the ping is withheld, systemd sees silence for WatchdogSec, sends SIGABRT
and `Restart=on-failure` starts a fresh agent. A loop that is blocked for good needs no check at all: it cannot run
this task, so it stops pinging by itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

import structlog

log = structlog.get_logger("agent.watchdog")


class WatchdogPinger(Protocol):
    """What the watchdog needs from the notifier (agent.systemd.SystemdNotifier is one)."""

    def watchdog(self) -> None: ...


class Heartbeat:
    """One subsystem's proof of life: it calls beat() at least every `timeout` seconds."""

    def __init__(self, name: str, timeout: float, clock: Callable[[], float]) -> None:
        self.name = name
        self.timeout = timeout
        self._clock = clock
        self.last_beat = clock()

    def beat(self) -> None:
        """Record that the subsystem is making progress."""
        self.last_beat = self._clock()

    def age(self) -> float:
        """Seconds since the last beat."""
        return self._clock() - self.last_beat


class Watchdog:
    """Pings systemd's watchdog every `interval` seconds while the loop is responsive and all heartbeats are fresh."""

    def __init__(
        self,
        notifier: WatchdogPinger,
        interval: float,
        *,
        max_loop_lag: float = 5.0,
        heartbeat_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0 or max_loop_lag <= 0 or heartbeat_timeout <= 0:
            raise ValueError("watchdog interval, max_loop_lag and heartbeat_timeout must be positive")
        self.interval = interval
        self.max_loop_lag = max_loop_lag
        self.heartbeat_timeout = heartbeat_timeout
        self._notifier = notifier
        # Heartbeat ages use `clock` (injectable for tests); loop lateness always uses the loop's own clock,
        # because that is the clock asyncio schedules the wake-ups by.
        self._clock = clock
        self._heartbeats: dict[str, Heartbeat] = {}
        self._stale: set[str] = set()

    def register(self, name: str, *, timeout: float | None = None) -> Heartbeat:
        """A new heartbeat for subsystem `name`, counted as just beaten; `timeout` overrides the default."""
        if name in self._heartbeats:
            raise ValueError(f"a heartbeat named {name!r} is already registered")
        heartbeat = Heartbeat(name, self.heartbeat_timeout if timeout is None else timeout, self._clock)
        self._heartbeats[name] = heartbeat
        return heartbeat

    def unregister(self, heartbeat: Heartbeat) -> None:
        """Stop watching a subsystem (it stopped on purpose, so its silence is no fault)."""
        if self._heartbeats.get(heartbeat.name) is heartbeat:
            del self._heartbeats[heartbeat.name]
            self._stale.discard(heartbeat.name)

    def stale(self) -> list[str]:
        """Names of the subsystems whose heartbeat is older than their timeout."""
        return [hb.name for hb in self._heartbeats.values() if hb.age() > hb.timeout]

    def check(self, loop_lag: float = 0.0) -> bool:
        """Whether a ping may go now, given the worst loop lag seen since the last one; logs why not."""
        healthy = True
        if loop_lag > self.max_loop_lag:
            healthy = False
            log.warning(
                "watchdog_withheld", reason="loop_lag", lag_s=round(loop_lag, 3), max_loop_lag_s=self.max_loop_lag
            )
        for heartbeat in self._heartbeats.values():
            age = heartbeat.age()
            if age > heartbeat.timeout:
                healthy = False
                # Once per stale episode: withheld pings repeat every interval until systemd restarts us.
                if heartbeat.name not in self._stale:
                    self._stale.add(heartbeat.name)
                    log.warning(
                        "watchdog_withheld",
                        reason="heartbeat_stale",
                        subsystem=heartbeat.name,
                        age_s=round(age, 3),
                        timeout_s=heartbeat.timeout,
                    )
            elif heartbeat.name in self._stale:
                self._stale.discard(heartbeat.name)
                log.info("watchdog_heartbeat_recovered", subsystem=heartbeat.name)
        return healthy

    async def run(self) -> None:
        """Ping at once, then every `interval` while healthy; runs until cancelled."""
        loop = asyncio.get_running_loop()
        # Probe more often than we ping: a block that starts and ends between two pings must still be seen.
        probe = min(self.interval, self.max_loop_lag / 2)
        worst_lag = 0.0
        next_ping = loop.time()
        while True:
            now = loop.time()
            if now >= next_ping:
                if self.check(worst_lag):
                    self._notifier.watchdog()
                worst_lag = 0.0
                next_ping = now + self.interval
            wake_at = min(next_ping, now + probe)
            await asyncio.sleep(wake_at - now)
            worst_lag = max(worst_lag, loop.time() - wake_at)
