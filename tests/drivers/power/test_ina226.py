"""INA226 driver against its register-level twin on the fake bus: wire bytes, readings, brown-out, faults."""

from __future__ import annotations

import asyncio
import errno
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from drivers.base import (
    BusTimeoutError,
    DeviceMismatchError,
    DriverConfigError,
    DriverError,
    DriverState,
    ImplausibleReadingError,
    NotAcknowledgedError,
    PowerSample,
)
from drivers.i2c.chips.ina226 import Ina226Model
from drivers.i2c.fake import FakeSMBus, FaultInjector, FaultKind, FaultRule
from drivers.i2c.transport import I2cBus
from drivers.power.ina226 import Ina226, RawReading, calibration, config_word, decode_reading


class Supply:
    """What flows through the shunt: a bus voltage and a current the test can change."""

    def __init__(self, bus_mv: float = 9000.0, current_ma: float = 1234.0) -> None:
        self.bus_mv = bus_mv
        self.current_ma = current_ma


@dataclass
class Rig:
    supply: Supply
    model: Ina226Model
    fake: FakeSMBus
    driver: Ina226


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    supply = Supply()
    model = Ina226Model(bus_mv=lambda: supply.bus_mv, current_ma=lambda: supply.current_ma, shunt_ohms=0.01)
    fake = FakeSMBus(FaultInjector(seed=5, timeout_seconds=0.05))
    fake.attach(0x40, model)
    driver = Ina226(I2cBus("i2c-7", lambda: fake))
    await driver.open()
    yield Rig(supply, model, fake, driver)
    fake.faults.set_rules([])
    await driver.close()


async def test_open_identifies_resets_calibrates_and_configures(rig: Rig) -> None:
    assert rig.model.writes == [
        b"\xfe",
        b"\xff",  # manufacturer and die ID
        b"\x00\x80\x00",  # Configuration: RST
        b"\x05\x0d\x1b",  # Calibration 3355 = trunc(0.00512 / (5 A / 2^15 x 0.01 ohm))
        b"\x00\x45\x27",  # Configuration: 16 averages, 1.1 ms bus and shunt, continuous
        b"\x00",
        b"\x05",  # read both back
    ]
    assert rig.driver.name == "ina226:i2c-7@0x40" and rig.driver.state is DriverState.OPEN


async def test_sample_reads_volts_amps_watts(rig: Rig) -> None:
    sample = await rig.driver.sample()
    assert sample.bus_mv == 9000.0
    assert sample.current_ma == pytest.approx(1234.0, abs=0.2)  # Current_LSB is 0.153 mA
    assert sample.power_mw == pytest.approx(9.0 * 1234.0, abs=5.0)  # Power_LSB is 25 x Current_LSB
    rig.supply.current_ma = -500.0  # current flowing back into the dock
    await asyncio.sleep(0.04)  # simulated physics: a conversion period passes under the new current (not a wait)
    sample = await rig.driver.sample()
    assert sample.current_ma == pytest.approx(-500.0, abs=0.2) and sample.power_mw == pytest.approx(4500.0, abs=5.0)


async def test_concurrent_samplers_do_not_steal_each_others_conversions(rig: Rig) -> None:
    # Each sampler needs a conversion of its own; unserialised, the last of six would wait past its deadline.
    samples = await asyncio.gather(*(rig.driver.sample() for _ in range(6)))
    assert all(s.current_ma == pytest.approx(1234.0, abs=0.2) for s in samples)


async def test_an_undocked_port_reads_zero_not_an_error(rig: Rig) -> None:
    rig.supply.bus_mv, rig.supply.current_ma = 0.0, 0.0
    await asyncio.sleep(0.04)  # simulated physics: a conversion period passes with the port undocked (not a wait)
    assert await rig.driver.sample() == PowerSample(0.0, 0.0, 0.0)


async def test_a_brown_out_is_reported_and_repaired(rig: Rig) -> None:
    await rig.driver.sample()
    rig.model.on_write(b"\x00\x80\x00")  # the chip resets itself: calibration 0, current and power read 0
    with pytest.raises(ImplausibleReadingError, match="calibration reads 0x0000, not the 0x0d1b written"):
        await rig.driver.sample()
    assert (await rig.driver.sample()).current_ma == pytest.approx(1234.0, abs=0.2)


async def test_wrong_die_id() -> None:
    model = Ina226Model(bus_mv=lambda: 5000.0, current_ma=lambda: 0.0)
    model.registers[0xFF] = 0x2380
    fake = FakeSMBus()
    fake.attach(0x40, model)
    driver = Ina226(I2cBus("i2c-7", lambda: fake))
    with pytest.raises(DeviceMismatchError, match="read 0x5449/0x2380, expected 0x5449/0x226x"):
        await driver.open()
    assert driver.state is DriverState.FAULTED and fake.closed


def test_a_shunt_and_range_the_chip_cannot_measure() -> None:
    bus = I2cBus("i2c-7", FakeSMBus)
    with pytest.raises(DriverConfigError, match="100.0 mV, beyond the shunt input's 81.92 mV"):
        Ina226(bus, shunt_ohms=0.01, max_current_a=10.0)
    with pytest.raises(DriverConfigError, match="averages 3 is not one of"):
        Ina226(bus, averages=3)


@pytest.mark.parametrize(
    ("kind", "error", "code"),
    [
        ("nack", NotAcknowledgedError, errno.EREMOTEIO),
        ("enxio", NotAcknowledgedError, errno.ENXIO),
        ("timeout", BusTimeoutError, errno.ETIMEDOUT),
        ("stuck", ImplausibleReadingError, None),  # Mask/Enable repeats CVRF=0: no conversion ever seen to finish
        ("implausible", ImplausibleReadingError, None),  # power-on values: no CVRF, calibration 0
    ],
)
async def test_faults_are_driver_errors_and_the_driver_recovers(
    rig: Rig, kind: FaultKind, error: type[DriverError], code: int | None
) -> None:
    await rig.driver.sample()
    rig.fake.faults.set_rules([FaultRule(kind, 1.0, 0x40)])
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(error) as caught:
        await rig.driver.sample()
    assert loop.time() - started < 1.0
    if code is not None:
        assert getattr(caught.value, "errno", None) == code
    rig.fake.faults.set_rules([])
    assert (await rig.driver.sample()).current_ma == pytest.approx(1234.0, abs=0.2)


async def test_a_changing_load_with_stale_reads_never_yields_a_mixed_sample() -> None:
    currents = itertools.cycle([500.0, 2000.0])  # every conversion sees the other load
    model = Ina226Model(bus_mv=lambda: 12000.0, current_ma=lambda: next(currents), shunt_ohms=0.01)
    fake = FakeSMBus(FaultInjector(seed=11))
    fake.attach(0x40, model)
    driver = Ina226(I2cBus("i2c-7", lambda: fake), averages=4)
    await driver.open()
    fake.faults.set_rules([FaultRule("stuck", 0.3, 0x40)])
    good = 0
    for _ in range(12):
        try:
            sample = await driver.sample()
        except ImplausibleReadingError:
            continue
        good += 1
        matches = [c for c in (500.0, 2000.0) if abs(sample.current_ma - c) < 0.5]
        assert matches, sample
        assert sample.power_mw == pytest.approx(12.0 * matches[0], rel=0.01)
    assert good > 0
    fake.faults.set_rules([])
    await driver.close()


async def test_close_restores_the_power_on_configuration(rig: Rig) -> None:
    await rig.driver.close()
    assert rig.model.writes[-1] == b"\x00\x80\x00"
    assert rig.model.registers[0x00] == 0x4127 and rig.model.registers[0x05] == 0
    assert rig.driver.state is DriverState.CLOSED and rig.fake.closed


# ----------------------------------------------------------------------------- codec


@pytest.mark.parametrize(
    ("averages", "conversion_us", "word"),
    [
        (1, 1100, 0x4127),  # the power-on configuration
        (16, 1100, 0x4527),
        (1024, 8244, 0x4FFF),
        (4, 140, 0x4207),
    ],
)
def test_config_word(averages: int, conversion_us: int, word: int) -> None:
    assert config_word(averages, conversion_us) == word


def test_calibration_and_reading_arithmetic() -> None:
    assert calibration(0.01, 5.0) == 3355
    assert calibration(0.002, 20.0) == 4194
    # 1234 mA through 10 mohm at 9 V, as the chip computes it: shunt 4936, current 8086, bus 7200, power 2910.
    sample = decode_reading(RawReading(shunt=4936, bus=7200, current=8086, power=2910), 3355, 0.01, 5.0)
    assert sample.bus_mv == 9000.0
    assert sample.current_ma == pytest.approx(1233.99, abs=0.01)
    assert sample.power_mw == pytest.approx(11102.2, abs=0.1)
    negative = decode_reading(
        RawReading(shunt=(-2000) & 0xFFFF, bus=7200, current=(-3276) & 0xFFFF, power=1179), 3355, 0.01, 5.0
    )
    assert negative.current_ma < 0 < negative.power_mw


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (RawReading(shunt=4936, bus=7200, current=8086, power=2000), "power register 2000 does not match"),
        (RawReading(shunt=4936, bus=7200, current=0, power=0), "current register 0 does not match"),
        (RawReading(shunt=4936, bus=0x8000, current=8086, power=0), "bit 15 is always 0"),
        (RawReading(shunt=4936, bus=0, current=8086, power=0), "flows while the bus reads 0 V"),
    ],
)
def test_readings_no_working_chip_produces(raw: RawReading, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_reading(raw, 3355, 0.01, 5.0)


# ----------------------------------------------------------------------------- the twin


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _read(model: Ina226Model, register: int) -> int:
    model.on_write(bytes([register]))
    return int.from_bytes(model.on_read(2), "big")


def test_twin_speaks_msb_first_which_smbus_words_get_backwards() -> None:
    fake = FakeSMBus()
    fake.attach(0x40, Ina226Model(bus_mv=lambda: 0.0, current_ma=lambda: 0.0))
    assert fake.read_i2c_block_data(0x40, 0xFE, 2) == [0x54, 0x49]
    assert fake.read_word_data(0x40, 0xFE) == 0x4954  # the trap research/hardware.md measured


def test_twin_conversion_timing_cvrf_and_modes() -> None:
    clock = Clock()
    model = Ina226Model(bus_mv=lambda: 9000.0, current_ma=lambda: 1234.0, shunt_ohms=0.01, clock=clock)
    assert _read(model, 0x02) == 0 and not _read(model, 0x06) & 0x08  # nothing converted yet
    clock.now += 0.0023  # one 2.2 ms conversion (1 average, 1.1 ms + 1.1 ms)
    assert _read(model, 0x02) == 7200 and _read(model, 0x01) == 4936
    assert _read(model, 0x04) == 0 and _read(model, 0x03) == 0  # not calibrated
    assert _read(model, 0x06) & 0x08 and not _read(model, 0x06) & 0x08  # CVRF clears when read
    model.on_write(b"\x05\x0d\x1b")
    model.on_write(b"\x00\x41\x23")  # triggered shunt and bus: one conversion
    clock.now += 0.0023
    assert (_read(model, 0x04), _read(model, 0x03)) == (8086, 2910)
    before = model.conversions
    clock.now += 1.0
    _read(model, 0x02)
    assert model.conversions == before  # triggered mode converts once per configuration write


def test_twin_alert_and_reset() -> None:
    clock = Clock()
    model = Ina226Model(bus_mv=lambda: 9000.0, current_ma=lambda: 100.0, clock=clock)
    model.on_write(b"\x07\x1c\x20")  # alert limit 7200 = 9.0 V
    model.on_write(b"\x06\x10\x00")  # BUL: bus under limit
    clock.now += 0.0023
    assert not _read(model, 0x06) & 0x10
    model.on_write(b"\x06\x20\x00")  # BOL: bus over limit (7200 is not over 7200)
    model.on_write(b"\x07\x1c\x1f")
    clock.now += 0.0023
    assert _read(model, 0x06) & 0x10  # AFF
    model.on_write(b"\x00\x80\x00")
    assert (_read(model, 0x00), _read(model, 0x06), _read(model, 0x07)) == (0x4127, 0, 0)
    model.on_write(b"\x02")
    assert model.implausible(2) == b"\x00\x00"
    model.on_write(b"\x00")
    assert model.implausible(2) == b"\x41\x27"
