"""TI INA226 bus voltage/current/power monitor over I2C (PowerMonitor).

Registers are 16-bit and MSB-first on the wire (the SMBus word trap of research/hardware.md: read bytes, not
words). open() checks the manufacturer (5449h) and die (226xh) IDs, resets the chip and writes the calibration
CAL = trunc(0.00512 / (Current_LSB x R_shunt)) with Current_LSB = max_current / 2^15, then the configuration.

A sample waits for a finished conversion (Mask/Enable CVRF, which reading clears), reads the calibration and
the four results, and reads Mask/Enable again: a conversion landing mid-read would mix two conversions, so the
results are read again. Readings are cross-checked with the chip's own integer arithmetic (Current = Shunt x
CAL / 2048, Power = Current x Bus / 20000); a sample that fails, a lost calibration (the chip reset itself:
current and power read 0 forever), or no conversion at all is an ImplausibleReadingError. A lost calibration is
written again before raising, so the next sample is good. Bus errors are reported as the transport raises them
and not retried here (the caller owns retry policy).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from drivers.base import DeviceMismatchError, DriverConfigError, ImplausibleReadingError, PowerSample
from drivers.i2c.device import I2cDevice
from drivers.i2c.transport import I2cBus

CONFIGURATION = 0x00
SHUNT_VOLTAGE = 0x01
BUS_VOLTAGE = 0x02
POWER = 0x03
CURRENT = 0x04
CALIBRATION = 0x05
MASK_ENABLE = 0x06
MANUFACTURER_ID = 0xFE
DIE_ID = 0xFF

MANUFACTURER_TI = 0x5449
DIE_INA226 = 0x226  # bits 15..4 of Die ID; bits 3..0 are the revision
RESET = 0x8000
CVRF = 1 << 3
MODE_CONTINUOUS_SHUNT_AND_BUS = 0b111
AVERAGES = (1, 4, 16, 64, 128, 256, 512, 1024)
CONVERSION_US = (140, 204, 332, 588, 1100, 2116, 4156, 8244)
SHUNT_FULL_SCALE_V = 0.08192
READ_ATTEMPTS = 3


# ----------------------------------------------------------------------------- register codec


def encode_write(register: int, value: int) -> bytes:
    """Pointer then the 16-bit value, MSB first."""
    return bytes([register]) + (value & 0xFFFF).to_bytes(2, "big")


def decode_word(data: bytes) -> int:
    """A 16-bit register as read: MSB first."""
    return int.from_bytes(data[:2], "big")


def signed(raw: int) -> int:
    """Two's complement 16-bit."""
    return raw - 0x10000 if raw & 0x8000 else raw


def config_word(averages: int, conversion_us: int) -> int:
    """Configuration for continuous shunt and bus conversion; ValueError for values the chip does not offer."""
    if averages not in AVERAGES:
        raise ValueError(f"averages {averages} is not one of {AVERAGES}")
    if conversion_us not in CONVERSION_US:
        raise ValueError(f"conversion time {conversion_us} us is not one of {CONVERSION_US}")
    time_code = CONVERSION_US.index(conversion_us)
    return 0x4000 | AVERAGES.index(averages) << 9 | time_code << 6 | time_code << 3 | MODE_CONTINUOUS_SHUNT_AND_BUS


def calibration(shunt_ohms: float, max_current_a: float) -> int:
    """CAL for Current_LSB = max_current_a / 2^15; ValueError when the shunt and range do not fit the chip."""
    if shunt_ohms <= 0 or max_current_a <= 0:
        raise ValueError("shunt resistance and maximum current must be positive")
    if max_current_a * shunt_ohms > SHUNT_FULL_SCALE_V:
        raise ValueError(
            f"{max_current_a} A through {shunt_ohms} ohm is {max_current_a * shunt_ohms * 1000:.1f} mV, "
            f"beyond the shunt input's {SHUNT_FULL_SCALE_V * 1000:.2f} mV"
        )
    cal = int(0.00512 / (max_current_a / 32768 * shunt_ohms))
    if not 1 <= cal <= 0x7FFF:
        raise ValueError(f"calibration {cal} for {shunt_ohms} ohm and {max_current_a} A is outside 1..32767")
    return cal


@dataclass(frozen=True)
class RawReading:
    """The result registers of one conversion, as read."""

    shunt: int
    bus: int
    current: int
    power: int


def decode_reading(raw: RawReading, cal: int, shunt_ohms: float, max_current_a: float) -> PowerSample:
    """Physical values, after checking the registers against the chip's own equations (ValueError if they fail)."""
    if raw.bus & 0x8000:
        raise ValueError(f"bus voltage register reads 0x{raw.bus:04x}; bit 15 is always 0")
    shunt, current = signed(raw.shunt), signed(raw.current)
    expected_current = int(shunt * cal / 2048)
    if abs(current - expected_current) > 1 + abs(expected_current) // 100:
        raise ValueError(
            f"current register {current} does not match shunt {shunt} x CAL {cal} / 2048 = {expected_current}"
        )
    expected_power = int(abs(current) * raw.bus / 20000)
    if abs(raw.power - expected_power) > 1 + expected_power // 100:
        raise ValueError(
            f"power register {raw.power} does not match current {current} x bus {raw.bus} / 20000 = {expected_power}"
        )
    current_lsb_a = 0.00512 / (cal * shunt_ohms)
    current_ma = current * current_lsb_a * 1000
    if raw.bus == 0 and abs(current_ma) > max_current_a * 10:  # more than 1% of range with no bus voltage
        raise ValueError(f"{current_ma:.0f} mA flows while the bus reads 0 V")
    return PowerSample(bus_mv=raw.bus * 1.25, current_ma=current_ma, power_mw=raw.power * 25 * current_lsb_a * 1000)


# ----------------------------------------------------------------------------- the driver


class Ina226(I2cDevice):
    """An INA226 at `address` on `bus` measuring through a `shunt_ohms` shunt, range ±max_current_a (PowerMonitor)."""

    _kind = "ina226"

    def __init__(
        self,
        bus: I2cBus,
        address: int = 0x40,
        shunt_ohms: float = 0.01,
        max_current_a: float = 5.0,
        *,
        averages: int = 16,
        conversion_us: int = 1100,
    ) -> None:
        try:
            self._cal = calibration(shunt_ohms, max_current_a)
            self._config = config_word(averages, conversion_us)
        except ValueError as exc:
            raise DriverConfigError(f"ina226 on {bus.name}@0x{address:02x}: {exc}") from None
        super().__init__(bus, address)
        self._shunt_ohms = shunt_ohms
        self._max_current_a = max_current_a
        self._period_s = averages * 2 * conversion_us / 1e6
        # Reading Mask/Enable clears CVRF, so two samplers at once would hide conversions from each other.
        self._sampling = asyncio.Lock()

    async def _identify(self) -> None:
        """Check the manufacturer (5449h) and die (226xh) IDs; DeviceMismatchError otherwise."""
        manufacturer = await self._read(MANUFACTURER_ID)
        die = await self._read(DIE_ID)
        if manufacturer != MANUFACTURER_TI or die >> 4 != DIE_INA226:
            raise DeviceMismatchError(
                f"{self.name}: manufacturer/die ID read 0x{manufacturer:04x}/0x{die:04x}, "
                "expected 0x5449/0x226x (INA226); is another chip at this address?"
            )

    async def _prepare(self) -> None:
        """Reset, calibrate and configure the chip, and check it took the calibration and configuration."""
        await self._configure()
        await self._verify_configuration()

    async def _verify_configuration(self) -> None:
        config = await self._read(CONFIGURATION)
        cal = await self._read(CALIBRATION)
        if (config, cal) != (self._config, self._cal):
            raise ImplausibleReadingError(
                f"{self.name}: configuration/calibration read back 0x{config:04x}/"
                f"0x{cal:04x} after writing 0x{self._config:04x}/0x{self._cal:04x}"
            )

    async def _before_close(self) -> None:
        """Reset the chip to its power-on configuration."""
        await self._write(CONFIGURATION, RESET)

    async def sample(self) -> PowerSample:
        """One consistent reading of bus voltage, current and power."""
        self._require_open()
        async with self._sampling:
            return await self._sample()

    async def _sample(self) -> PowerSample:
        for _ in range(READ_ATTEMPTS):
            await self._wait_for_conversion()
            cal = await self._read(CALIBRATION)
            if cal != self._cal:
                await self._configure()
                raise ImplausibleReadingError(
                    f"{self.name}: calibration reads 0x{cal:04x}, not the 0x{self._cal:04x} "
                    "written: the chip reset itself (brown-out?); calibrated again"
                )
            raw = RawReading(
                shunt=await self._read(SHUNT_VOLTAGE),
                bus=await self._read(BUS_VOLTAGE),
                current=await self._read(CURRENT),
                power=await self._read(POWER),
            )
            if await self._read(MASK_ENABLE) & CVRF:
                continue  # a conversion finished while reading: the registers may mix two conversions
            try:
                return decode_reading(raw, self._cal, self._shunt_ohms, self._max_current_a)
            except ValueError as exc:
                raise ImplausibleReadingError(f"{self.name}: {exc}") from None
        raise ImplausibleReadingError(
            f"{self.name}: a conversion finished during each of {READ_ATTEMPTS} reads; "
            f"the {self._period_s * 1000:.1f} ms conversion is too short for this bus"
        )

    # ------------------------------------------------------------------ plumbing

    async def _configure(self) -> None:
        await self._write(CONFIGURATION, RESET)
        await self._write(CALIBRATION, self._cal)
        await self._write(CONFIGURATION, self._config)

    async def _wait_for_conversion(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * self._period_s + 0.05
        pause = min(max(self._period_s / 4, 0.001), 0.02)
        while not await self._read(MASK_ENABLE) & CVRF:
            if loop.time() >= deadline:
                waited_ms = (2 * self._period_s + 0.05) * 1000
                raise ImplausibleReadingError(
                    f"{self.name}: no conversion finished within {waited_ms:.0f} ms "
                    "(Mask/Enable CVRF stays 0): the chip is stuck, powered down or reset"
                )
            await asyncio.sleep(pause)

    async def _read(self, register: int) -> int:
        return decode_word(await self._bus.read(self._address, bytes([register]), 2))

    async def _write(self, register: int, value: int) -> None:
        await self._bus.write(self._address, encode_write(register, value))
