"""SysfsThermal against generated Orin sysfs trees: discovery, readings, trips and every way a zone breaks."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from drivers.base import DriverConfigError, DriverError, DriverState, DriverStateError
from drivers.sim.sysfs import FaultKind, SimSysfs, SimTrip, SimZone
from drivers.thermal.sysfs import SysfsThermal, parse_millicelsius

ORIN = ("cpu-thermal", "gpu-thermal", "cv0-thermal", "soc0-thermal", "soc1-thermal", "tj-thermal")


class World:
    """The outside world as the twin sees it: temperatures a test sets."""

    def __init__(self) -> None:
        self.temperatures: dict[str, float] = {}

    def __call__(self) -> dict[str, float]:
        return dict(self.temperatures)


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def sim(tmp_path: Path, world: World) -> SimSysfs:
    return SimSysfs(tmp_path / "sys", world)


@pytest.mark.parametrize(
    ("text", "celsius"),
    [
        ("45500\n", 45.5),
        ("-39999", -39.999),
        ("150000", 150.0),
        ("1", 0.001),
        ("0\n", None),  # a broken BPMP path reads a constant 0
        ("-40000", None),
        ("-256000", None),  # what jtop shows for a dead zone
        ("150001", None),
        ("", None),  # tj-thermal on Orin NX/Nano reads empty
        ("45.5", None),
        ("garbage", None),
    ],
)
def test_millicelsius_parsing_and_plausibility(text: str, celsius: float | None) -> None:
    assert parse_millicelsius(text) == celsius


async def test_reads_every_orin_zone_in_index_order(sim: SimSysfs, world: World) -> None:
    thermal = SysfsThermal(sim.root)
    assert thermal.name == f"sysfs:{sim.root}"
    await thermal.open()
    states = [thermal.state]
    assert thermal.zones == ORIN
    readings = await thermal.read()
    assert list(readings) == list(ORIN)
    assert readings["cpu-thermal"] == 47.5
    assert readings["gpu-thermal"] == 46.0
    world.temperatures.update({"cpu-thermal": 71.25, "tj-thermal": 72.5})
    await asyncio.to_thread(sim.refresh)
    readings = await thermal.read()
    assert readings["cpu-thermal"] == 71.25
    assert readings["tj-thermal"] == 72.5
    assert readings["gpu-thermal"] == 46.0
    await thermal.close()
    states.append(thermal.state)
    assert states == [DriverState.OPEN, DriverState.CLOSED]


async def test_critical_trips_come_only_from_critical_trip_points(sim: SimSysfs) -> None:
    thermal = SysfsThermal(sim.root)
    await thermal.open()
    # tj-thermal has only a "hot" trip and the passive 99 °C trips are not shutdown points.
    assert await thermal.critical_trips() == {zone: 105.0 for zone in ORIN if zone != "tj-thermal"}


async def test_lowest_critical_trip_wins_and_unreadable_trips_are_skipped(tmp_path: Path) -> None:
    zone = SimZone(
        "CPU-therm",
        50.0,
        (
            SimTrip("critical", 101_500),
            SimTrip("critical", 97_000),
            SimTrip("critical", 99_000),
            SimTrip("active", 60_000),
        ),
    )
    sim = await SimSysfs.create(tmp_path, zones=[zone], fan=False)
    broken = sim.zone_dir("CPU-therm") / "trip_point_1_temp"
    await asyncio.to_thread(broken.write_text, "not a number\n")
    thermal = SysfsThermal(tmp_path)
    await thermal.open()
    assert await thermal.critical_trips() == {"CPU-therm": 99.0}


@pytest.mark.parametrize("kind", ["unreadable", "implausible", "zero", "empty"])
async def test_a_broken_zone_is_offline_and_the_others_still_read(sim: SimSysfs, world: World, kind: FaultKind) -> None:
    thermal = SysfsThermal(sim.root)
    await thermal.open()
    await asyncio.to_thread(sim.set_fault, "tj-thermal", kind)
    world.temperatures["cpu-thermal"] = 60.0
    await asyncio.to_thread(sim.refresh)
    readings = await thermal.read()
    assert readings["tj-thermal"] is None
    assert readings["cpu-thermal"] == 60.0
    assert thermal.state is DriverState.OPEN
    await asyncio.to_thread(sim.set_fault, "tj-thermal", None)
    assert (await thermal.read())["tj-thermal"] == 47.5


async def test_a_stuck_zone_keeps_its_last_value_while_others_move(sim: SimSysfs, world: World) -> None:
    thermal = SysfsThermal(sim.root)
    await thermal.open()
    await asyncio.to_thread(sim.set_fault, "gpu-thermal", "stuck")
    world.temperatures.update({"gpu-thermal": 90.0, "cpu-thermal": 80.0})
    await asyncio.to_thread(sim.refresh)
    readings = await thermal.read()
    assert readings["gpu-thermal"] == 46.0
    assert readings["cpu-thermal"] == 80.0
    await asyncio.to_thread(sim.set_fault, "gpu-thermal", None)
    assert (await thermal.read())["gpu-thermal"] == 90.0


async def test_unreadable_zone_really_fails_to_read_even_for_root(sim: SimSysfs) -> None:
    await asyncio.to_thread(sim.set_fault, "cv0-thermal", "unreadable")
    with pytest.raises(OSError):  # noqa: PT011 - EISDIR here; EIO/ENODATA on a board: any OSError counts
        await asyncio.to_thread((sim.zone_dir("cv0-thermal") / "temp").read_text)


async def test_selected_zones_only_in_the_requested_order(sim: SimSysfs) -> None:
    thermal = SysfsThermal(sim.root, zones=["tj-thermal", "cpu-thermal"])
    await thermal.open()
    assert list(await thermal.read()) == ["tj-thermal", "cpu-thermal"]
    assert await thermal.critical_trips() == {"cpu-thermal": 105.0}


async def test_requesting_a_missing_zone_names_it_and_the_ones_that_exist(sim: SimSysfs) -> None:
    thermal = SysfsThermal(sim.root, zones=["cpu-thermal", "CPU-therm"])
    with pytest.raises(DriverConfigError, match=r"'CPU-therm'.*cpu-thermal, gpu-thermal"):
        await thermal.open()
    assert thermal.state is DriverState.CLOSED


async def test_a_zone_that_disappears_after_open_is_offline(sim: SimSysfs) -> None:
    thermal = SysfsThermal(sim.root)
    await thermal.open()
    await asyncio.to_thread(sim.remove_zone, "soc1-thermal")
    await asyncio.to_thread(sim.refresh)
    readings = await thermal.read()
    assert readings["soc1-thermal"] is None
    assert readings["soc0-thermal"] == 46.5


async def test_duplicate_zone_types_get_numbered_suffixes(tmp_path: Path) -> None:
    zones = [
        SimZone("Tboard_tegra", 40.0),
        SimZone("CPU-therm", 50.0),
        SimZone("Tboard_tegra", 41.0),
        SimZone("Tboard_tegra", 42.0),
    ]
    await SimSysfs.create(tmp_path, zones=zones, fan=False)
    thermal = SysfsThermal(tmp_path)
    await thermal.open()
    assert await thermal.read() == {
        "Tboard_tegra": 40.0,
        "CPU-therm": 50.0,
        "Tboard_tegra#2": 41.0,
        "Tboard_tegra#3": 42.0,
    }


async def test_zone_index_order_is_numeric_not_lexical(tmp_path: Path) -> None:
    zones = [SimZone(f"zone-{i}", 30.0 + i) for i in range(12)]
    await SimSysfs.create(tmp_path, zones=zones, fan=False)
    thermal = SysfsThermal(tmp_path)
    await thermal.open()
    assert thermal.zones == tuple(f"zone-{i}" for i in range(12))


async def test_losing_the_whole_thermal_class_is_an_error(sim: SimSysfs) -> None:
    thermal = SysfsThermal(sim.root)
    await thermal.open()
    await asyncio.to_thread(shutil.rmtree, sim.thermal_class)
    with pytest.raises(DriverError, match="disappeared"):
        await thermal.read()
    assert thermal.state is DriverState.FAULTED


async def test_open_fails_clearly_without_a_thermal_class(tmp_path: Path) -> None:
    with pytest.raises(DriverError, match=r"class/thermal does not exist"):
        await SysfsThermal(tmp_path).open()


async def test_open_fails_clearly_when_no_zones_exist(tmp_path: Path) -> None:
    await SimSysfs.create(tmp_path, zones=[], fan=False)
    with pytest.raises(DriverError, match="no thermal_zone"):
        await SysfsThermal(tmp_path).open()


async def test_read_before_open_is_a_state_error(sim: SimSysfs) -> None:
    with pytest.raises(DriverStateError):
        await SysfsThermal(sim.root).read()


def test_twin_writes_whole_values_and_links_zones_like_the_kernel(sim: SimSysfs) -> None:
    zone = sim.zone_dir("cpu-thermal")
    assert zone.is_symlink()
    assert zone.resolve() == (sim.root / "devices/virtual/thermal/thermal_zone0").resolve()
    assert (zone / "temp").read_text() == "47500\n"
    assert (zone / "type").read_text() == "cpu-thermal\n"
    assert not list(zone.glob(".*"))  # no scratch files left behind by atomic writes


def test_twin_rejects_unknown_faults_and_zones(sim: SimSysfs) -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        sim.set_fault("cpu-thermal", "melted")  # type: ignore[arg-type]  # an unknown fault, on purpose
    with pytest.raises(KeyError, match="no zone"):
        sim.set_fault("CPU-therm", "stuck")
