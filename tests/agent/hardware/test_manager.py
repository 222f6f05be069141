"""The hardware layer in-process on the simulated board: PD from docking to an explicit contract and back to 5 V
on shutdown, the dock -> NFC -> join offer pipeline, and thermal actions reaching the engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ConflictError, UnprocessableError
from agent.hardware.manager import DOCK_PORT, HardwareManager
from agent.hardware.power import ContractRequest
from agent.settings import load_settings
from drivers.power.pdo import encode_fixed_pdo
from drivers.sim.world import SimModule
from tests.waiting import until


class RecordingEngine:
    """Stands in for EngineHost and its controls: records what thermal policy asks of it."""

    def __init__(self) -> None:
        self.controls = self
        self.stats: dict[str, Any] = {"decoding": 0}
        self.concurrency: list[int] = []
        self.suspended: list[str] = []
        self.resumed = 0
        self.builds_paused: list[bool] = []

    def set_concurrency(self, limit: int) -> None:
        self.concurrency.append(limit)

    def suspend(self, reason: str, *, code: str, retry_after: int = 30) -> None:
        self.suspended.append(code)

    def resume(self) -> None:
        self.resumed += 1

    def pause_builds(self, paused: bool) -> None:
        self.builds_paused.append(paused)


@pytest.fixture
async def hardware(tmp_path: Path) -> AsyncIterator[tuple[HardwareManager, RecordingEngine]]:
    overrides = {
        "hardware.thermal_poll_seconds": 0.05,
        "hardware.power_poll_seconds": 0.05,
        "hardware.min_dwell_seconds": 0.2,
        "engine.max_batch": 8,
    }
    settings = await asyncio.to_thread(load_settings, overrides, home=tmp_path, env={})
    engine = RecordingEngine()
    manager = HardwareManager(settings, [engine])  # type: ignore[list-item]  # a stand-in for EngineHost, on purpose
    tasks: list[asyncio.Task[None]] = []

    def spawn(work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        tasks.append(task)
        return task

    await manager.start(spawn)
    try:
        yield manager, engine
    finally:
        await manager.stop()
        for task in tasks:
            assert task.done()
            if not task.cancelled():
                assert task.exception() is None, task


async def test_pd_from_docking_to_explicit_contract_and_back_to_5v_on_shutdown(
    hardware: tuple[HardwareManager, RecordingEngine],
) -> None:
    manager, _ = hardware
    board = manager.board
    assert board is not None
    with pytest.raises(ConflictError, match="no module is docked"):
        await manager.power.negotiate(DOCK_PORT, ContractRequest(voltage_mv=9000))

    board.world.stack(
        SimModule(
            "module-b",
            tuple(encode_fixed_pdo(mv, ma) for mv, ma in ((5000, 3000), (9000, 3000), (15000, 3000), (20000, 2250))),
        )
    )
    record = await manager.power.negotiate(DOCK_PORT, ContractRequest(voltage_mv=15000, current_ma=2000))
    assert record["state"] == "explicit"
    assert record["selected"] == {
        "pdo_index": 3,
        "type": "fixed",
        "voltage_mV": 15000,
        "current_mA": 2000,
        "power_mW": 30000,
    }
    assert record["rdo"]["object_position"] == 3 and record["rdo"]["operating_mA"] == 2000
    assert [p["mV"] for p in record["source_pdos"]] == [5000, 9000, 15000, 20000]
    assert board.stusb4500.vbus_mv == 15000  # the twin's bus really is at 15 V now
    # The INA226 on the bus measures what was negotiated.
    await until(
        lambda: (sample := manager.coordinators["power_monitor"].data) is not None and abs(sample.bus_mv - 15000) < 5,
        "the INA226 measuring 15 V",
    )

    with pytest.raises(UnprocessableError, match="no offered PDO provides 12000 mV"):
        await manager.power.negotiate(DOCK_PORT, ContractRequest(voltage_mv=12000))
    with pytest.raises(UnprocessableError, match="at most 2250 mA"):
        await manager.power.negotiate(DOCK_PORT, ContractRequest(pdo_index=4, current_ma=3000))
    assert board.stusb4500.vbus_mv == 15000  # refused requests changed nothing

    await manager.stop()
    assert board.stusb4500.vbus_mv == 5000  # shutdown left the port at the safe default


async def test_docking_reads_the_join_offer_over_nfc_and_publishes_it(
    hardware: tuple[HardwareManager, RecordingEngine],
) -> None:
    from drivers.base import JoinOffer

    manager, _ = hardware
    assert manager.dock is not None and manager.board is not None
    offers = manager.dock.subscribe()
    offer = JoinOffer("thox-7f3a", "10.0.0.7:5381", token="K10abc::secret", expires_at=1_900_000_000)
    manager.board.world.stack(SimModule("thox-7f3a", (encode_fixed_pdo(5000, 3000),), offer))
    event = await asyncio.wait_for(offers.get(), 5)
    assert event.offer == offer
    # Debounce plus presence confirmation happen before the read, never after it.
    assert event.read_at >= event.docked_at
    report = manager.report()["dock"]
    assert report["docked"] is True
    assert report["join_offer"]["node_id"] == "thox-7f3a" and report["join_offer"]["has_token"] is True

    manager.board.world.unstack("thox-7f3a")
    await until(lambda: manager.report()["dock"]["docked"] is False, "the undock")
    assert manager.report()["dock"]["join_offer"] is None


async def test_heat_lowers_engine_concurrency_and_unreadable_sensors_fail_safe(
    hardware: tuple[HardwareManager, RecordingEngine],
) -> None:
    manager, engine = hardware
    assert manager.board is not None
    world = manager.board.world
    world.set_thermal(ambient_c=80.0, time_constant_s=0.0)  # tj-thermal idles 9 C above ambient: 89 C -> HOT
    await until(lambda: engine.concurrency and engine.concurrency[-1] == 1, "concurrency lowered to 1")
    assert manager.report()["thermal"]["level"] == "hot"
    assert engine.builds_paused[-1] is True

    world.set_thermal(ambient_c=25.0)
    await until(lambda: engine.concurrency[-1] == 8, "concurrency back to 8")
    assert manager.report()["thermal"]["level"] == "normal"
    assert engine.builds_paused[-1] is False

    # A dead sensor is treated as a hot one.
    manager.board.inject("i2c-1", "nack", 1.0)
    await asyncio.to_thread(manager.board.inject, "sysfs:tj-thermal", "unreadable")
    await asyncio.to_thread(manager.board.inject, "sysfs:cpu-thermal", "unreadable")
    for zone in ("gpu-thermal", "cv0-thermal", "soc0-thermal", "soc1-thermal"):
        await asyncio.to_thread(manager.board.inject, f"sysfs:{zone}", "implausible")
    await until(lambda: manager.report()["thermal"]["level"] == "hot", "dead sensors treated as hot")
    assert manager.report()["drivers"]["thermal:tmp117"]["available"] is False

    world.set_thermal(ambient_c=110.0)  # past the critical trip minus the margin: inference stops
    await asyncio.to_thread(manager.board.clear_faults)
    await until(lambda: engine.suspended == ["thermal_emergency"], "inference suspended for the emergency")
    assert manager.report()["thermal"]["actions"]["inference_stopped"] is True
    world.set_thermal(ambient_c=25.0)
    await until(lambda: engine.resumed == 1, "inference resumed after cooling")


@pytest.mark.parametrize(("thermal", "registered"), [("sim", ["thermal"]), ("none", [])])
async def test_thermal_polls_feed_the_watchdog_only_when_there_are_thermal_sources(
    tmp_path: Path, thermal: str, registered: list[str]
) -> None:
    overrides = {"hardware.thermal": thermal, "hardware.thermal_poll_seconds": 0.05}
    settings = await asyncio.to_thread(load_settings, overrides, home=tmp_path, env={})
    registrations: list[str] = []
    beats: list[str] = []

    def register(name: str) -> Any:
        registrations.append(name)
        return lambda: beats.append(name)

    # RecordingEngine deliberately stands in for EngineHost (the manager takes list[EngineHost]).
    manager = HardwareManager(settings, [RecordingEngine()], register_heartbeat=register)  # type: ignore[list-item]
    tasks: list[asyncio.Task[None]] = []

    def spawn(work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        tasks.append(asyncio.create_task(work))
        return tasks[-1]

    await manager.start(spawn)
    try:
        if registered:  # (with no thermal source nothing is registered at start, so nothing can ever beat)
            await until(lambda: len(beats) >= 3, "three thermal heartbeats")
    finally:
        await manager.stop()
    # A heartbeat nobody beats would silence the systemd watchdog and get the agent restarted in a loop.
    assert registrations == registered
    assert sorted(set(beats)) == registered
    if registered:
        assert len(beats) >= 3


async def test_the_box_presents_its_own_offer_between_docks_and_a_dock_takes_the_antenna_first(
    hardware: tuple[HardwareManager, RecordingEngine],
) -> None:
    from drivers.base import JoinOffer
    from drivers.sim.nfc import SimNfc

    manager, _ = hardware
    assert manager.dock is not None and manager.board is not None
    nfc = manager.drivers.nfc
    assert isinstance(nfc, SimNfc)
    asked: list[bool] = []

    async def own_offer(fresh: bool) -> JoinOffer:
        asked.append(fresh)
        return JoinOffer("box-a", "10.0.0.1:5382", token=f"K10token-{len(asked)}")

    manager.dock.present_own_offers(own_offer)
    first = await nfc.tap(timeout=5)
    assert first is not None and first.node_id == "box-a"
    # A read token is spent: the next window presents a fresh one (a reader tapping again within the same window
    # reads the same message, as with a real antenna).
    deadline = asyncio.get_running_loop().time() + 5
    while (second := await nfc.tap(timeout=5)) is not None and second.token == first.token:
        assert asyncio.get_running_loop().time() < deadline, "no fresh offer after the first was read"
        await asyncio.sleep(0.05)  # the poll interval of a loop with a deadline
    assert second is not None and asked[0] is True and True in asked[1:]

    # A module docks: the reading of its tag is not held up by a presenting window, and nothing is presented
    # while it stays docked.
    offers = manager.dock.subscribe()
    theirs = JoinOffer("thox-7f3a", "10.0.0.7:5382", token="K10abc::secret")
    manager.board.world.stack(SimModule("thox-7f3a", (encode_fixed_pdo(5000, 3000),), theirs))
    event = await asyncio.wait_for(offers.get(), 5)
    assert event.offer == theirs and event.read_at - event.docked_at < 0.3
    assert await nfc.tap(timeout=0.5) is None

    manager.board.world.unstack("thox-7f3a")
    assert await nfc.tap(timeout=5) is not None  # presenting again once undocked
