"""TMP117: the pure codec byte for byte, the chip model's datasheet behaviour, and the driver over FakeSMBus."""

from __future__ import annotations

import pytest

from drivers.base import (
    BusError,
    BusTimeoutError,
    DeviceMismatchError,
    DriverState,
    DriverStateError,
    NotAcknowledgedError,
)
from drivers.i2c.chips import tmp117 as chip
from drivers.i2c.chips.tmp117 import Tmp117Model
from drivers.i2c.fake import FakeSMBus, FaultInjector, FaultKind, FaultRule
from drivers.i2c.transport import I2cBus
from drivers.thermal.tmp117 import (
    Tmp117,
    decode_device_id,
    decode_temperature,
    encode_register_write,
    encode_temperature,
    plausible,
)
from tests.drivers.threads import running
from tests.waiting import until

# ----------------------------------------------------------------------------- codec


@pytest.mark.parametrize(
    ("celsius", "wire"),
    [
        (25.0, b"\x0c\x80"),
        (0.0078125, b"\x00\x01"),
        (0.0, b"\x00\x00"),
        (-0.0078125, b"\xff\xff"),
        (-10.0, b"\xfb\x00"),
        (-55.0, b"\xe4\x80"),
        (150.0, b"\x4b\x00"),
        (-256.0, b"\x80\x00"),
        (255.9921875, b"\x7f\xff"),
    ],
)
def test_temperature_codec_is_byte_exact(celsius: float, wire: bytes) -> None:
    assert encode_temperature(celsius) == wire
    assert decode_temperature(wire) == celsius


def test_encoding_rounds_to_the_nearest_lsb() -> None:
    assert encode_temperature(25.004) == b"\x0c\x81"  # 25.0039 is one LSB above 25.0
    assert encode_temperature(25.003) == b"\x0c\x80"


@pytest.mark.parametrize("celsius", [256.0, -256.01])
def test_encoding_refuses_values_outside_16_bits(celsius: float) -> None:
    with pytest.raises(ValueError, match="16-bit"):
        encode_temperature(celsius)


def test_decode_wants_exactly_two_bytes() -> None:
    with pytest.raises(ValueError, match="2 bytes"):
        decode_temperature(b"\x0c")


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (b"\x80\x00", None),  # power-on value: no conversion yet
        (b"\x0c\x80", 25.0),
        (b"\xe4\x80", -55.0),
        (b"\xe4\x7f", None),  # one LSB below the rated range
        (b"\x4b\x00", 150.0),
        (b"\x4b\x01", None),
        (b"\x7f\xff", None),
    ],
)
def test_plausible_rejects_reset_value_and_out_of_range(wire: bytes, expected: float | None) -> None:
    assert plausible(wire) == expected


@pytest.mark.parametrize(
    ("register", "value", "wire"),
    [(0x01, 0x0220, b"\x01\x02\x20"), (0x02, 0x6000, b"\x02\x60\x00"), (0x07, 0xFF80, b"\x07\xff\x80")],
)
def test_register_write_message_is_pointer_then_msb_first(register: int, value: int, wire: bytes) -> None:
    assert encode_register_write(register, value) == wire


def test_device_id_splits_revision_from_id() -> None:
    assert decode_device_id(b"\x01\x17") == (0x117, 0)
    assert decode_device_id(b"\x11\x17") == (0x117, 1)


# ----------------------------------------------------------------------------- chip model


class Clock:
    """A hand-turned monotonic clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def read(model: Tmp117Model, register: int) -> int:
    model.on_write(bytes([register]))
    return int.from_bytes(model.on_read(2), "big")


def test_model_reset_values_match_the_datasheet() -> None:
    clock = Clock()
    model = Tmp117Model(lambda: 25.0, first_conversion_s=0.0155, clock=clock)
    assert read(model, chip.TEMP_RESULT) == 0x8000  # before the first conversion
    assert read(model, chip.CONFIGURATION) == 0x0220
    assert read(model, chip.THIGH_LIMIT) == 0x6000
    assert read(model, chip.TLOW_LIMIT) == 0x8000
    assert read(model, chip.TEMP_OFFSET) == 0x0000
    assert read(model, chip.DEVICE_ID) == 0x0117
    clock.now += 0.0155
    assert read(model, chip.TEMP_RESULT) == 0x0C80


def test_model_data_ready_sets_per_conversion_and_clears_on_read() -> None:
    clock = Clock()
    model = Tmp117Model(lambda: 25.0, clock=clock)
    assert read(model, chip.CONFIGURATION) & chip.DATA_READY
    assert not read(model, chip.CONFIGURATION) & chip.DATA_READY  # cleared by the previous read
    clock.now += 1.0  # default CONV=4: one conversion per second
    assert read(model, chip.CONFIGURATION) & chip.DATA_READY


def test_model_writes_offset_limits_and_alerts() -> None:
    clock = Clock()
    model = Tmp117Model(lambda: 30.0, clock=clock)
    model.on_write(b"\x07\x02\x80")  # +5 °C offset
    model.on_write(b"\x02\x11\x80")  # THigh 35 °C
    assert read(model, chip.THIGH_LIMIT) == 0x1180
    clock.now += 1.0
    assert read(model, chip.TEMP_RESULT) == 0x1180  # 30 + 5 °C
    model.on_write(b"\x02\x0f\x00")  # THigh 30 °C
    clock.now += 1.0
    config = read(model, chip.CONFIGURATION)
    assert config & chip.HIGH_ALERT
    assert not read(model, chip.CONFIGURATION) & chip.HIGH_ALERT  # alert mode: flags clear on read


def test_model_device_id_is_read_only_and_soft_reset_restores_defaults() -> None:
    model = Tmp117Model(lambda: 20.0)
    model.on_write(b"\x0f\x12\x34")
    assert read(model, chip.DEVICE_ID) == 0x0117
    model.on_write(b"\x03\x0a\x00")
    model.on_write(b"\x01\x02\x22")  # Soft_Reset bit
    assert read(model, chip.TLOW_LIMIT) == 0x8000
    assert read(model, chip.CONFIGURATION) & ~chip.DATA_READY == 0x0220


def test_model_one_shot_converts_once_then_shuts_down() -> None:
    clock = Clock()
    temperature = [20.0]
    model = Tmp117Model(lambda: temperature[0], clock=clock)
    assert read(model, chip.TEMP_RESULT) == 0x0A00
    model.on_write(b"\x01\x0e\x20")  # MOD=11 one-shot, AVG=8: 125 ms
    temperature[0] = 40.0
    clock.now += 0.125
    assert read(model, chip.TEMP_RESULT) == 0x1400
    assert read(model, chip.CONFIGURATION) >> 10 & 0b11 == chip.MODE_SHUTDOWN
    temperature[0] = 60.0
    clock.now += 5.0
    assert read(model, chip.TEMP_RESULT) == 0x1400  # shut down: the result holds


# ----------------------------------------------------------------------------- driver over FakeSMBus


@pytest.fixture
def fake_bus() -> FakeSMBus:
    return FakeSMBus(FaultInjector(seed=1, timeout_seconds=0.2))


@pytest.fixture
def bus(fake_bus: FakeSMBus) -> I2cBus:
    return I2cBus("i2c-7", lambda: fake_bus, timeout=0.1)


async def test_reads_the_board_temperature_with_pointer_then_read(fake_bus: FakeSMBus, bus: I2cBus) -> None:
    model = Tmp117Model(lambda: 25.0)
    fake_bus.attach(0x48, model)
    sensor = Tmp117(bus, zone="board")
    await sensor.open()
    states = [sensor.state]
    assert sensor.name == "tmp117:i2c-7@0x48"
    assert model.writes == [b"\x0f"]  # Device_ID pointer
    assert await sensor.read() == {"board": 25.0}
    assert model.writes[-1] == b"\x00"  # Temp_Result pointer
    await sensor.close()
    states.append(sensor.state)
    assert states == [DriverState.OPEN, DriverState.CLOSED]
    assert fake_bus.closed


async def test_write_register_puts_msb_first_bytes_on_the_wire(fake_bus: FakeSMBus, bus: I2cBus) -> None:
    model = Tmp117Model(lambda: 25.0)
    fake_bus.attach(0x49, model)
    sensor = Tmp117(bus, address=0x49)
    await sensor.open()
    await sensor.write_register(0x02, 0x1900)
    assert model.writes[-1] == b"\x02\x19\x00"
    assert await sensor.read_register(0x02) == 0x1900
    await sensor.close()


async def test_before_the_first_conversion_the_zone_is_offline(fake_bus: FakeSMBus, bus: I2cBus) -> None:
    clock = Clock()
    fake_bus.attach(0x48, Tmp117Model(lambda: -10.0, first_conversion_s=0.0155, clock=clock))
    sensor = Tmp117(bus)
    await sensor.open()
    assert await sensor.read() == {"board": None}
    clock.now += 0.0155
    assert await sensor.read() == {"board": -10.0}
    await sensor.close()


async def test_out_of_range_reading_is_offline(fake_bus: FakeSMBus, bus: I2cBus) -> None:
    fake_bus.attach(0x48, Tmp117Model(lambda: 200.0))
    sensor = Tmp117(bus)
    await sensor.open()
    assert await sensor.read() == {"board": None}
    await sensor.close()


async def test_critical_trip_only_when_configured(fake_bus: FakeSMBus, bus: I2cBus) -> None:
    fake_bus.attach(0x48, Tmp117Model(lambda: 25.0))
    plain, with_trip = Tmp117(bus), Tmp117(bus, zone="enclosure", critical_c=85.0)
    await plain.open()
    await with_trip.open()
    assert await plain.critical_trips() == {}
    assert await with_trip.critical_trips() == {"enclosure": 85.0}
    await plain.close()
    await with_trip.close()


class OtherChip:
    """An INA226 answering its die ID where a TMP117 was expected."""

    def on_write(self, data: bytes) -> None:
        pass

    def on_read(self, length: int) -> bytes:
        return b"\x22\x60"[:length]

    def implausible(self, length: int) -> bytes:
        return b"\x00" * length


async def test_open_rejects_another_chip_and_releases_the_bus(fake_bus: FakeSMBus, bus: I2cBus) -> None:
    fake_bus.attach(0x48, OtherChip())
    sensor = Tmp117(bus)
    with pytest.raises(DeviceMismatchError, match=r"0x2260.*0x0117"):
        await sensor.open()
    assert sensor.state is DriverState.CLOSED
    assert fake_bus.closed


async def test_open_without_a_chip_is_a_nack(bus: I2cBus) -> None:
    with pytest.raises(NotAcknowledgedError):
        await Tmp117(bus).open()


async def test_read_before_open_is_a_state_error(bus: I2cBus) -> None:
    with pytest.raises(DriverStateError, match="open"):
        await Tmp117(bus).read()


@pytest.mark.parametrize(
    ("kind", "error"),
    [("nack", NotAcknowledgedError), ("enxio", NotAcknowledgedError), ("timeout", BusTimeoutError)],
)
async def test_bus_faults_raise_bus_errors(
    fake_bus: FakeSMBus, bus: I2cBus, kind: FaultKind, error: type[BusError]
) -> None:
    fake_bus.attach(0x48, Tmp117Model(lambda: 25.0))
    sensor = Tmp117(bus)
    await sensor.open()
    fake_bus.faults.set_rules([FaultRule(kind, 1.0)])
    with pytest.raises(error):
        await sensor.read()
    assert sensor.state is DriverState.OPEN  # the coordinator decides what a bus error means
    fake_bus.faults.set_rules([])
    if kind == "timeout":
        # The timed-out transfer still holds the bus thread.
        await until(lambda: not running(FakeSMBus.i2c_rdwr.__code__), "the timed-out transfer giving up")
    assert await sensor.read() == {"board": 25.0}
    await sensor.close()


async def test_implausible_answer_makes_the_zone_offline(fake_bus: FakeSMBus, bus: I2cBus) -> None:
    fake_bus.attach(0x48, Tmp117Model(lambda: 25.0))
    sensor = Tmp117(bus)
    await sensor.open()
    fake_bus.faults.set_rules([FaultRule("implausible", 1.0)])
    assert await sensor.read() == {"board": None}
    fake_bus.faults.set_rules([])
    assert await sensor.read() == {"board": 25.0}
    await sensor.close()


async def test_stuck_bus_replays_the_last_reading_until_it_recovers(fake_bus: FakeSMBus, bus: I2cBus) -> None:
    clock = Clock()
    temperature = [25.0]
    fake_bus.attach(0x48, Tmp117Model(lambda: temperature[0], clock=clock))
    sensor = Tmp117(bus)
    await sensor.open()
    assert await sensor.read() == {"board": 25.0}
    fake_bus.faults.set_rules([FaultRule("stuck", 1.0)])
    temperature[0] = 60.0
    clock.now += 1.0
    # A stuck answer is indistinguishable from a steady temperature in one read: it decodes to the old value,
    # and judging staleness over time belongs to the coordinator.
    assert await sensor.read() == {"board": 25.0}
    fake_bus.faults.set_rules([])
    assert await sensor.read() == {"board": 60.0}
    await sensor.close()
