"""Applies the thermal governor: merges every thermal source's zones, and turns level changes into actions.

The governor (governor.py) is pure; this is where its decisions reach the engine and the fan, and where every
transition becomes a log event. A source that fails reports all of its zones as unreadable, so the governor's
fail-safe sees a dead sensor as a hot one.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol

import structlog

from agent.hardware.governor import (
    GovernorConfig,
    ThermalActions,
    ThermalGovernor,
    ThermalLevel,
    Transition,
    actions_for,
)
from drivers.base import DriverError, FanControl

log = structlog.get_logger("agent.hardware.thermal")

# What a client sees while inference is stopped for heat: come back when the box has had time to cool.
_EMERGENCY_RETRY_AFTER_S = 30


class InferenceControl(Protocol):
    """What thermal policy may do to the inference engine (agent.engine.controls.EngineControls implements it)."""

    def set_concurrency(self, limit: int) -> None: ...

    def suspend(self, reason: str, *, code: str, retry_after: int = 30) -> None: ...

    def resume(self) -> None: ...

    def pause_builds(self, paused: bool) -> None: ...


Spawn = Callable[[Coroutine[Any, Any, None], str], object]


class ThermalControl:
    """Feeds readings to the governor and applies the actions of the level it decides."""

    def __init__(
        self,
        governor: ThermalGovernor,
        engines: list[InferenceControl],
        max_batch: int,
        fan: FanControl | None,
        spawn: Spawn,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.governor = governor
        self._engines = engines
        self._max_batch = max_batch
        self._fan = fan
        self._spawn = spawn
        self._clock = clock
        self._zones: dict[str, dict[str, float | None]] = {}
        self.actions = actions_for(ThermalLevel.NORMAL, max_batch)
        self.transitions: deque[dict[str, Any]] = deque(maxlen=20)
        self._fan_profile = "default"
        self._fan_lock = asyncio.Lock()

    def attach(self, engine: InferenceControl) -> None:
        """An engine started after the box came up (a model placed here) follows the current thermal level."""
        self._engines.append(engine)
        self._apply_to(engine, self.actions, resuming=False)

    def detach(self, engine: InferenceControl) -> None:
        if engine in self._engines:
            self._engines.remove(engine)

    def set_thresholds(self, config: GovernorConfig) -> None:
        """New governor thresholds (a live config change); they decide from the next reading on."""
        self.governor.reconfigure(config)
        log.info(
            "thermal_thresholds_changed",
            warm_c=config.warm_c,
            throttle_c=config.throttle_c,
            hot_c=config.hot_c,
            hysteresis_c=config.hysteresis_c,
            min_dwell_s=config.min_dwell_s,
        )

    def on_readings(self, source: str, readings: Mapping[str, float | None]) -> None:
        """A thermal source's fresh zone readings."""
        self._zones[source] = dict(readings)
        self._evaluate()

    def on_source_failure(self, source: str, _error: DriverError) -> None:
        """A thermal source failed to read: its zones count as unreadable."""
        self._zones[source] = {zone: None for zone in self._zones.get(source, {})} or {f"{source}:*": None}
        self._evaluate()

    def _evaluate(self) -> None:
        merged: dict[str, float | None] = {}
        for readings in self._zones.values():
            merged.update(readings)
        for transition in self.governor.update(merged, self._clock()):
            self._record(transition)
        actions = actions_for(self.governor.level, self._max_batch)
        if actions != self.actions:
            self._apply(actions)

    def _record(self, transition: Transition) -> None:
        event = {
            "group": transition.group,
            "from": transition.previous.label,
            "to": transition.level.label,
            "temperature_c": None if transition.temperature_c is None else round(transition.temperature_c, 2),
            "reason": transition.reason,
        }
        self.transitions.append({**event, "at_unix": round(time.time(), 3)})
        log_method = log.warning if transition.level > transition.previous else log.info
        log_method("thermal_level_changed", **event)

    def _apply(self, actions: ThermalActions) -> None:
        previous, self.actions = self.actions, actions
        for engine in self._engines:
            self._apply_to(engine, actions, resuming=previous.stop_inference)
        log.info(
            "thermal_actions_applied",
            max_concurrency=actions.max_concurrency,
            builds_paused=actions.builds_paused,
            fan_profile=actions.fan_profile,
            inference_stopped=actions.stop_inference,
        )
        if self._fan is not None and actions.fan_profile != self._fan_profile:
            self._fan_profile = actions.fan_profile
            self._spawn(self._set_fan(actions.fan_profile), "fan-profile")

    def _apply_to(self, engine: InferenceControl, actions: ThermalActions, *, resuming: bool) -> None:
        if actions.stop_inference:
            engine.suspend(
                f"the box is too hot ({self._hottest()}); inference resumes when it has cooled",
                code="thermal_emergency",
                retry_after=_EMERGENCY_RETRY_AFTER_S,
            )
        else:
            if resuming:
                engine.resume()
            engine.set_concurrency(actions.max_concurrency)
        engine.pause_builds(actions.builds_paused)

    async def _set_fan(self, profile: str) -> None:
        assert self._fan is not None
        async with self._fan_lock:
            if profile != self._fan_profile:
                return  # a newer decision superseded this one while it waited
            try:
                await self._fan.set_profile(profile)
            except DriverError as exc:
                log.warning("fan_profile_failed", profile=profile, error=str(exc))

    def _hottest(self) -> str:
        hottest = self.governor.hottest_c
        return "sensors unreadable" if hottest is None else f"{hottest:.1f} C"

    def report(self) -> dict[str, Any]:
        """The thermal part of /v1/health."""
        hottest = self.governor.hottest_c
        return {
            "temperature_c": None if hottest is None else round(hottest, 2),
            "level": self.governor.level.label,
            "groups": {name: level.label for name, level in self.governor.group_levels().items()},
            "zones": {
                zone: None if c is None else round(c, 2)
                for readings in self._zones.values()
                for zone, c in readings.items()
            },
            "actions": {
                "max_concurrency": self.actions.max_concurrency,
                "builds_paused": self.actions.builds_paused,
                "fan_profile": self.actions.fan_profile,
                "inference_stopped": self.actions.stop_inference,
            },
            "recent_transitions": list(self.transitions)[-5:],
        }
