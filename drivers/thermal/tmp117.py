"""TI TMP117 board temperature sensor over I2C: a pure register codec and an async ThermalSource.

Registers are 16 bits, MSB first on the wire (research/hardware.md section 1); reading one is a pointer write,
repeated start and a 2-byte read. Temp_Result is two's complement at 7.8125 m°C per LSB and reads 8000h until the
first conversion after power-on has completed, so 8000h means "no reading yet", never -256 C.
"""

from __future__ import annotations

from collections.abc import Mapping

from drivers.base import DeviceMismatchError
from drivers.i2c.device import I2cDevice
from drivers.i2c.transport import I2cBus

# ----------------------------------------------------------------------------- codec

REG_TEMP_RESULT = 0x00
REG_CONFIGURATION = 0x01
REG_THIGH_LIMIT = 0x02
REG_TLOW_LIMIT = 0x03
REG_TEMP_OFFSET = 0x07
REG_DEVICE_ID = 0x0F

DEVICE_ID = 0x0117  # bits 11:0; bits 15:12 are the die revision
POWER_ON_RESULT = b"\x80\x00"
LSB_C = 0.0078125
# The datasheet's specified operating range; anything outside is a broken sensor or a bad transfer.
MIN_PLAUSIBLE_C = -55.0
MAX_PLAUSIBLE_C = 150.0


def encode_temperature(celsius: float) -> bytes:
    """Degrees C -> the two register bytes (MSB first), rounded to the nearest 7.8125 m°C step."""
    steps = round(celsius / LSB_C)
    if not -0x8000 <= steps <= 0x7FFF:
        raise ValueError(f"{celsius} °C does not fit the TMP117's 16-bit range (-256 .. +255.99 °C)")
    return steps.to_bytes(2, "big", signed=True)


def decode_temperature(data: bytes) -> float:
    """The two register bytes (MSB first) -> degrees C. Does not judge plausibility (see `plausible`)."""
    if len(data) != 2:
        raise ValueError(f"a TMP117 temperature is 2 bytes, got {len(data)}")
    return int.from_bytes(data, "big", signed=True) * LSB_C


def plausible(data: bytes) -> float | None:
    """Decode a Temp_Result; None for the power-on value 8000h or a temperature outside -55..150 °C."""
    if data == POWER_ON_RESULT:
        return None
    celsius = decode_temperature(data)
    return celsius if MIN_PLAUSIBLE_C <= celsius <= MAX_PLAUSIBLE_C else None


def encode_register_write(register: int, value: int) -> bytes:
    """The write message for one register: pointer byte, then the 16-bit value MSB first."""
    if not 0 <= register <= 0xFF or not 0 <= value <= 0xFFFF:
        raise ValueError(f"register 0x{register:02x} / value 0x{value:04x} out of range")
    return bytes([register]) + value.to_bytes(2, "big")


def decode_device_id(data: bytes) -> tuple[int, int]:
    """Device_ID register bytes -> (device id in bits 11:0, die revision in bits 15:12)."""
    word = int.from_bytes(data, "big")
    return word & 0x0FFF, word >> 12


# ----------------------------------------------------------------------------- driver


class Tmp117(I2cDevice):
    """One TMP117 as a ThermalSource with a single zone (for example "board")."""

    _kind = "tmp117"
    # Unlike the power chips, a TMP117 that fails to open stays CLOSED, as this driver always has (its tests pin
    # it); the coordinator reopens a driver that is not OPEN on its next poll either way.
    _faults_on_failed_open = False
    # close() only releases the bus: the sensor keeps converting in its reset configuration, its safe state.

    def __init__(self, bus: I2cBus, address: int = 0x48, zone: str = "board", critical_c: float | None = None) -> None:
        super().__init__(bus, address)
        self._zone = zone
        self._critical_c = critical_c
        self.revision: int | None = None

    async def _identify(self) -> None:
        """Check Device_ID reads 0117h (DeviceMismatchError otherwise) and note the die revision."""
        raw = await self._bus.read(self._address, bytes([REG_DEVICE_ID]), 2)
        device_id, revision = decode_device_id(raw)
        if device_id != DEVICE_ID:
            raise DeviceMismatchError(
                f"{self.name}: Device_ID register (0Fh) reads 0x{int.from_bytes(raw, 'big'):04x}; "
                f"a TMP117 reads 0x{DEVICE_ID:04x} in bits 11:0. Is another chip at this address?"
            )
        self.revision = revision

    async def read(self) -> Mapping[str, float | None]:
        """{zone: °C}, or {zone: None} before the first conversion or for an implausible value.

        A NACK or timeout raises NotAcknowledgedError/BusTimeoutError: whether the sensor is "unavailable"
        after a bus error is the coordinator's call, not this driver's.
        """
        self._require_open()
        raw = await self._bus.read(self._address, bytes([REG_TEMP_RESULT]), 2)
        return {self._zone: plausible(raw)}

    async def critical_trips(self) -> Mapping[str, float]:
        """{zone: critical_c} when one was configured; the TMP117 itself has no shutdown trip."""
        return {} if self._critical_c is None else {self._zone: self._critical_c}

    async def write_register(self, register: int, value: int) -> None:
        """Write one 16-bit register (configuration, limits, offset)."""
        self._require_open()
        await self._bus.write(self._address, encode_register_write(register, value))

    async def read_register(self, register: int) -> int:
        """Read one 16-bit register."""
        self._require_open()
        return int.from_bytes(await self._bus.read(self._address, bytes([register]), 2), "big")
