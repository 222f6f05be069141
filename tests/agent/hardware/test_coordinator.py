"""The poll coordinator on a flaky bus: no crash, and exactly one unavailable/recovered log pair per outage."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from agent.hardware.coordinator import Coordinator
from drivers.i2c import I2cBus
from drivers.i2c.chips.tmp117 import Tmp117Model
from drivers.i2c.fake import FakeSMBus, FaultInjector, FaultRule
from drivers.thermal.tmp117 import Tmp117


async def test_thousand_polls_at_ten_percent_nack_log_each_outage_once() -> None:
    faults = FaultInjector(seed=20261122, rules=[FaultRule("nack", 0.10)])
    fake = FakeSMBus(faults)
    fake.attach(0x48, Tmp117Model(temperature_c=lambda: 41.5))
    bus = I2cBus("i2c-1", lambda: fake)
    sensor = Tmp117(bus, 0x48, zone="board")
    readings: list[float | None] = []
    coordinator = Coordinator(
        "thermal:board", sensor, sensor.read, interval=0.001, on_data=lambda data: readings.append(data["board"])
    )
    poll_failed: list[bool] = []
    with capture_logs() as logs:
        for _ in range(1000):
            before = len(faults.history)
            await coordinator.poll_once()  # never raises, whatever the bus does
            poll_failed.append(any(kind is not None for _, kind in faults.history[before:]))
    await sensor.close()

    # Ground truth from the injector: an outage is a run of consecutive polls that met a NACK.
    outages = sum(1 for i, failed in enumerate(poll_failed) if failed and (i == 0 or not poll_failed[i - 1]))
    assert outages >= 50  # the test really exercised the failure path
    events = [
        entry["event"]
        for entry in logs
        if entry["event"] in ("hardware_source_unavailable", "hardware_source_recovered")
    ]
    assert events.count("hardware_source_unavailable") == outages
    assert events.count("hardware_source_recovered") == outages - (1 if poll_failed[-1] else 0)
    assert all(a != b for a, b in zip(events, events[1:], strict=False)), "unavailable and recovered must alternate"
    assert coordinator.failed_polls == sum(poll_failed)
    assert coordinator.available is not poll_failed[-1]
    assert readings and all(r == 41.5 for r in readings)


async def test_polls_keep_a_fixed_schedule_and_report_jitter() -> None:
    fake = FakeSMBus()
    fake.attach(0x48, Tmp117Model(temperature_c=lambda: 30.0))
    bus = I2cBus("i2c-1", lambda: fake)
    sensor = Tmp117(bus, 0x48)
    coordinator = Coordinator("thermal:board", sensor, sensor.read, interval=0.02)
    task = asyncio.create_task(coordinator.run())
    await asyncio.sleep(0.5)  # the measurement window the schedule is judged over (25 slots), not a wait
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await sensor.close()
    assert 20 <= coordinator.polls <= 27  # one per 20 ms slot, no bursts
    jitter = coordinator.jitter_ms()
    assert set(jitter) == {"p50", "p99", "max"} and jitter["p50"] < 20
    assert coordinator.report()["available"] is True
