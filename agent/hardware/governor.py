"""The thermal governor: a pure, clock-injected state machine per zone group, and the actions each level implies.

Levels, from cool to hot, and what the caller does at each (see `actions_for`):

- NORMAL: full service, fan on its default profile.
- WARM: the fan goes to the "cool" profile first, because airflow costs nothing in throughput and may stop the climb.
- THROTTLE: the fan is at "max" and inference concurrency is halved, because the engine is what makes the heat; engine
  (TensorRT) builds pause, because a build is a long full-GPU burst that nobody is waiting for.
- HOT: one request at a time; builds stay paused. Still serving, but at the lowest heat that keeps the box useful.
- EMERGENCY: inference stops cleanly (in-flight requests end with an error event, state is persisted) a few degrees
  below the kernel's critical trip, so that we stop the work before the kernel's hardware-protection shutdown does.

Each zone group (for example "cpu" and "gpu", selected by fnmatch patterns over thermal zone names, like nvfancontrol's
THERMAL_GROUP) has its own state machine driven by its hottest valid zone; the box's level is the hottest group's.

Stepping up is immediate, straight to the highest level whose entry threshold is reached, because heat is the danger:
a late reaction costs hardware or a kernel shutdown, an early one costs only some throughput. Stepping down waits
twice: the temperature must fall to the entry threshold minus the hysteresis, and the group must have spent
`min_dwell_s` in its current level. Without both, a temperature that hovers at a threshold would flap the fan and the
engine's concurrency on every poll. A sensor that stops answering is treated as hot (fail-safe): not knowing the
temperature must never look like being cool.

The governor does no I/O, no logging and never reads a clock: `update()` takes the readings and the time and returns
the transitions, which the caller logs, publishes and acts on.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from types import MappingProxyType
from typing import Literal

__all__ = [
    "GovernorConfig",
    "ThermalActions",
    "ThermalGovernor",
    "ThermalLevel",
    "Transition",
    "TransitionReason",
    "actions_for",
]


class ThermalLevel(enum.IntEnum):
    """How hot a zone group is, in increasing order of severity."""

    NORMAL = 0
    WARM = 1
    THROTTLE = 2
    HOT = 3
    EMERGENCY = 4

    @property
    def label(self) -> str:
        """The lower-case name, for health output and logs."""
        return self.name.lower()


TransitionReason = Literal["rising", "falling", "sensor_unreadable", "sensor_recovered"]

_RAISED = (ThermalLevel.WARM, ThermalLevel.THROTTLE, ThermalLevel.HOT, ThermalLevel.EMERGENCY)


def _default_groups() -> Mapping[str, tuple[str, ...]]:
    return {"soc": ("*",)}


@dataclass(frozen=True)
class GovernorConfig:
    """Thresholds (degrees Celsius), hysteresis, dwell and zone groups of the thermal governor."""

    warm_c: float = 70.0
    throttle_c: float = 80.0
    hot_c: float = 88.0
    # EMERGENCY is entered this far below the group's critical trip (the kernel's, or default_critical_c).
    emergency_margin_c: float = 5.0
    # Used when the kernel reports no critical trip for any zone of a group.
    default_critical_c: float = 105.0
    # A level is left only once the temperature is at or below its entry threshold minus this.
    hysteresis_c: float = 5.0
    # Minimum time in a level before stepping down; stepping up never waits.
    min_dwell_s: float = 10.0
    # Consecutive updates without a valid reading for a group before it is treated as hot.
    fail_safe_after: int = 3
    fail_safe_level: ThermalLevel = ThermalLevel.HOT
    # Readings outside this range are implausible (jtop reports unreadable zones as -256) and count as unreadable.
    min_valid_c: float = -40.0
    max_valid_c: float = 150.0
    # Group name -> fnmatch patterns over zone names; a zone belongs to the first group that matches.
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=_default_groups, hash=False)

    def __post_init__(self) -> None:
        for name in (
            "warm_c",
            "throttle_c",
            "hot_c",
            "emergency_margin_c",
            "default_critical_c",
            "hysteresis_c",
            "min_dwell_s",
            "min_valid_c",
            "max_valid_c",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not self.throttle_c > self.warm_c:
            raise ValueError(f"throttle_c ({self.throttle_c}) must be above warm_c ({self.warm_c})")
        if not self.hot_c > self.throttle_c:
            raise ValueError(f"hot_c ({self.hot_c}) must be above throttle_c ({self.throttle_c})")
        if self.emergency_margin_c < 0:
            raise ValueError(f"emergency_margin_c must be >= 0, got {self.emergency_margin_c}")
        emergency = self.default_critical_c - self.emergency_margin_c
        if not emergency > self.hot_c:
            raise ValueError(
                f"default_critical_c - emergency_margin_c ({emergency}) must be above hot_c ({self.hot_c}); "
                "raise default_critical_c or lower emergency_margin_c"
            )
        if not self.hysteresis_c > 0:
            raise ValueError(f"hysteresis_c must be > 0, got {self.hysteresis_c}")
        gap = min(self.throttle_c - self.warm_c, self.hot_c - self.throttle_c, emergency - self.hot_c)
        if not self.hysteresis_c < gap:
            raise ValueError(
                f"hysteresis_c ({self.hysteresis_c}) must be smaller than the smallest gap between adjacent "
                f"thresholds ({gap})"
            )
        if self.min_dwell_s < 0:
            raise ValueError(f"min_dwell_s must be >= 0, got {self.min_dwell_s}")
        after = self.fail_safe_after
        if isinstance(after, bool) or not isinstance(after, int) or after < 1:
            raise ValueError(f"fail_safe_after must be an integer >= 1, got {after!r}")
        # A plain int (as read from a TOML file) is accepted and becomes the ThermalLevel it names.
        level = self.fail_safe_level
        if isinstance(level, bool) or level not in tuple(ThermalLevel):
            raise ValueError(f"fail_safe_level must be a ThermalLevel (0 to 4), got {level!r}")
        object.__setattr__(self, "fail_safe_level", ThermalLevel(level))
        if not self.min_valid_c < self.warm_c:
            raise ValueError(f"min_valid_c ({self.min_valid_c}) must be below warm_c ({self.warm_c})")
        if not self.max_valid_c >= self.default_critical_c:
            raise ValueError(
                f"max_valid_c ({self.max_valid_c}) must be at least default_critical_c ({self.default_critical_c})"
            )
        object.__setattr__(self, "groups", MappingProxyType(self._checked_groups()))

    def _checked_groups(self) -> dict[str, tuple[str, ...]]:
        if not isinstance(self.groups, Mapping) or not self.groups:
            raise ValueError("groups must be a non-empty mapping of group name -> zone name patterns")
        checked: dict[str, tuple[str, ...]] = {}
        for name, patterns in self.groups.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"groups: group names must be non-empty strings, got {name!r}")
            # A bare string is a sequence too, of one-character patterns: refuse it rather than match nearly anything.
            pattern_tuple = () if isinstance(patterns, str) else tuple(patterns)
            if not pattern_tuple or not all(isinstance(p, str) and p for p in pattern_tuple):
                raise ValueError(
                    f"groups[{name!r}] must be a non-empty sequence of non-empty fnmatch patterns, got {patterns!r}"
                )
            checked[name] = pattern_tuple
        return checked

    def entry_thresholds(self, critical_c: float | None = None) -> dict[ThermalLevel, float]:
        """Entry temperature of each raised level, for a group whose critical trip is `critical_c` (None: default)."""
        emergency = (self.default_critical_c if critical_c is None else critical_c) - self.emergency_margin_c
        # A kernel trip lower than our own thresholds wins: every threshold is capped at EMERGENCY's, so the levels
        # stay ordered and we still stop before the kernel shuts the box down.
        return {
            ThermalLevel.WARM: min(self.warm_c, emergency),
            ThermalLevel.THROTTLE: min(self.throttle_c, emergency),
            ThermalLevel.HOT: min(self.hot_c, emergency),
            ThermalLevel.EMERGENCY: emergency,
        }


@dataclass(frozen=True)
class Transition:
    """One group's change of level, for the caller to log, publish and act on."""

    group: str
    previous: ThermalLevel
    level: ThermalLevel
    # The group's hottest valid zone at the time; None when the change is the sensor fail-safe.
    temperature_c: float | None
    reason: TransitionReason
    at: float


@dataclass
class _GroupState:
    entries: dict[ThermalLevel, float]
    since: float  # when the group entered its current level (or was first seen)
    level: ThermalLevel = ThermalLevel.NORMAL
    temperature_c: float | None = None
    unreadable: int = 0
    # Set while the level is held by the fail-safe rather than by a temperature; the step that releases it is
    # reported as sensor_recovered.
    failed_safe: bool = False


class ThermalGovernor:
    """Per-group thermal levels from zone readings: immediate up, hysteresis and dwell down, fail-safe when blind."""

    def __init__(self, config: GovernorConfig, critical_trips: Mapping[str, float] | None = None) -> None:
        """`critical_trips` maps zone name -> the kernel's critical trip (deg C); a group uses its zones' lowest."""
        self._config = config
        self._zone_groups: dict[str, str | None] = {}
        self._criticals: dict[str, float] = {}
        for zone, trip in (critical_trips or {}).items():
            group = self._group_of(zone)
            if group is None or isinstance(trip, bool) or not isinstance(trip, (int, float)) or not math.isfinite(trip):
                continue
            self._criticals[group] = min(trip, self._criticals.get(group, math.inf))
        self._states: dict[str, _GroupState] = {}
        self._hottest_c: float | None = None
        self._last_now: float | None = None

    @property
    def config(self) -> GovernorConfig:
        """The configuration this governor runs with."""
        return self._config

    def reconfigure(self, config: GovernorConfig) -> None:
        """New thresholds from the next update on; levels are kept and left by the new hysteresis and dwell rules."""
        if dict(config.groups) != dict(self._config.groups):
            raise ValueError("zone groups cannot change while the governor runs")
        self._config = config
        for name, state in self._states.items():
            state.entries = self.thresholds(name)

    @property
    def level(self) -> ThermalLevel:
        """The box's level: the hottest group's (NORMAL before any group has been seen)."""
        return max((state.level for state in self._states.values()), default=ThermalLevel.NORMAL)

    @property
    def hottest_c(self) -> float | None:
        """The hottest valid governed zone of the last update, or None if there was none."""
        return self._hottest_c

    def group_levels(self) -> dict[str, ThermalLevel]:
        """The level of each group that has ever had a zone, in configuration order."""
        return {name: state.level for name, state in self._states.items()}

    def group_temperatures(self) -> dict[str, float | None]:
        """Each seen group's temperature (hottest valid zone) in the last update; None when it had no valid zone."""
        return {name: state.temperature_c for name, state in self._states.items()}

    def thresholds(self, group: str) -> dict[ThermalLevel, float]:
        """The entry thresholds in force for a configured group (its EMERGENCY follows the kernel's critical trip)."""
        if group not in self._config.groups:
            raise KeyError(f"unknown thermal group {group!r}; configured: {', '.join(self._config.groups)}")
        return self._config.entry_thresholds(self._criticals.get(group))

    def update(self, readings: Mapping[str, float | None], now: float) -> list[Transition]:
        """Feed one poll (zone -> deg C, None = offline; absent zones are unreadable) at time `now` (seconds)."""
        if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
            raise ValueError(f"now must be a finite number of seconds, got {now!r}")
        if self._last_now is not None and now < self._last_now:
            raise ValueError(
                f"now ({now}) went backwards from the previous update ({self._last_now}); use a monotonic clock"
            )
        self._last_now = now

        present: set[str] = set()
        hottest: dict[str, float] = {}
        for zone, value in readings.items():
            group = self._group_of(zone)
            if group is None:
                continue
            present.add(group)
            if value is not None and self._valid(value):
                hottest[group] = max(value, hottest.get(group, value))
        self._hottest_c = max(hottest.values(), default=None)

        transitions: list[Transition] = []
        for name in self._config.groups:
            state = self._states.get(name)
            if state is None:
                if name not in present:
                    continue  # a group that never matched a zone is not watched, so any machine works by default
                state = _GroupState(entries=self.thresholds(name), since=now)
                self._states[name] = state
            temperature = hottest.get(name)
            state.temperature_c = temperature
            if temperature is None:
                transition = self._unreadable(name, state, now)
            else:
                transition = self._readable(name, state, temperature, now)
            if transition is not None:
                state.level = transition.level
                state.since = now
                state.failed_safe = transition.reason == "sensor_unreadable"
                transitions.append(transition)
        return transitions

    def _readable(self, name: str, state: _GroupState, temperature: float, now: float) -> Transition | None:
        state.unreadable = 0
        implied = ThermalLevel.NORMAL
        for level in _RAISED:
            if temperature >= state.entries[level]:
                implied = level
        if implied > state.level:
            return Transition(name, state.level, implied, temperature, "rising", now)
        target = state.level
        while target > ThermalLevel.NORMAL and temperature <= state.entries[target] - self._config.hysteresis_c:
            target = ThermalLevel(target - 1)
        if target == state.level:
            state.failed_safe = False  # the temperature itself now holds this level
            return None
        if now - state.since < self._config.min_dwell_s:
            return None
        reason: TransitionReason = "sensor_recovered" if state.failed_safe else "falling"
        return Transition(name, state.level, target, temperature, reason, now)

    def _unreadable(self, name: str, state: _GroupState, now: float) -> Transition | None:
        state.unreadable = min(state.unreadable + 1, self._config.fail_safe_after)
        if state.unreadable < self._config.fail_safe_after:
            return None  # hold the level: a missed poll or two is not yet an emergency
        state.failed_safe = True
        target = max(state.level, self._config.fail_safe_level)
        if target == state.level:
            return None
        return Transition(name, state.level, target, None, "sensor_unreadable", now)

    def _group_of(self, zone: str) -> str | None:
        try:
            return self._zone_groups[zone]
        except KeyError:
            pass
        group = next(
            (name for name, patterns in self._config.groups.items() if any(fnmatchcase(zone, p) for p in patterns)),
            None,
        )
        self._zone_groups[zone] = group
        return group

    def _valid(self, value: float) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return math.isfinite(value) and self._config.min_valid_c <= value <= self._config.max_valid_c


@dataclass(frozen=True)
class ThermalActions:
    """What the rest of the agent does at a thermal level."""

    # Most requests the engine runs at once; 0 means inference is stopped.
    max_concurrency: int
    builds_paused: bool
    fan_profile: Literal["default", "cool", "max"]
    stop_inference: bool


def actions_for(level: ThermalLevel, max_batch: int) -> ThermalActions:
    """The actions for `level`, given the engine's configured `max_batch` (>= 1)."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if level == ThermalLevel.NORMAL:
        return ThermalActions(max_batch, builds_paused=False, fan_profile="default", stop_inference=False)
    if level == ThermalLevel.WARM:
        return ThermalActions(max_batch, builds_paused=False, fan_profile="cool", stop_inference=False)
    if level == ThermalLevel.THROTTLE:
        return ThermalActions(max(1, max_batch // 2), builds_paused=True, fan_profile="max", stop_inference=False)
    if level == ThermalLevel.HOT:
        return ThermalActions(1, builds_paused=True, fan_profile="max", stop_inference=False)
    return ThermalActions(0, builds_paused=True, fan_profile="max", stop_inference=True)
