"""The thermal governor: thresholds both ways, hysteresis, dwell, zone groups, kernel trips, fail-safe, actions."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent.hardware.governor import (
    GovernorConfig,
    ThermalActions,
    ThermalGovernor,
    ThermalLevel,
    Transition,
    TransitionReason,
    actions_for,
)

NORMAL, WARM, THROTTLE, HOT, EMERGENCY = (
    ThermalLevel.NORMAL,
    ThermalLevel.WARM,
    ThermalLevel.THROTTLE,
    ThermalLevel.HOT,
    ThermalLevel.EMERGENCY,
)
ZONE = "cpu-thermal"


def governor(**config: Any) -> ThermalGovernor:
    return ThermalGovernor(GovernorConfig(**config))


def step(gov: ThermalGovernor, now: float, temperature: float | None, zone: str = ZONE) -> list[Transition]:
    return gov.update({zone: temperature}, now)


def soc(
    previous: ThermalLevel, level: ThermalLevel, temperature: float | None, reason: TransitionReason, at: float
) -> Transition:
    return Transition("soc", previous, level, temperature, reason, at)


# --- levels and thresholds --------------------------------------------------------------------------------------


def test_levels_are_ordered_and_labelled() -> None:
    assert [level.label for level in ThermalLevel] == ["normal", "warm", "throttle", "hot", "emergency"]
    assert NORMAL < WARM < THROTTLE < HOT < EMERGENCY


@pytest.mark.parametrize(
    ("temperature", "expected"),
    [
        (20.0, NORMAL),
        (69.99, NORMAL),
        (70.0, WARM),
        (79.99, WARM),
        (80.0, THROTTLE),
        (87.99, THROTTLE),
        (88.0, HOT),
        (99.99, HOT),
        (100.0, EMERGENCY),  # default critical 105 - margin 5
        (140.0, EMERGENCY),
    ],
)
def test_rising_enters_the_level_at_its_threshold(temperature: float, expected: ThermalLevel) -> None:
    gov = governor()
    assert step(gov, 0.0, 40.0) == []
    transitions = step(gov, 3.5, temperature)
    if expected == NORMAL:
        assert transitions == []
    else:
        assert transitions == [soc(NORMAL, expected, temperature, "rising", 3.5)]
    assert gov.level == expected
    assert gov.group_levels() == {"soc": expected}


def test_rising_is_immediate_and_ignores_dwell() -> None:
    gov = governor()
    assert step(gov, 0.0, 70.0) == [soc(NORMAL, WARM, 70.0, "rising", 0.0)]
    assert step(gov, 0.25, 80.0) == [soc(WARM, THROTTLE, 80.0, "rising", 0.25)]
    assert step(gov, 0.5, 88.0) == [soc(THROTTLE, HOT, 88.0, "rising", 0.5)]
    assert step(gov, 0.75, 100.0) == [soc(HOT, EMERGENCY, 100.0, "rising", 0.75)]


def test_rising_skips_straight_to_the_highest_level_reached() -> None:
    gov = governor()
    assert step(gov, 0.0, 50.0) == []
    assert step(gov, 1.0, 95.0) == [soc(NORMAL, HOT, 95.0, "rising", 1.0)]


def test_first_reading_already_hot_is_a_rising_transition() -> None:
    gov = governor()
    assert step(gov, 7.0, 101.5) == [soc(NORMAL, EMERGENCY, 101.5, "rising", 7.0)]


@pytest.mark.parametrize(
    ("entry_c", "level", "exit_c", "lower"),
    [
        (70.0, WARM, 65.0, NORMAL),
        (80.0, THROTTLE, 75.0, WARM),
        (88.0, HOT, 83.0, THROTTLE),
        (100.0, EMERGENCY, 95.0, HOT),
    ],
)
def test_falling_leaves_the_level_at_threshold_minus_hysteresis(
    entry_c: float, level: ThermalLevel, exit_c: float, lower: ThermalLevel
) -> None:
    gov = governor()
    assert step(gov, 0.0, entry_c) == [soc(NORMAL, level, entry_c, "rising", 0.0)]
    # The dwell has elapsed; only the hysteresis holds the level.
    assert step(gov, 10.0, exit_c + 0.01) == []
    assert step(gov, 15.0, entry_c - 0.01) == []
    assert gov.level == level
    assert step(gov, 20.0, exit_c) == [soc(level, lower, exit_c, "falling", 20.0)]
    assert gov.level == lower


def test_falling_can_skip_several_levels_in_one_transition() -> None:
    gov = governor()
    assert step(gov, 0.0, 101.0) == [soc(NORMAL, EMERGENCY, 101.0, "rising", 0.0)]
    assert step(gov, 10.0, 60.0) == [soc(EMERGENCY, NORMAL, 60.0, "falling", 10.0)]


def test_falling_stops_at_the_first_level_whose_exit_is_not_reached() -> None:
    gov = governor()
    step(gov, 0.0, 101.0)
    # 78 is below the exits of EMERGENCY (95) and HOT (83) but above THROTTLE's (75).
    assert step(gov, 10.0, 78.0) == [soc(EMERGENCY, THROTTLE, 78.0, "falling", 10.0)]


def test_hysteresis_band_holds_the_level_however_long() -> None:
    gov = governor()
    step(gov, 0.0, 80.0)
    for i, temperature in enumerate([79.9, 76.0, 75.01, 79.99, 77.0, 75.5] * 5):
        assert step(gov, 10.0 + 10.0 * i, temperature) == []
    assert gov.level == THROTTLE
    assert step(gov, 400.0, 75.0) == [soc(THROTTLE, WARM, 75.0, "falling", 400.0)]
    # Back up needs the full entry threshold again, not the exit one.
    assert step(gov, 400.5, 79.99) == []
    assert step(gov, 401.0, 80.0) == [soc(WARM, THROTTLE, 80.0, "rising", 401.0)]


def test_dwell_delays_a_fall_to_the_exact_time() -> None:
    gov = governor()
    step(gov, 100.0, 70.0)
    assert step(gov, 100.5, 50.0) == []
    assert step(gov, 109.999, 50.0) == []
    assert gov.level == WARM
    assert step(gov, 110.0, 50.0) == [soc(WARM, NORMAL, 50.0, "falling", 110.0)]


def test_dwell_restarts_on_every_change_of_level() -> None:
    gov = governor()
    step(gov, 0.0, 70.0)
    assert step(gov, 8.0, 81.0) == [soc(WARM, THROTTLE, 81.0, "rising", 8.0)]
    assert step(gov, 17.9, 50.0) == []
    assert step(gov, 18.0, 50.0) == [soc(THROTTLE, NORMAL, 50.0, "falling", 18.0)]
    # A fall restarts the dwell too: the next fall waits, a rise does not.
    assert step(gov, 19.0, 90.0) == [soc(NORMAL, HOT, 90.0, "rising", 19.0)]
    assert step(gov, 28.0, 40.0) == []
    assert step(gov, 29.0, 40.0) == [soc(HOT, NORMAL, 40.0, "falling", 29.0)]


def test_zero_dwell_falls_at_once() -> None:
    gov = governor(min_dwell_s=0.0)
    step(gov, 0.0, 90.0)
    assert step(gov, 0.0, 40.0) == [soc(HOT, NORMAL, 40.0, "falling", 0.0)]


# --- zone groups --------------------------------------------------------------------------------------------------


def test_group_temperature_is_its_hottest_valid_zone() -> None:
    gov = governor()
    readings: dict[str, float | None] = {"cpu-thermal": 61.0, "gpu-thermal": 82.5, "soc0-thermal": None}
    assert gov.update(readings, 1.0) == [soc(NORMAL, THROTTLE, 82.5, "rising", 1.0)]
    assert gov.hottest_c == 82.5
    assert gov.group_temperatures() == {"soc": 82.5}


def test_each_group_has_its_own_state_machine_and_the_box_takes_the_hottest() -> None:
    gov = governor(groups={"cpu": ("cpu-*", "CPU-*"), "gpu": ("gpu-*",)})
    transitions = gov.update({"cpu-thermal": 71.0, "CPU-therm": 66.0, "gpu-thermal": 89.0}, 2.0)
    assert transitions == [
        Transition("cpu", NORMAL, WARM, 71.0, "rising", 2.0),
        Transition("gpu", NORMAL, HOT, 89.0, "rising", 2.0),
    ]
    assert gov.group_levels() == {"cpu": WARM, "gpu": HOT}
    assert gov.group_temperatures() == {"cpu": 71.0, "gpu": 89.0}
    assert gov.level == HOT
    assert gov.hottest_c == 89.0
    assert gov.update({"cpu-thermal": 71.0, "gpu-thermal": 40.0}, 12.0) == [
        Transition("gpu", HOT, NORMAL, 40.0, "falling", 12.0)
    ]
    assert gov.level == WARM


def test_a_zone_belongs_to_the_first_group_that_matches() -> None:
    gov = governor(groups={"cpu": ("cpu-*",), "rest": ("*",)})
    assert gov.update({"cpu-thermal": 90.0, "tj-thermal": 50.0}, 0.0) == [
        Transition("cpu", NORMAL, HOT, 90.0, "rising", 0.0)
    ]
    assert gov.group_temperatures() == {"cpu": 90.0, "rest": 50.0}


def test_zones_outside_every_group_are_ignored() -> None:
    gov = governor(groups={"gpu": ("gpu-*",)})
    assert gov.update({"gpu-thermal": 60.0, "PMIC-Die": 120.0}, 0.0) == []
    assert gov.hottest_c == 60.0
    assert gov.group_levels() == {"gpu": NORMAL}


def test_a_group_that_never_matched_a_zone_is_not_watched() -> None:
    gov = governor(groups={"cpu": ("cpu-*",), "gpu": ("gpu-*",)})
    for i in range(10):
        assert gov.update({"cpu-thermal": 50.0}, float(i)) == []
    assert gov.group_levels() == {"cpu": NORMAL}
    assert gov.level == NORMAL


def test_default_config_with_no_zones_at_all_stays_normal() -> None:
    gov = governor()
    for i in range(5):
        assert gov.update({}, float(i)) == []
    assert gov.level == NORMAL
    assert gov.hottest_c is None
    assert gov.group_levels() == {}


# --- the kernel's critical trip -------------------------------------------------------------------------------------


def test_a_kernel_critical_trip_lowers_that_groups_emergency_threshold() -> None:
    config = GovernorConfig(groups={"cpu": ("cpu-*",), "gpu": ("gpu-*",)})
    gov = ThermalGovernor(config, {"gpu-thermal": 96.0, "gpu-other": 99.0})
    assert gov.thresholds("gpu")[EMERGENCY] == 91.0  # the group's lowest trip, minus the margin
    assert gov.thresholds("cpu")[EMERGENCY] == 100.0  # no trip: default_critical_c - margin
    assert gov.update({"cpu-thermal": 91.0, "gpu-thermal": 91.0}, 0.0) == [
        Transition("cpu", NORMAL, HOT, 91.0, "rising", 0.0),
        Transition("gpu", NORMAL, EMERGENCY, 91.0, "rising", 0.0),
    ]
    assert gov.update({"cpu-thermal": 91.0, "gpu-thermal": 86.0}, 10.0) == [
        Transition("gpu", EMERGENCY, HOT, 86.0, "falling", 10.0)
    ]


def test_a_critical_trip_below_our_thresholds_caps_them_so_we_still_stop_first() -> None:
    gov = ThermalGovernor(GovernorConfig(), {"soc0-thermal": 90.0})
    assert gov.thresholds("soc") == {WARM: 70.0, THROTTLE: 80.0, HOT: 85.0, EMERGENCY: 85.0}
    assert step(gov, 0.0, 85.0) == [soc(NORMAL, EMERGENCY, 85.0, "rising", 0.0)]


def test_unusable_critical_trips_are_ignored() -> None:
    gov = ThermalGovernor(
        GovernorConfig(groups={"gpu": ("gpu-*",)}), {"gpu-thermal": math.nan, "gpu-x": math.inf, "board": 50.0}
    )
    assert gov.thresholds("gpu")[EMERGENCY] == 100.0
    with pytest.raises(KeyError, match="unknown thermal group 'board'"):
        gov.thresholds("board")


# --- fail-safe ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "unreadable",
    [
        {ZONE: None},
        {},  # the zone is absent from the reading
        {ZONE: -256.0},  # jtop's "unreadable"
        {ZONE: 151.0},
        {ZONE: math.nan},
        {ZONE: -math.inf},
    ],
    ids=["offline", "absent", "minus-256", "implausibly-hot", "nan", "infinite"],
)
def test_fail_safe_after_n_unreadable_updates(unreadable: dict[str, float | None]) -> None:
    gov = governor()
    assert step(gov, 0.0, 50.0) == []
    assert gov.update(unreadable, 1.0) == []
    assert gov.update(unreadable, 2.0) == []
    assert gov.level == NORMAL
    assert gov.group_temperatures() == {"soc": None}
    assert gov.hottest_c is None
    assert gov.update(unreadable, 3.0) == [soc(NORMAL, HOT, None, "sensor_unreadable", 3.0)]
    assert gov.update(unreadable, 4.0) == []
    assert gov.level == HOT


def test_one_valid_zone_keeps_a_group_readable() -> None:
    gov = governor()
    for i in range(5):
        assert gov.update({"cpu-thermal": None, "gpu-thermal": 45.0}, float(i)) == []
    assert gov.group_temperatures() == {"soc": 45.0}


def test_the_unreadable_count_must_be_consecutive() -> None:
    gov = governor()
    for i, temperature in enumerate([50.0, None, None, 50.0, None, None, 50.0]):
        assert step(gov, float(i), temperature) == []
    assert gov.level == NORMAL


def test_recovery_follows_the_normal_rules_and_is_reported_as_recovered() -> None:
    gov = governor(fail_safe_after=2)
    step(gov, 0.0, 50.0)
    step(gov, 1.0, None)
    assert step(gov, 2.0, None) == [soc(NORMAL, HOT, None, "sensor_unreadable", 2.0)]
    # Back, and cool, but the dwell since the fail-safe step has not elapsed.
    assert step(gov, 5.0, 50.0) == []
    assert gov.level == HOT
    assert step(gov, 12.0, 50.0) == [soc(HOT, NORMAL, 50.0, "sensor_recovered", 12.0)]


def test_recovery_into_a_hotter_reading_rises_normally() -> None:
    gov = governor(fail_safe_after=1)
    assert step(gov, 0.0, None) == [soc(NORMAL, HOT, None, "sensor_unreadable", 0.0)]
    assert step(gov, 1.0, 101.0) == [soc(HOT, EMERGENCY, 101.0, "rising", 1.0)]
    assert step(gov, 11.0, 50.0) == [soc(EMERGENCY, NORMAL, 50.0, "falling", 11.0)]


def test_once_the_temperature_holds_the_level_a_later_fall_is_an_ordinary_fall() -> None:
    gov = governor(fail_safe_after=1)
    step(gov, 0.0, None)
    assert step(gov, 1.0, 86.0) == []  # 86 is above HOT's exit (83): the level is now the temperature's
    assert step(gov, 20.0, 60.0) == [soc(HOT, NORMAL, 60.0, "falling", 20.0)]


def test_fail_safe_never_lowers_a_hotter_level() -> None:
    gov = governor(fail_safe_after=1)
    step(gov, 0.0, 102.0)
    assert step(gov, 1.0, None) == []
    assert gov.level == EMERGENCY
    assert step(gov, 11.0, 50.0) == [soc(EMERGENCY, NORMAL, 50.0, "sensor_recovered", 11.0)]


def test_a_blind_group_fails_safe_alone() -> None:
    gov = governor(groups={"cpu": ("cpu-*",), "gpu": ("gpu-*",)}, fail_safe_after=2)
    gov.update({"cpu-thermal": 40.0, "gpu-thermal": 40.0}, 0.0)
    assert gov.update({"cpu-thermal": 40.0}, 1.0) == []
    assert gov.update({"cpu-thermal": 40.0, "gpu-thermal": None}, 2.0) == [
        Transition("gpu", NORMAL, HOT, None, "sensor_unreadable", 2.0)
    ]
    assert gov.group_levels() == {"cpu": NORMAL, "gpu": HOT}
    assert gov.level == HOT


# --- time ---------------------------------------------------------------------------------------------------------


def test_time_must_not_go_backwards() -> None:
    gov = governor()
    step(gov, 5.0, 40.0)
    step(gov, 5.0, 40.0)  # the same instant is fine
    with pytest.raises(ValueError, match="went backwards"):
        step(gov, 4.0, 40.0)


@pytest.mark.parametrize("now", [math.nan, math.inf])
def test_time_must_be_finite(now: float) -> None:
    with pytest.raises(ValueError, match="now must be a finite number"):
        step(governor(), now, 40.0)


# --- configuration ------------------------------------------------------------------------------------------------


def test_default_config() -> None:
    config = GovernorConfig()
    assert config.groups == {"soc": ("*",)}
    assert config.entry_thresholds() == {WARM: 70.0, THROTTLE: 80.0, HOT: 88.0, EMERGENCY: 100.0}
    assert hash(config) == hash(GovernorConfig())


def test_config_groups_are_copied_and_read_only() -> None:
    groups = {"cpu": ["cpu-*"]}
    config = GovernorConfig(groups=groups)  # type: ignore[arg-type]  # lists on purpose: they must be copied
    groups["cpu"].append("gpu-*")
    assert config.groups == {"cpu": ("cpu-*",)}
    with pytest.raises(TypeError):
        config.groups["gpu"] = ("gpu-*",)  # type: ignore[index]  # writing a read-only mapping on purpose


def test_fail_safe_level_from_a_plain_int() -> None:
    config = GovernorConfig(fail_safe_level=4)  # type: ignore[arg-type]  # a plain int on purpose
    assert config.fail_safe_level is EMERGENCY


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warm_c": math.nan}, "warm_c must be a finite number"),
        ({"hot_c": "90"}, "hot_c must be a finite number"),
        ({"throttle_c": 70.0}, r"throttle_c \(70.0\) must be above warm_c"),
        ({"hot_c": 79.0}, r"hot_c \(79.0\) must be above throttle_c"),
        ({"emergency_margin_c": -1.0}, "emergency_margin_c must be >= 0"),
        ({"default_critical_c": 92.0}, r"default_critical_c - emergency_margin_c \(87.0\) must be above hot_c"),
        ({"emergency_margin_c": 17.0}, r"default_critical_c - emergency_margin_c \(88.0\) must be above hot_c"),
        ({"hysteresis_c": 0.0}, "hysteresis_c must be > 0"),
        ({"hysteresis_c": 8.0}, r"hysteresis_c \(8.0\) must be smaller than .* \(8.0\)"),
        ({"default_critical_c": 95.0}, r"hysteresis_c \(5.0\) must be smaller than .* \(2.0\)"),
        ({"min_dwell_s": -0.1}, "min_dwell_s must be >= 0"),
        ({"min_dwell_s": math.inf}, "min_dwell_s must be a finite number"),
        ({"fail_safe_after": 0}, "fail_safe_after must be an integer >= 1"),
        ({"fail_safe_after": 2.0}, "fail_safe_after must be an integer >= 1"),
        ({"fail_safe_level": 5}, r"fail_safe_level must be a ThermalLevel \(0 to 4\), got 5"),
        ({"fail_safe_level": "hot"}, "fail_safe_level must be a ThermalLevel"),
        ({"fail_safe_level": True}, "fail_safe_level must be a ThermalLevel"),
        ({"min_valid_c": 70.0}, r"min_valid_c \(70.0\) must be below warm_c"),
        ({"max_valid_c": 100.0}, r"max_valid_c \(100.0\) must be at least default_critical_c"),
        ({"groups": {}}, "groups must be a non-empty mapping"),
        ({"groups": {"": ("*",)}}, "groups: group names must be non-empty strings"),
        ({"groups": {"cpu": "cpu-*"}}, r"groups\['cpu'\] must be a non-empty sequence of non-empty fnmatch patterns"),
        ({"groups": {"cpu": ()}}, r"groups\['cpu'\] must be a non-empty sequence"),
        ({"groups": {"cpu": ("",)}}, r"groups\['cpu'\] must be a non-empty sequence"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GovernorConfig(**kwargs)


# --- actions ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        (NORMAL, ThermalActions(8, builds_paused=False, fan_profile="default", stop_inference=False)),
        (WARM, ThermalActions(8, builds_paused=False, fan_profile="cool", stop_inference=False)),
        (THROTTLE, ThermalActions(4, builds_paused=True, fan_profile="max", stop_inference=False)),
        (HOT, ThermalActions(1, builds_paused=True, fan_profile="max", stop_inference=False)),
        (EMERGENCY, ThermalActions(0, builds_paused=True, fan_profile="max", stop_inference=True)),
    ],
)
def test_actions_for_each_level(level: ThermalLevel, expected: ThermalActions) -> None:
    assert actions_for(level, 8) == expected


@pytest.mark.parametrize(("max_batch", "throttled"), [(1, 1), (2, 1), (3, 1), (7, 3), (16, 8)])
def test_throttle_halves_concurrency_but_keeps_one(max_batch: int, throttled: int) -> None:
    assert actions_for(THROTTLE, max_batch).max_concurrency == throttled
    assert actions_for(HOT, max_batch).max_concurrency == 1


def test_actions_tighten_monotonically_with_the_level() -> None:
    actions = [actions_for(level, 16) for level in ThermalLevel]
    concurrency = [a.max_concurrency for a in actions]
    assert concurrency == sorted(concurrency, reverse=True)
    assert [a.builds_paused for a in actions] == [False, False, True, True, True]
    assert [a.stop_inference for a in actions] == [False, False, False, False, True]


@pytest.mark.parametrize("max_batch", [0, -1, True, 2.0])
def test_actions_for_rejects_a_bad_max_batch(max_batch: Any) -> None:
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1"):
        actions_for(NORMAL, max_batch)


# --- random sequences: invariants after every step ---------------------------------------------------------------

HYSTERESIS = 5.0
DWELL = 10.0
FAIL_SAFE_AFTER = 3
SM_CONFIG = GovernorConfig(groups={"cpu": ("cpu-*",), "gpu": ("gpu-*",)})
SM_TRIPS = {"gpu-a": 97.0, "cpu-b": math.nan}
# Written out by hand so that the test does not trust the module's own arithmetic.
ENTRIES = {
    "cpu": {WARM: 70.0, THROTTLE: 80.0, HOT: 88.0, EMERGENCY: 100.0},
    "gpu": {WARM: 70.0, THROTTLE: 80.0, HOT: 88.0, EMERGENCY: 92.0},
}
ZONE_GROUPS = {"cpu-a": "cpu", "cpu-b": "cpu", "gpu-a": "gpu", "board": None}
ABSENT = "absent"
THRESHOLD_TEMPS = sorted({t for entries in ENTRIES.values() for e in entries.values() for t in (e, e - HYSTERESIS)})

temperatures = st.one_of(st.floats(20.0, 125.0), st.sampled_from(THRESHOLD_TEMPS))
zone_values = st.one_of(
    temperatures,
    temperatures,
    st.none(),
    st.just(ABSENT),
    st.sampled_from([-256.0, 151.0, math.nan, math.inf]),
)
time_steps = st.one_of(st.just(0.0), st.sampled_from([1.0, DWELL / 2, DWELL]), st.floats(0.0, 3 * DWELL))


def valid(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and -40.0 <= value <= 150.0


def implied(group: str, temperature: float) -> ThermalLevel:
    return max((level for level, entry in ENTRIES[group].items() if temperature >= entry), default=NORMAL)


def exit_target(group: str, level: ThermalLevel, temperature: float) -> ThermalLevel:
    """The lowest level reachable by leaving levels one at a time at entry - hysteresis (dwell aside)."""
    while level > NORMAL and temperature <= ENTRIES[group][level] - HYSTERESIS:
        level = ThermalLevel(level - 1)
    return level


class GovernorMachine(RuleBasedStateMachine):
    """Drives random readings, offline zones and time steps, and keeps an independent model of what must hold."""

    def __init__(self) -> None:
        super().__init__()
        self.gov = ThermalGovernor(SM_CONFIG, SM_TRIPS)
        self.now = 0.0
        self.levels: dict[str, ThermalLevel] = {}  # groups seen so far
        self.changed_at: dict[str, float] = {}
        self.unreadable: dict[str, int] = {}
        self.failed_safe: dict[str, bool] = {}
        self.temperatures: dict[str, float | None] = {}
        self.hottest: float | None = None
        # Band mode: every temperature lies in [low, high], narrower than the hysteresis, around a threshold.
        self.band: tuple[float, float] | None = None
        self.band_direction: dict[str, int] = {}
        self.band_transitions: dict[str, list[tuple[float, int]]] = {}

    # -- rules --

    @rule(dt=time_steps, values=st.fixed_dictionaries({zone: zone_values for zone in ZONE_GROUPS}))
    def read(self, dt: float, values: dict[str, float | str | None]) -> None:
        self.band = None
        self.apply({zone: v for zone, v in values.items() if not isinstance(v, str)}, dt)  # drops ABSENT

    @rule(dt=time_steps, group=st.sampled_from(["cpu", "gpu"]), offline=st.booleans())
    def blind(self, dt: float, group: str, offline: bool) -> None:
        """One group's zones all unreadable (offline or absent), the other group's readable."""
        self.band = None
        readings: dict[str, float | None] = {"board": 30.0}
        for zone, zone_group in ZONE_GROUPS.items():
            if zone_group == group:
                if offline:
                    readings[zone] = None
            elif zone_group is not None:
                readings[zone] = 60.0
        self.apply(readings, dt)

    @rule(
        threshold=st.sampled_from(sorted({e for entries in ENTRIES.values() for e in entries.values()})),
        width=st.floats(0.0, 0.9 * HYSTERESIS),
        position=st.floats(0.0, 1.0),
    )
    def start_band(self, threshold: float, width: float, position: float) -> None:
        low = threshold - position * width
        self.band = (low, low + width)
        self.band_direction = {}
        self.band_transitions = {}

    @precondition(lambda self: self.band is not None)
    @rule(dt=time_steps, fractions=st.tuples(*(st.floats(0.0, 1.0) for _ in range(3))))
    def read_in_band(self, dt: float, fractions: tuple[float, float, float]) -> None:
        assert self.band is not None
        low, high = self.band
        temps = [min(high, low + f * (high - low)) for f in fractions]
        self.apply({"cpu-a": temps[0], "cpu-b": temps[1], "gpu-a": temps[2]}, dt)

    # -- the model --

    def apply(self, readings: dict[str, float | None], dt: float) -> None:
        self.now += dt
        now = self.now
        transitions = self.gov.update(readings, now)
        by_group: dict[str, Transition] = {}
        for each in transitions:
            assert each.group not in by_group, "at most one transition per group per update"
            by_group[each.group] = each

        hottest: dict[str, float] = {}
        for zone, value in readings.items():
            group = ZONE_GROUPS[zone]
            if group is not None and valid(value):
                assert value is not None
                hottest[group] = max(value, hottest.get(group, value))
        self.hottest = max(hottest.values(), default=None)

        for group in ("cpu", "gpu"):
            if group not in self.levels:
                if not any(ZONE_GROUPS[zone] == group for zone in readings):
                    assert group not in by_group
                    continue
                self.levels[group] = NORMAL
                self.changed_at[group] = now
                self.unreadable[group] = 0
                self.failed_safe[group] = False
            temperature = hottest.get(group)
            self.temperatures[group] = temperature
            self.unreadable[group] = 0 if temperature is not None else self.unreadable[group] + 1
            transition = by_group.get(group)
            if transition is None:
                self.check_hold(group, temperature, now)
            else:
                self.check_transition(group, transition, temperature, now)

    def check_hold(self, group: str, temperature: float | None, now: float) -> None:
        level = self.levels[group]
        if temperature is None:
            if self.unreadable[group] >= FAIL_SAFE_AFTER:
                self.failed_safe[group] = True
            return
        assert implied(group, temperature) <= level, "under-reaction: the temperature demands a higher level"
        target = exit_target(group, level, temperature)
        if target == level:
            self.failed_safe[group] = False
        else:
            assert now - self.changed_at[group] < DWELL, "over-holding: the fall was allowed and did not happen"

    def check_transition(self, group: str, transition: Transition, temperature: float | None, now: float) -> None:
        previous = self.levels[group]
        assert transition.previous == previous
        assert transition.level != previous
        assert transition.at == now
        assert transition.temperature_c == temperature
        if transition.level > previous:
            if temperature is None:
                assert transition.reason == "sensor_unreadable"
                assert self.unreadable[group] == FAIL_SAFE_AFTER
                assert transition.level == max(previous, HOT)
            else:
                assert transition.reason == "rising"
                assert transition.level == implied(group, temperature)
        else:
            assert temperature is not None, "a level never falls without a reading"
            assert now - self.changed_at[group] >= DWELL, "fell before the dwell elapsed"
            for left in range(transition.level + 1, previous + 1):
                assert temperature <= ENTRIES[group][ThermalLevel(left)] - HYSTERESIS, "fell inside the hysteresis"
            assert transition.level == exit_target(group, previous, temperature)
            assert transition.level >= implied(group, temperature)
            assert transition.reason == ("sensor_recovered" if self.failed_safe[group] else "falling")
        if self.band is not None:
            direction = 1 if transition.level > previous else -1
            assert self.band_direction.get(group, direction) == direction, "flapping inside a band < hysteresis"
            self.band_direction[group] = direction
            history = self.band_transitions.setdefault(group, [])
            for at, earlier in history:
                if now - at < DWELL:
                    assert earlier > 0 and direction > 0, "two transitions within the dwell, one of them a fall"
            history.append((now, direction))
        self.levels[group] = transition.level
        self.changed_at[group] = now
        self.failed_safe[group] = transition.reason == "sensor_unreadable"

    # -- invariants --

    @invariant()
    def governor_agrees_with_the_model(self) -> None:
        assert self.gov.group_levels() == self.levels
        assert self.gov.level == max(self.levels.values(), default=NORMAL)
        assert self.gov.group_temperatures() == self.temperatures
        assert self.gov.hottest_c == self.hottest

    @invariant()
    def blind_groups_are_treated_as_hot(self) -> None:
        for group, count in self.unreadable.items():
            if count >= FAIL_SAFE_AFTER:
                assert self.levels[group] >= HOT


GovernorMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
TestGovernorMachine = GovernorMachine.TestCase


def test_reconfigured_thresholds_apply_from_the_next_update_in_both_directions() -> None:
    gov = governor(min_dwell_s=0)
    step(gov, 0, 60.0)
    assert gov.level == ThermalLevel.NORMAL
    gov.reconfigure(GovernorConfig(warm_c=50, throttle_c=58, hot_c=88, min_dwell_s=0))
    assert [t.level for t in step(gov, 1, 60.0)] == [ThermalLevel.THROTTLE]
    # Back to the defaults: THROTTLE (80) is left once at or below 80 - 5, straight down to NORMAL (70 - 5 = 65).
    gov.reconfigure(GovernorConfig(min_dwell_s=0))
    assert [t.level for t in step(gov, 2, 60.0)] == [ThermalLevel.NORMAL]
    with pytest.raises(ValueError, match="zone groups"):
        gov.reconfigure(GovernorConfig(groups={"soc": ("cpu-*",)}))
