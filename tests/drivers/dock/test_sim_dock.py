"""SimDock: the world moves the magnet, the real debouncer reports; bounce and the "stuck" fault."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest

from drivers.base import DockEvent, DriverConfigError, DriverState, DriverStateError
from drivers.sim.dock import SimDock
from drivers.sim.world import SimModule, SimWorld

DEBOUNCE, CONFIRM = 0.01, 0.05


@pytest.fixture
async def dock() -> AsyncIterator[SimDock]:
    sensor = SimDock(debounce=DEBOUNCE, confirm=CONFIRM)
    await sensor.open()
    yield sensor
    await sensor.close()


async def next_event(sensor: SimDock, timeout: float = 1.0) -> DockEvent:
    return await asyncio.wait_for(anext(aiter(sensor.events())), timeout)


def now() -> float:
    return asyncio.get_running_loop().time()


async def test_magnet_on_docks_after_debounce_and_confirm(dock: SimDock) -> None:
    placed = now()
    dock.set_magnet(True)
    assert not await dock.present()
    event = await next_event(dock)
    assert event.docked and event.at == pytest.approx(placed + DEBOUNCE + CONFIRM, abs=0.002)
    assert await dock.present()


async def test_magnet_off_undocks_after_debounce(dock: SimDock) -> None:
    dock.set_magnet(True)
    await next_event(dock)
    lifted = now()
    dock.set_magnet(False)
    event = await next_event(dock)
    assert not event.docked and event.at == pytest.approx(lifted + DEBOUNCE, abs=0.002)


async def test_set_magnet_from_another_thread(dock: SimDock) -> None:
    mover = threading.Thread(target=dock.set_magnet, args=(True,))
    mover.start()
    event = await next_event(dock)
    await asyncio.to_thread(mover.join)
    assert event.docked and dock.magnet


async def test_slide_by_produces_no_event(dock: SimDock) -> None:
    dock.set_magnet(True)
    await asyncio.sleep(CONFIRM / 2)  # the magnet passing by for half the confirmation time: simulated, not a wait
    dock.set_magnet(False)
    with pytest.raises(asyncio.TimeoutError):
        await next_event(dock, timeout=DEBOUNCE + CONFIRM + 0.03)
    assert not await dock.present()


async def test_bounce_train_goes_through_the_debouncer() -> None:
    # Three round trips 2 ms apart: the level settles 12 ms after the magnet arrives, then debounce and confirm.
    sensor = SimDock(debounce=DEBOUNCE, confirm=CONFIRM, bounce=3, bounce_interval=0.002)
    await sensor.open()
    try:
        placed = now()
        sensor.set_magnet(True)
        event = await next_event(sensor)
        assert event.docked and event.at == pytest.approx(placed + 0.012 + DEBOUNCE + CONFIRM, abs=0.003)
        assert sensor._pump is not None and sensor._pump.debouncer.level is True
    finally:
        await sensor.close()


async def test_bounce_on_lift_still_undocks_once() -> None:
    sensor = SimDock(debounce=DEBOUNCE, confirm=CONFIRM, bounce=2, bounce_interval=0.003, magnet=True)
    await sensor.open()
    try:
        assert (await next_event(sensor)).docked
        sensor.set_magnet(False)
        assert not (await next_event(sensor)).docked
        with pytest.raises(asyncio.TimeoutError):
            await next_event(sensor, timeout=DEBOUNCE + CONFIRM)
    finally:
        await sensor.close()


async def test_stuck_switch_ignores_the_magnet_until_cleared(dock: SimDock) -> None:
    dock.set_magnet(True)
    await next_event(dock)
    dock.set_fault("stuck")
    dock.set_magnet(False)
    with pytest.raises(asyncio.TimeoutError):
        await next_event(dock, timeout=DEBOUNCE + CONFIRM)
    assert await dock.present() and dock.fault == "stuck" and not dock.magnet
    dock.set_fault(None)
    assert not (await next_event(dock)).docked


async def test_magnet_present_at_open_is_reported() -> None:
    sensor = SimDock(debounce=DEBOUNCE, confirm=CONFIRM, magnet=True)
    await sensor.open()
    try:
        assert (await next_event(sensor)).docked
    finally:
        await sensor.close()


async def test_follows_the_worlds_stack() -> None:
    world = SimWorld()
    sensor = SimDock(debounce=DEBOUNCE, confirm=CONFIRM, world=world)
    await sensor.open()
    try:
        world.stack(SimModule("m1", (0x0001912C,)))
        assert (await next_event(sensor)).docked
        await asyncio.to_thread(world.unstack, "m1")  # from a worker thread, as a sim API handler might
        assert not (await next_event(sensor)).docked
    finally:
        await sensor.close()


async def test_close_ends_iterators_and_present_needs_open() -> None:
    sensor = SimDock(debounce=DEBOUNCE, confirm=CONFIRM)
    with pytest.raises(DriverStateError, match="sim:dock"):
        await sensor.present()
    await sensor.open()
    consumer = asyncio.create_task(anext(aiter(sensor.events()), None))
    await asyncio.sleep(0)
    await sensor.close()
    assert await consumer is None
    assert sensor.state is DriverState.CLOSED
    sensor.set_magnet(True)  # harmless while closed


def test_bad_parameters_are_rejected() -> None:
    with pytest.raises(DriverConfigError, match="bounce_interval"):
        SimDock(debounce=0.01, bounce=2, bounce_interval=0.02)
    with pytest.raises(DriverConfigError, match="unknown fault"):
        SimDock().set_fault("open")  # type: ignore[arg-type]  # an unknown fault, on purpose
