"""TI INA226 current/power monitor as FakeSMBus sees it: 16-bit MSB-first registers behind a pointer register.

Register map (research/hardware.md section 2, TI datasheet SBOS547): 00h Configuration (reset 4127h: 1 average,
1.1 ms bus and shunt conversion, continuous shunt and bus), 01h Shunt Voltage (two's complement, 2.5 uV/LSB),
02h Bus Voltage (1.25 mV/LSB, bit 15 always 0), 03h Power (25 x Current_LSB per LSB), 04h Current (two's
complement), 05h Calibration (bit 15 reserved; 0 until written, so Current and Power read 0), 06h Mask/Enable,
07h Alert Limit, FEh Manufacturer ID (5449h), FFh Die ID (2260h).

The first byte of a write sets the pointer; two more bytes (MSB first) write the register. A read returns the
pointed-at register, MSB first (longer reads are padded by the bus, not modelled). Conversions follow the
configured timing, lazily: whenever the host touches the chip the model works out how many conversions have
completed since the configuration was written, samples `bus_mv()` and `current_ma()` once per completed
conversion, and computes the results with the datasheet's integer equations:
Current = trunc(Shunt x CAL / 2048), Power = trunc(|Current| x Bus / 20000). Mask/Enable's CVRF (bit 3) is set
when a conversion completes and cleared by reading Mask/Enable or writing Configuration; OVF (bit 2) flags an
arithmetic overflow; AFF (bit 4) follows the highest enabled alert function (SOL, SUL, BOL, BUL, POL) against
Alert Limit, latched when LEN (bit 0) is set. Writing Configuration with RST (bit 15) restores every power-on
value. A garbled read ("implausible") is the chip after a brown-out: the register's power-on value.
This module does not share the codec with the driver, so a codec bug cannot hide.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from drivers.i2c.chips.register16 import Register16Model, word_bytes

CONFIGURATION = 0x00
SHUNT_VOLTAGE = 0x01
BUS_VOLTAGE = 0x02
POWER = 0x03
CURRENT = 0x04
CALIBRATION = 0x05
MASK_ENABLE = 0x06
ALERT_LIMIT = 0x07
MANUFACTURER_ID = 0xFE
DIE_ID = 0xFF

CONFIG_RESET = 0x4127
RESET_BIT = 1 << 15
CVRF = 1 << 3
OVF = 1 << 2
AFF = 1 << 4
LEN = 1 << 0
_MASK_WRITABLE = 0xFC03  # SOL SUL BOL BUL POL CNVR, APOL, LEN

_POWER_ON: dict[int, int] = {
    CONFIGURATION: CONFIG_RESET,
    SHUNT_VOLTAGE: 0,
    BUS_VOLTAGE: 0,
    POWER: 0,
    CURRENT: 0,
    CALIBRATION: 0,
    MASK_ENABLE: 0,
    ALERT_LIMIT: 0,
    MANUFACTURER_ID: 0x5449,
    DIE_ID: 0x2260,
}
_AVERAGES = (1, 4, 16, 64, 128, 256, 512, 1024)
_CONVERSION_S = (140e-6, 204e-6, 332e-6, 588e-6, 1.1e-3, 2.116e-3, 4.156e-3, 8.244e-3)


def _signed(value: int) -> int:
    return value - 0x10000 if value & 0x8000 else value


def _clamp(value: int, low: int, high: int) -> tuple[int, bool]:
    clamped = max(low, min(high, value))
    return clamped, clamped != value


class Ina226Model(Register16Model):
    """An INA226 measuring `bus_mv()` across a `shunt_ohms` shunt carrying `current_ma()`."""

    def __init__(
        self,
        bus_mv: Callable[[], float],
        current_ma: Callable[[], float],
        shunt_ohms: float = 0.01,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus_mv = bus_mv
        self.current_ma = current_ma
        self.shunt_ohms = shunt_ohms
        self._clock = clock
        super().__init__(pointer=CONFIGURATION)
        self.conversions = 0  # how many conversions have completed (for tests)
        self._reset()

    def _reset(self) -> None:
        self.registers = dict(_POWER_ON)
        self._restart()

    def _restart(self) -> None:
        self._base = self._clock()
        self._seen = 0

    # ------------------------------------------------------------------ I2cTarget

    def implausible(self, length: int) -> bytes:
        """A brown-out: the pointed-at register reads its power-on value (results and calibration 0)."""
        return word_bytes(_POWER_ON.get(self.pointer, 0), length)

    def _after_read(self, register: int, value: int) -> None:
        if register == MASK_ENABLE:
            # Reading Mask/Enable clears CVRF, and AFF too when it is latched (LEN).
            self.registers[MASK_ENABLE] &= ~(CVRF | (AFF if value & LEN else 0))

    # ------------------------------------------------------------------ behaviour

    def _write_register(self, register: int, value: int) -> None:
        if register == CONFIGURATION:
            if value & RESET_BIT:
                self._reset()
                return
            self._convert()  # conversions up to now ran under the old settings
            self.registers[CONFIGURATION] = value & 0x0FFF | 0x4000
            self.registers[MASK_ENABLE] &= ~CVRF
            self._restart()
        elif register == CALIBRATION:
            self.registers[CALIBRATION] = value & 0x7FFF
        elif register == MASK_ENABLE:
            self.registers[MASK_ENABLE] = self.registers[MASK_ENABLE] & ~_MASK_WRITABLE | value & _MASK_WRITABLE
        elif register == ALERT_LIMIT:
            self.registers[ALERT_LIMIT] = value
        # Results and IDs are read-only; writes to them are ignored.

    def period_s(self) -> float:
        """Time for one averaged conversion of the enabled channels."""
        config = self.registers[CONFIGURATION]
        mode = config & 0b111
        bus = _CONVERSION_S[config >> 6 & 0b111] if mode & 0b010 else 0.0
        shunt = _CONVERSION_S[config >> 3 & 0b111] if mode & 0b001 else 0.0
        return _AVERAGES[config >> 9 & 0b111] * (bus + shunt)

    def _convert(self) -> None:
        mode = self.registers[CONFIGURATION] & 0b111
        if mode & 0b011 == 0:
            return  # power-down: the results hold
        completed = int((self._clock() - self._base) / self.period_s())
        if mode & 0b100 == 0:
            completed = min(completed, 1)  # triggered: one conversion per Configuration write
        if completed <= self._seen:
            return
        self._seen = completed
        self.conversions += 1
        registers = self.registers
        overflow = False
        if mode & 0b001:
            shunt_raw, clipped = _clamp(round(self.current_ma() / 1000 * self.shunt_ohms / 2.5e-6), -0x8000, 0x7FFF)
            registers[SHUNT_VOLTAGE] = shunt_raw & 0xFFFF
            overflow |= clipped
        if mode & 0b010:
            registers[BUS_VOLTAGE] = _clamp(round(self.bus_mv() / 1.25), 0, 0x7FFF)[0]
        current, clipped = _clamp(
            int(_signed(registers[SHUNT_VOLTAGE]) * registers[CALIBRATION] / 2048), -0x8000, 0x7FFF
        )
        overflow |= clipped
        power, clipped = _clamp(int(abs(current) * registers[BUS_VOLTAGE] / 20000), 0, 0xFFFF)
        overflow |= clipped
        registers[CURRENT], registers[POWER] = current & 0xFFFF, power
        flags = CVRF | (OVF if overflow else 0) | (AFF if self._alert() else 0)
        latched = registers[MASK_ENABLE] & AFF if registers[MASK_ENABLE] & LEN else 0
        registers[MASK_ENABLE] = registers[MASK_ENABLE] & ~(AFF | OVF) | flags | latched

    def _alert(self) -> bool:
        enabled = self.registers[MASK_ENABLE] >> 11
        limit = self.registers[ALERT_LIMIT]
        if enabled & 0b10000:
            return _signed(self.registers[SHUNT_VOLTAGE]) > _signed(limit)
        if enabled & 0b01000:
            return _signed(self.registers[SHUNT_VOLTAGE]) < _signed(limit)
        if enabled & 0b00100:
            return self.registers[BUS_VOLTAGE] > limit
        if enabled & 0b00010:
            return self.registers[BUS_VOLTAGE] < limit
        if enabled & 0b00001:
            return self.registers[POWER] > limit
        return False
