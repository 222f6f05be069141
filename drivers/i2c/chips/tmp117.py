"""TI TMP117 digital temperature sensor as FakeSMBus sees it: 16-bit MSB-first registers behind a pointer register.

Register map and reset values (research/hardware.md section 1, from the TI datasheet via public drivers):
00h Temp_Result (8000h until the first conversion completes; two's complement, 7.8125 m°C per LSB),
01h Configuration (0220h: continuous conversion, CONV=4, AVG=8), 02h THigh_Limit (6000h), 03h TLow_Limit (8000h),
04h EEPROM_UL, 05h/06h/08h EEPROM1..3, 07h Temp_Offset, 0Fh Device_ID (0117h).

The first byte of every write sets the pointer; two more bytes (MSB first) write the register it points at.
A read returns the register the pointer selects, MSB first. Conversions happen lazily: whenever the host looks
at Temp_Result or Configuration the model works out how many conversion cycles have completed since it last
looked, so Data_Ready and the alert flags behave as the datasheet describes without a background thread.
This module deliberately does not share the temperature codec with the driver, so a codec bug cannot hide.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from drivers.i2c.chips.register16 import Register16Model, word_bytes

TEMP_RESULT = 0x00
CONFIGURATION = 0x01
THIGH_LIMIT = 0x02
TLOW_LIMIT = 0x03
EEPROM_UL = 0x04
EEPROM1 = 0x05
EEPROM2 = 0x06
TEMP_OFFSET = 0x07
EEPROM3 = 0x08
DEVICE_ID = 0x0F

DEVICE_ID_VALUE = 0x0117
POWER_ON_RESULT = 0x8000
CONFIG_RESET = 0x0220

# Configuration register bits.
HIGH_ALERT = 1 << 15
LOW_ALERT = 1 << 14
DATA_READY = 1 << 13
EEPROM_BUSY = 1 << 12
SOFT_RESET = 1 << 1
THERM_MODE = 1 << 4  # T/nA: 1 = therm mode (hysteresis), 0 = alert mode (flags clear on read)
_FLAG_BITS = HIGH_ALERT | LOW_ALERT | DATA_READY | EEPROM_BUSY
_WRITABLE_CONFIG = 0x0FFE & ~EEPROM_BUSY  # MOD, CONV, AVG, T/nA, POL, DR/Alert, Soft_Reset

MODE_SHUTDOWN = 0b01
MODE_ONE_SHOT = 0b11
EEPROM_UNLOCK = 1 << 15

_RESETS: dict[int, int] = {
    TEMP_RESULT: POWER_ON_RESULT,
    CONFIGURATION: CONFIG_RESET,
    THIGH_LIMIT: 0x6000,
    TLOW_LIMIT: 0x8000,
    EEPROM_UL: 0x0000,
    EEPROM1: 0x0000,
    EEPROM2: 0x0000,
    TEMP_OFFSET: 0x0000,
    EEPROM3: 0x0000,
    DEVICE_ID: DEVICE_ID_VALUE,
}

# Conversion cycle time in seconds by CONV[2:0] (rows) and AVG[1:0] (columns: none, 8, 32, 64 averages),
# datasheet table "Conversion Cycle Time in CC Mode". Averaging sets a floor on the cycle.
_CYCLE_S: tuple[tuple[float, float, float, float], ...] = (
    (0.0155, 0.125, 0.5, 1.0),
    (0.125, 0.125, 0.5, 1.0),
    (0.25, 0.25, 0.5, 1.0),
    (0.5, 0.5, 0.5, 1.0),
    (1.0, 1.0, 1.0, 1.0),
    (4.0, 4.0, 4.0, 4.0),
    (8.0, 8.0, 8.0, 8.0),
    (16.0, 16.0, 16.0, 16.0),
)
_LSB_C = 0.0078125


def _to_raw(celsius: float) -> int:
    """Degrees C -> the 16-bit register word (two's complement, saturating like the ADC does)."""
    steps = max(-0x8000, min(0x7FFF, round(celsius / _LSB_C)))
    return steps & 0xFFFF


def _to_celsius(raw: int) -> float:
    return (raw - 0x10000 if raw & 0x8000 else raw) * _LSB_C


class Tmp117Model(Register16Model):
    """A TMP117 on the fake bus: register file, pointer, conversion timing, alert flags, soft reset."""

    def __init__(
        self,
        temperature_c: Callable[[], float],
        first_conversion_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.temperature_c = temperature_c
        self.first_conversion_s = first_conversion_s
        self._clock = clock
        super().__init__(pointer=TEMP_RESULT)
        self._reset()

    def _reset(self) -> None:
        self.registers = dict(_RESETS)
        self._restart(self.first_conversion_s)
        self._one_shot_pending = False

    def _restart(self, first_delay_s: float) -> None:
        # Conversions are counted from a base time: the first lands after `first_delay_s`, then one per cycle.
        self._base = self._clock()
        self._first_delay_s = first_delay_s
        self._seen = 0

    # ------------------------------------------------------------------ I2cTarget

    def implausible(self, length: int) -> bytes:
        """A TMP117 that has not converted (or has lost power) reads its power-on value 8000h."""
        return word_bytes(POWER_ON_RESULT, length)

    def _after_read(self, register: int, value: int) -> None:
        if register == TEMP_RESULT:
            self._clear_ready()
        elif register == CONFIGURATION:
            self._clear_ready()
            if not value & THERM_MODE:
                # In alert mode the flags are cleared by reading the configuration register.
                self.registers[CONFIGURATION] &= ~(HIGH_ALERT | LOW_ALERT)

    # ------------------------------------------------------------------ behaviour

    @property
    def mode(self) -> int:
        """MOD[1:0] from the configuration register."""
        return self.registers[CONFIGURATION] >> 10 & 0b11

    def cycle_s(self) -> float:
        """The conversion cycle the current CONV/AVG settings give."""
        config = self.registers[CONFIGURATION]
        return _CYCLE_S[config >> 7 & 0b111][config >> 5 & 0b11]

    def _write_register(self, register: int, value: int) -> None:
        if register == CONFIGURATION:
            if value & SOFT_RESET:
                self._reset()
                return
            self._convert()  # conversions up to now ran under the old settings
            flags = self.registers[CONFIGURATION] & _FLAG_BITS
            self.registers[CONFIGURATION] = flags | (value & _WRITABLE_CONFIG)
            self._one_shot_pending = value >> 10 & 0b11 == MODE_ONE_SHOT
            # A configuration write restarts the cycle; the result register keeps its last value meanwhile.
            self._restart(self.active_conversion_s())
        elif register in (THIGH_LIMIT, TLOW_LIMIT, TEMP_OFFSET):
            self.registers[register] = value
        elif register == EEPROM_UL:
            self.registers[EEPROM_UL] = value & EEPROM_UNLOCK
        elif register in (EEPROM1, EEPROM2, EEPROM3) and self.registers[EEPROM_UL] & EEPROM_UNLOCK:
            self.registers[register] = value
        # Temp_Result and Device_ID are read-only; writes to them (and to locked EEPROM) are ignored.

    def active_conversion_s(self) -> float:
        """How long one (averaged) conversion takes: 15.5 ms per sample."""
        return 0.0155 * (1, 8, 32, 64)[self.registers[CONFIGURATION] >> 5 & 0b11]

    def _completed(self) -> int:
        """Conversions completed since the cycle started."""
        elapsed = self._clock() - self._base
        if elapsed < self._first_delay_s:
            return 0
        return 1 + int((elapsed - self._first_delay_s) / self.cycle_s())

    def _convert(self) -> None:
        if self.mode == MODE_SHUTDOWN:
            return  # shut down: the last result holds
        completed = self._completed()
        if completed <= self._seen:
            return
        if self.mode == MODE_ONE_SHOT:
            if not self._one_shot_pending:
                return
            # One conversion, then the device returns to shutdown mode by itself.
            self._one_shot_pending = False
            config = self.registers[CONFIGURATION]
            self.registers[CONFIGURATION] = (config & ~(0b11 << 10)) | MODE_SHUTDOWN << 10
        self._seen = completed
        offset = _to_celsius(self.registers[TEMP_OFFSET])
        raw = _to_raw(self.temperature_c() + offset)
        if raw == POWER_ON_RESULT:
            raw += 1  # -256 C saturates one LSB above the power-on marker
        self.registers[TEMP_RESULT] = raw
        self._update_alerts(_to_celsius(raw))
        self.registers[CONFIGURATION] |= DATA_READY

    def _update_alerts(self, celsius: float) -> None:
        config = self.registers[CONFIGURATION]
        high = _to_celsius(self.registers[THIGH_LIMIT])
        low = _to_celsius(self.registers[TLOW_LIMIT])
        if config & THERM_MODE:
            # Therm mode: HIGH_Alert sets above THigh and clears below TLow (hysteresis); LOW_Alert is unused.
            if celsius > high:
                config |= HIGH_ALERT
            elif celsius < low:
                config &= ~HIGH_ALERT
            config &= ~LOW_ALERT
        else:
            if celsius > high:
                config |= HIGH_ALERT
            if celsius < low:
                config |= LOW_ALERT
        self.registers[CONFIGURATION] = config

    def _clear_ready(self) -> None:
        self.registers[CONFIGURATION] &= ~DATA_READY
