"""The simulated carrier board: every twin the sim profile runs, wired to one SimWorld.

Bus-level twins sit on two fake I2C buses, like the carrier board's: i2c-1 carries the TMP117 board sensor;
i2c-7 carries the dock port's STUSB4500 (or TPS25750) PD controller and its INA226 power monitor. Thermal zones
and the fan are a generated sysfs tree that the real sysfs drivers read; the dock switch, the NFC reader and the
dock controller's serial line are twins at the levels research/hardware.md found faithful. The board's `run()`
keeps the sysfs tree and the world in step (zone temperatures out, fan duty in).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from drivers.base import DriverConfigError, JoinOffer
from drivers.i2c import parse_i2c_address
from drivers.i2c.chips.ina226 import Ina226Model
from drivers.i2c.chips.stusb4500 import Stusb4500Model
from drivers.i2c.chips.tmp117 import Tmp117Model
from drivers.i2c.chips.tps25750 import Tps25750Model
from drivers.i2c.fake import FAULT_KINDS, FakeSMBus, FaultInjector, FaultRule
from drivers.serial.frame import DockStatus
from drivers.sim.dock import SimDock
from drivers.sim.dock_controller import SERIAL_FAULT_KINDS, DockControllerTwin, SerialFault
from drivers.sim.nfc import SimNfc
from drivers.sim.sysfs import SimSysfs
from drivers.sim.world import SimWorld

BOARD_BUS = "i2c-1"
DOCK_BUS = "i2c-7"
TMP117_ADDRESS = 0x48
STUSB4500_ADDRESS = 0x28
TPS25750_ADDRESS = 0x21
INA226_ADDRESS = 0x40
SHUNT_OHMS = 0.01

# How often the sysfs tree is rewritten from the world: well inside a 1 s poll, so readings are never stale by
# more than this.
REFRESH_INTERVAL_S = 0.05


class SimBoard:
    """All twins of one simulated box. Create with `SimBoard.create` (it writes the sysfs tree)."""

    def __init__(self, world: SimWorld, sysfs_root: Path, seed: int = 0) -> None:
        self.world = world
        self.buses = {BOARD_BUS: FakeSMBus(FaultInjector(seed)), DOCK_BUS: FakeSMBus(FaultInjector(seed + 1))}
        board_zone = "board"
        self.tmp117 = Tmp117Model(temperature_c=lambda: world.temperatures()[board_zone])
        self.stusb4500 = Stusb4500Model(source=self._adjacent_pdos)
        self.tps25750 = Tps25750Model(source=self._adjacent_pdos)
        self.ina226 = Ina226Model(
            bus_mv=self._vbus_mv, current_ma=lambda: world.board_current_ma(self._vbus_mv()), shunt_ohms=SHUNT_OHMS
        )
        self.buses[BOARD_BUS].attach(TMP117_ADDRESS, self.tmp117)
        self.buses[DOCK_BUS].attach(STUSB4500_ADDRESS, self.stusb4500)
        self.buses[DOCK_BUS].attach(TPS25750_ADDRESS, self.tps25750)
        self.buses[DOCK_BUS].attach(INA226_ADDRESS, self.ina226)
        zones = [z for z in world.zones if z != board_zone]
        self.sysfs = SimSysfs(
            sysfs_root, zone_temperatures=lambda: {z: c for z, c in world.temperatures().items() if z in zones}
        )
        self.nfc = SimNfc(current_offer=self._adjacent_offer)
        # A few contact bounces on every change, so the debounce path runs as it does on the real switch.
        self.dock = SimDock(world=world, bounce=3)
        self.dock_controller: DockControllerTwin | None = None
        self._faults: dict[str, str] = {}

    @classmethod
    def create(cls, world: SimWorld, root: Path, seed: int = 0) -> SimBoard:
        """Blocking (writes files): a board whose sysfs tree lives under `root`."""
        board = cls(world, root / "sys", seed)
        board.sysfs.refresh()
        return board

    @property
    def sysfs_root(self) -> Path:
        return self.sysfs.root

    def _adjacent_pdos(self) -> tuple[int, ...] | None:
        module = self.world.adjacent()
        return None if module is None else module.source_pdos

    def _adjacent_offer(self) -> JoinOffer | None:
        module = self.world.adjacent()
        return None if module is None else module.offer

    def _vbus_mv(self) -> float:
        # Whichever PD controller the box is configured with is the one that negotiated the bus.
        return float(max(self.stusb4500.vbus_mv, self.tps25750.vbus_mv))

    def dock_controller_port(self) -> str:
        """Blocking: start the dock controller twin on a pty (once) and return the device path to open."""
        if self.dock_controller is None:
            self.dock_controller = DockControllerTwin(status=self._dock_status).start()
        return self.dock_controller.path

    def _dock_status(self) -> DockStatus:
        module = self.world.adjacent()
        return DockStatus(magnet=module is not None, module_present=module is not None, vbus_mv=int(self._vbus_mv()))

    # ------------------------------------------------------------------ fault injection

    def inject(self, target: str, kind: str, rate: float = 1.0) -> None:
        """Start injecting `kind` into `target`; ValueError names what is unknown.

        Targets: i2c-1 / i2c-7 (optionally @0xADDR) with nack, enxio, timeout, stuck, implausible at `rate`;
        sysfs:ZONE with unreadable, stuck, implausible, zero, empty; nfc with no_tag, corrupt; dock with stuck;
        serial with garbage, drop, corrupt at `rate`.
        """
        if target.startswith("i2c-"):
            bus_name, _, address_text = target.partition("@")
            if bus_name not in self.buses:
                raise ValueError(f"unknown target {target!r}; buses: {', '.join(self.buses)}")
            address = parse_i2c_address(target).address if address_text else None
            if kind not in FAULT_KINDS:
                raise ValueError(f"unknown I2C fault kind {kind!r}; kinds: {', '.join(FAULT_KINDS)}")
            faults = self.buses[bus_name].faults
            rules = [r for r in faults.rules if r.address != address]
            faults.set_rules([*rules, FaultRule(kind, rate, address)])
        elif target.startswith("sysfs:"):
            self.sysfs.set_fault(target.removeprefix("sysfs:"), kind)  # type: ignore[arg-type]
        elif target == "nfc":
            self.nfc.set_fault(kind)  # type: ignore[arg-type]
        elif target == "dock":
            try:
                self.dock.set_fault(kind)  # type: ignore[arg-type]
            except DriverConfigError as exc:
                raise ValueError(str(exc)) from None
        elif target == "serial":
            if kind not in SERIAL_FAULT_KINDS:
                raise ValueError(f"unknown serial fault kind {kind!r}; kinds: {', '.join(SERIAL_FAULT_KINDS)}")
            if self.dock_controller is None:
                raise ValueError("target 'serial': the dock controller twin is not running (serial is 'none')")
            self.dock_controller.set_faults([SerialFault(kind, rate)])
        else:
            raise ValueError(
                f"unknown target {target!r}; targets: i2c-1, i2c-7[@0xADDR], sysfs:ZONE, nfc, dock, serial"
            )
        self._faults[target] = f"{kind}@{rate:g}"

    def clear_faults(self) -> None:
        """Every twin behaves again."""
        for bus in self.buses.values():
            bus.faults.set_rules([])
        for target in self._faults:
            if target.startswith("sysfs:"):
                self.sysfs.set_fault(target.removeprefix("sysfs:"), None)
        self.nfc.set_fault(None)
        self.dock.set_fault(None)
        if self.dock_controller is not None:
            self.dock_controller.set_faults([])
        self._faults.clear()

    def fault_summary(self) -> dict[str, str]:
        """Active faults by target."""
        return dict(self._faults)

    async def run(self) -> None:
        """Keep the sysfs tree and the world in step until cancelled."""
        while True:
            await asyncio.to_thread(self.sysfs.refresh)
            pwm = await asyncio.to_thread(self.sysfs.fan_pwm)
            self.world.set_fan(pwm / 255)
            await asyncio.sleep(REFRESH_INTERVAL_S)

    def close(self) -> None:
        """Blocking: stop the dock controller twin."""
        if self.dock_controller is not None:
            self.dock_controller.stop()
            self.dock_controller = None
