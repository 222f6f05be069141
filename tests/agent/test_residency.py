"""Which models make room for another (agent/models/residency.py), and keep_alive's accepted forms."""

from __future__ import annotations

import pytest

from agent.models.residency import FOREVER, NoRoom, Residency, evictions, parse_keep_alive

GB = 1_000_000_000


def resident(model_id: str, last_used: float, *, pinned: bool = False, placed: bool = False) -> Residency:
    return Residency(model_id, GB, pinned=pinned, placed=placed, keep_alive=300, last_used=last_used)


def test_the_least_recently_used_idle_models_go_first_and_only_as_many_as_needed() -> None:
    loaded = [resident("first", 0, pinned=True), resident("old", 1), resident("older", 0.5), resident("new", 9)]
    assert evictions(loaded, "next", GB, 10 * GB, max_loaded=4, busy=set()) == ["older"]
    assert evictions(loaded, "next", GB, 10 * GB, max_loaded=3, busy=set()) == ["older", "old"]
    assert evictions(loaded, "next", 2 * GB, 4 * GB, max_loaded=9, busy=set()) == ["older", "old"]  # by memory
    assert evictions(loaded, "next", GB, 10 * GB, max_loaded=4, busy={"older"}) == ["old"]  # a busy one stays


def test_no_room_names_what_must_stay() -> None:
    loaded = [resident("first", 0, pinned=True), resident("placed", 1, placed=True), resident("busy", 2)]
    with pytest.raises(NoRoom, match=r"first \(the default or the first model\), placed \(placed by the cluster\)"):
        evictions(loaded, "next", GB, 10 * GB, max_loaded=3, busy={"busy"})
    with pytest.raises(NoRoom, match=r"'next' needs about 8.00 GB .* 3.00 GB of the 10.00 GB"):
        evictions(loaded, "next", 8 * GB, 10 * GB, max_loaded=9, busy={"busy"})


def test_expiry_counts_from_the_last_use_and_never_for_pinned_or_placed() -> None:
    model = resident("m", 100.0)
    assert not model.expired(399.0) and model.expired(400.0) and model.expires_in(350.0) == 50.0
    assert not resident("p", 0, placed=True).expired(1e9) and resident("p", 0, placed=True).expires_in(0) is None
    forever = Residency("f", GB, keep_alive=FOREVER, last_used=0)
    assert not forever.expired(1e9) and forever.expires_in(0) is None


@pytest.mark.parametrize(
    ("given", "seconds"),
    [(300, 300.0), (0, 0.0), ("5m", 300.0), ("1h30m", 5400.0), ("45s", 45.0), ("500ms", 0.5), ("2.5", 2.5)]
    + [(-1, FOREVER), ("-1", FOREVER), ("-5m", FOREVER)],
)
def test_keep_alive_forms(given: float | str, seconds: float) -> None:
    assert parse_keep_alive(given) == seconds


@pytest.mark.parametrize("given", ["soon", "", "5 minutes", "m", float("nan"), True])
def test_keep_alive_refusals(given: float | str) -> None:
    with pytest.raises(ValueError, match="keep_alive"):
        parse_keep_alive(given)
