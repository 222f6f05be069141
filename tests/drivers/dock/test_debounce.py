"""The debouncer's tables: raw hall-switch levels with exact timestamps in, confirmed dock events out."""

from __future__ import annotations

import pytest

from drivers.base import DockEvent
from drivers.dock.debounce import Debouncer

# Defaults: a level counts after 20 ms, a dock after a further 300 ms.
D, C = 0.02, 0.3

Step = tuple[float, bool]
Expected = list[tuple[bool, float]]


def run(
    steps: list[Step], until: float, *, start: bool = False, debounce: float = D, confirm: float = C
) -> list[DockEvent]:
    """Feed every step, then advance to `until`; collect what was reported."""
    machine = Debouncer(debounce, confirm, level=start, at=0.0)
    events: list[DockEvent] = []
    for at, level in steps:
        events += machine.feed(level, at)
    events += machine.poll(until)
    return events


def assert_events(events: list[DockEvent], expected: Expected) -> None:
    assert [e.docked for e in events] == [docked for docked, _ in expected]
    assert [e.at for e in events] == pytest.approx([at for _, at in expected], abs=1e-9)


DOCKED_AT_1 = [(1.0, True)]  # clean dock: confirmed at 1.0 + 0.02 + 0.3 = 1.32

TABLE: list[tuple[str, list[Step], float, Expected]] = [
    ("nothing happens", [], 5.0, []),
    ("clean dock", DOCKED_AT_1, 5.0, [(True, 1.32)]),
    ("not yet confirmed just before the deadline", DOCKED_AT_1, 1.3199, []),
    ("confirmed exactly at the deadline", DOCKED_AT_1, 1.32, [(True, 1.32)]),
    (
        "clean dock then lift: undock after debounce only",
        [(1.0, True), (3.0, False)],
        5.0,
        [(True, 1.32), (False, 3.02)],
    ),
    (
        "bounce train on docking: timed from the last edge",
        [(1.000, True), (1.005, False), (1.010, True), (1.015, False), (1.020, True)],
        5.0,
        [(True, 1.34)],
    ),
    (
        "bounce pulses shorter than debounce never count",
        [(1.000, True), (1.019, False), (1.038, True), (1.057, False)],
        5.0,
        [],
    ),
    ("slide-by: magnet present 200 ms is not a dock", [(1.0, True), (1.2, False)], 5.0, []),
    ("slide-by leaving 1 ms before the confirmation", [(1.0, True), (1.319, False)], 5.0, []),
    (
        "lift exactly at the confirmation: docked, then undocked",
        [(1.0, True), (1.32, False)],
        5.0,
        [(True, 1.32), (False, 1.34)],
    ),
    (
        "bounce on lifting: undock 20 ms after the last edge",
        [(1.0, True), (3.000, False), (3.004, True), (3.008, False)],
        5.0,
        [(True, 1.32), (False, 3.028)],
    ),
    (
        "dropout shorter than debounce while docked is ignored",
        [(1.0, True), (3.0, False), (3.01, True)],
        5.0,
        [(True, 1.32)],
    ),
    (
        "quick re-dock: lifted, then docked again 100 ms later",
        [(1.0, True), (3.0, False), (3.1, True)],
        5.0,
        [(True, 1.32), (False, 3.02), (True, 3.42)],
    ),
    (
        "re-dock before the undock counted: no events at all",
        [(1.0, True), (3.0, False), (3.015, True)],
        5.0,
        [(True, 1.32)],
    ),
    (
        "glitch inside the confirm window does not restart it",
        [(1.0, True), (1.1, False), (1.105, True)],
        5.0,
        [(True, 1.32)],
    ),
    (
        "glitch across the confirmation: confirmed when it ends",
        [(1.0, True), (1.31, False), (1.325, True)],
        5.0,
        [(True, 1.325)],
    ),
    ("glitch across the confirmation that turns into a lift", [(1.0, True), (1.31, False)], 5.0, []),
    ("repeated level is not an edge", [(1.0, True), (1.01, True), (1.015, True)], 5.0, [(True, 1.32)]),
    (
        "two docks and lifts",
        [(1.0, True), (2.0, False), (4.0, True), (6.0, False)],
        9.0,
        [(True, 1.32), (False, 2.02), (True, 4.32), (False, 6.02)],
    ),
]


@pytest.mark.parametrize(("steps", "until", "expected"), [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_debounce_table(steps: list[Step], until: float, expected: Expected) -> None:
    assert_events(run(steps, until), expected)


@pytest.mark.parametrize(("steps", "until", "expected"), [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_events_do_not_depend_on_how_often_time_is_polled(steps: list[Step], until: float, expected: Expected) -> None:
    """Polling every millisecond (as loop timers might) reports the same events at the same times."""
    machine = Debouncer(D, C)
    events: list[DockEvent] = []
    pending = list(steps)
    for tick in range(int(until * 1000) + 1):
        now = tick / 1000
        while pending and pending[0][0] <= now:
            at, level = pending.pop(0)
            events += machine.feed(level, at)
        events += machine.poll(now)
    events += machine.poll(until)
    assert_events(events, expected)


def test_undock_is_reported_long_before_a_dock_would_be() -> None:
    machine = Debouncer()
    machine.feed(True, 0.0)
    machine.poll(1.0)
    assert machine.feed(False, 2.0) == []
    assert machine.poll(2.0 + D - 0.001) == []
    assert_events(machine.poll(2.0 + D), [(False, 2.02)])


def test_deadline_names_the_next_moment_with_something_to_do() -> None:
    machine = Debouncer(D, C)
    assert machine.deadline() is None
    machine.feed(True, 1.0)
    assert machine.deadline() == pytest.approx(1.02)
    machine.poll(1.02)
    assert (machine.stable, machine.docked) == (True, False)
    assert machine.deadline() == pytest.approx(1.32)
    machine.poll(1.32)
    assert (machine.docked, machine.deadline()) == (True, None)
    machine.feed(False, 2.0)
    assert machine.deadline() == pytest.approx(2.02)


def test_zero_confirm_docks_after_debounce() -> None:
    assert_events(run([(1.0, True)], 2.0, confirm=0.0), [(True, 1.02)])


def test_zero_debounce_takes_levels_at_once() -> None:
    assert_events(run([(1.0, True), (2.0, False)], 3.0, debounce=0.0, confirm=0.0), [(True, 1.0), (False, 2.0)])


def test_starting_docked_reports_only_the_lift() -> None:
    assert_events(run([(1.0, False)], 2.0, start=True), [(False, 1.02)])


def test_time_must_not_go_backwards() -> None:
    machine = Debouncer()
    machine.feed(True, 2.0)
    with pytest.raises(ValueError, match="backwards"):
        machine.feed(False, 1.0)


@pytest.mark.parametrize(("debounce", "confirm"), [(-0.01, 0.3), (0.02, -1.0)])
def test_negative_times_are_rejected(debounce: float, confirm: float) -> None:
    with pytest.raises(ValueError, match=">= 0"):
        Debouncer(debounce, confirm)
