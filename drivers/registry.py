"""Config string -> driver. The same driver classes run on a Jetson and, with "sim", against the simulated board.

Syntax, per capability (a string of "none" leaves the capability out):

    thermal        sim | sysfs[:ROOT] | tmp117:BUS@ADDR[:ZONE]       (several, comma-separated)
    fan            sim | hwmon[:ROOT]
    power_mode     sim | nvpmodel[:COMMAND]
    pd             sim | sim:tps25750 | stusb4500:BUS@ADDR | tps25750:BUS@ADDR
    power_monitor  sim | ina226:BUS@ADDR[:SHUNT_OHMS]
    dock           sim | gpio:CHIP:LINE
    nfc            sim | usb[:...] | tty:...  | udp[:HOST[:PORT]]     (nfcpy device paths)
    serial         sim | serial:DEVICE[@BAUD]

e.g. "stusb4500:i2c-7@0x28", "sysfs:/sys", "gpio:gpiochip0:17", "udp:localhost:54321". "sim" builds the real
driver over the simulated board's fake buses and files wherever the twin is at bus or file level.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from drivers.base import (
    DockSensor,
    DriverConfigError,
    FanControl,
    NfcLink,
    PdController,
    PowerModeControl,
    PowerMonitor,
    SerialLink,
    ThermalSource,
)
from drivers.i2c import I2cBus, parse_i2c_address
from drivers.serial.link import SerialDockLink
from drivers.sim.board import (
    BOARD_BUS,
    DOCK_BUS,
    INA226_ADDRESS,
    SHUNT_OHMS,
    STUSB4500_ADDRESS,
    TMP117_ADDRESS,
    TPS25750_ADDRESS,
    SimBoard,
)

CAPABILITIES = ("thermal", "fan", "power_mode", "pd", "power_monitor", "dock", "nfc", "serial")


@dataclass
class DriverContext:
    """What building drivers shares: one I2cBus per bus name, and the simulated board in the sim profile."""

    board: SimBoard | None = None
    buses: dict[str, I2cBus] = field(default_factory=dict)
    # Opens a Linux bus; tests may replace it.
    linux_bus: Callable[[str], I2cBus] = I2cBus.linux

    def bus(self, name: str, *, simulated: bool) -> I2cBus:
        """The shared I2cBus for `name` (simulated: on the sim board's fake bus)."""
        key = f"sim:{name}" if simulated else name
        if key not in self.buses:
            if simulated:
                fake = self._board("an I2C twin").buses[name]
                self.buses[key] = I2cBus(name, lambda: fake)
            else:
                self.buses[key] = self.linux_bus(name)
        return self.buses[key]

    def _board(self, what: str) -> SimBoard:
        if self.board is None:
            raise DriverConfigError(f"{what} needs the simulated board, which only the sim profile has")
        return self.board


def _split(spec: str) -> tuple[str, str]:
    kind, _, rest = spec.strip().partition(":")
    return kind.lower(), rest


def _absent(spec: str) -> bool:
    return spec.strip().lower() in ("", "none")


def _unknown(capability: str, spec: str, expected: str) -> DriverConfigError:
    return DriverConfigError(f"unknown {capability} driver {spec!r}; expected {expected}")


def build_thermal(spec: str, ctx: DriverContext) -> list[ThermalSource]:
    """Thermal sources from a comma-separated list."""
    from drivers.thermal.sysfs import SysfsThermal
    from drivers.thermal.tmp117 import Tmp117

    sources: list[ThermalSource] = []
    for item in (part for part in spec.split(",") if not _absent(part)):
        kind, rest = _split(item)
        if kind == "sim":
            board = ctx._board("thermal 'sim'")
            sources.append(SysfsThermal(board.sysfs_root))
            sources.append(Tmp117(ctx.bus(BOARD_BUS, simulated=True), TMP117_ADDRESS, zone="board"))
        elif kind == "sysfs":
            sources.append(SysfsThermal(Path(rest or "/sys")))
        elif kind == "tmp117":
            location, _, zone = rest.partition(":")
            address = parse_i2c_address(location)
            sources.append(Tmp117(ctx.bus(address.bus, simulated=False), address.address, zone=zone or "board"))
        else:
            raise _unknown("thermal", item, "sim, sysfs[:ROOT] or tmp117:BUS@ADDR[:ZONE]")
    return sources


def build_fan(spec: str, ctx: DriverContext) -> FanControl | None:
    """The fan."""
    from drivers.thermal.fan import HwmonFan

    if _absent(spec):
        return None
    kind, rest = _split(spec)
    if kind == "sim":
        return HwmonFan(ctx._board("fan 'sim'").sysfs_root)
    if kind == "hwmon":
        return HwmonFan(Path(rest or "/sys"))
    raise _unknown("fan", spec, "sim or hwmon[:ROOT]")


def build_power_mode(spec: str, ctx: DriverContext) -> PowerModeControl | None:
    """The SoC power mode control."""
    from drivers.power.nvpmodel import NvpModel
    from drivers.sim.power_mode import SimPowerMode

    if _absent(spec):
        return None
    kind, rest = _split(spec)
    if kind == "sim":
        return SimPowerMode(ctx._board("power_mode 'sim'").world)
    if kind == "nvpmodel":
        return NvpModel(rest or "nvpmodel")
    raise _unknown("power_mode", spec, "sim or nvpmodel[:COMMAND]")


def build_pd(spec: str, ctx: DriverContext) -> PdController | None:
    """The dock port's USB-PD controller."""
    from drivers.power.stusb4500 import Stusb4500
    from drivers.power.tps25750 import Tps25750

    if _absent(spec):
        return None
    kind, rest = _split(spec)
    if kind == "sim":
        bus = ctx.bus(DOCK_BUS, simulated=True)
        if rest in ("", "stusb4500"):
            return Stusb4500(bus, STUSB4500_ADDRESS)
        if rest == "tps25750":
            return Tps25750(bus, TPS25750_ADDRESS)
        raise _unknown("pd", spec, "sim, sim:stusb4500 or sim:tps25750")
    if kind in ("stusb4500", "tps25750"):
        address = parse_i2c_address(rest)
        bus = ctx.bus(address.bus, simulated=False)
        return Stusb4500(bus, address.address) if kind == "stusb4500" else Tps25750(bus, address.address)
    raise _unknown("pd", spec, "sim, stusb4500:BUS@ADDR or tps25750:BUS@ADDR")


def build_power_monitor(spec: str, ctx: DriverContext) -> PowerMonitor | None:
    """The dock port's power monitor."""
    from drivers.power.ina226 import Ina226

    if _absent(spec):
        return None
    kind, rest = _split(spec)
    if kind == "sim":
        return Ina226(ctx.bus(DOCK_BUS, simulated=True), INA226_ADDRESS, shunt_ohms=SHUNT_OHMS)
    if kind == "ina226":
        location, _, shunt = rest.partition(":")
        address = parse_i2c_address(location)
        try:
            shunt_ohms = float(shunt) if shunt else 0.01
        except ValueError:
            raise DriverConfigError(f"shunt resistance {shunt!r} in {spec!r} is not a number of ohms") from None
        return Ina226(ctx.bus(address.bus, simulated=False), address.address, shunt_ohms=shunt_ohms)
    raise _unknown("power_monitor", spec, "sim or ina226:BUS@ADDR[:SHUNT_OHMS]")


def build_dock(spec: str, ctx: DriverContext) -> DockSensor | None:
    """The dock switch."""
    from drivers.dock.gpio import GpioDock

    if _absent(spec):
        return None
    kind, rest = _split(spec)
    if kind == "sim":
        return ctx._board("dock 'sim'").dock
    if kind == "gpio":
        chip, _, line = rest.rpartition(":")
        if not chip or not line.isdigit():
            raise DriverConfigError(f"{spec!r}: expected gpio:CHIP:LINE such as gpio:gpiochip0:17")
        return GpioDock(chip, int(line))
    raise _unknown("dock", spec, "sim or gpio:CHIP:LINE")


def build_nfc(spec: str, ctx: DriverContext) -> NfcLink | None:
    """The NFC reader."""
    from drivers.nfc.nfcpy_link import NfcpyLink

    if _absent(spec):
        return None
    kind, _ = _split(spec)
    if kind == "sim":
        return ctx._board("nfc 'sim'").nfc
    if kind in ("usb", "tty", "udp"):
        return NfcpyLink(spec.strip())
    raise _unknown("nfc", spec, "sim or an nfcpy path (usb, tty:..., udp:HOST:PORT)")


def build_serial(spec: str, ctx: DriverContext) -> SerialLink | None:
    """The dock controller link. The sim twin's pty is created when the link is built."""
    if _absent(spec):
        return None
    kind, rest = _split(spec)
    if kind == "sim":
        return SerialDockLink(ctx._board("serial 'sim'").dock_controller_port())
    if kind == "serial" and rest:
        device, _, baud = rest.partition("@")
        if baud and not baud.isdigit():
            raise DriverConfigError(f"{spec!r}: baud rate {baud!r} is not a number")
        return SerialDockLink(device, int(baud) if baud else 115200)
    raise _unknown("serial", spec, "sim or serial:DEVICE[@BAUD]")
