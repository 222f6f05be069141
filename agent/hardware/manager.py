"""The agent's hardware layer: builds the drivers the settings name, polls them, applies policy, reports health.

Start: build drivers (off the loop: opening a pty or a bus may block), open them (a driver that fails to open is
reported unavailable and retried by its poller, never fatal: a box with a dead sensor still serves, throttled by
the fail-safe), then run one coordinator per polled source, the thermal policy and the dock pipeline.
Stop (the agent's last step, after the APIs and the engine): pollers stop, every PD port returns to 5 V, the fan
to its default profile, and drivers and buses close.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.engine import EngineHost
from agent.hardware.coordinator import Coordinator
from agent.hardware.dock import DockPipeline
from agent.hardware.governor import ThermalGovernor
from agent.hardware.power import PowerContracts, PowerPort
from agent.hardware.thermal import ThermalControl
from agent.settings import HardwareSettings, Settings
from drivers import registry
from drivers.base import (
    DockSensor,
    Driver,
    DriverError,
    DriverState,
    FanControl,
    NfcLink,
    PdController,
    PowerModeControl,
    PowerMonitor,
    SerialLink,
    ThermalSource,
)
from drivers.registry import DriverContext
from drivers.sim.board import SimBoard
from drivers.sim.world import SimWorld

log = structlog.get_logger("agent.hardware")

DOCK_PORT = "dock"
# The simulated world hears the engine's load this often (heat follows inference).
_SIM_LOAD_INTERVAL_S = 0.25


@dataclass
class DriverSet:
    """Every driver the agent runs, by capability."""

    thermal: list[ThermalSource] = field(default_factory=list)
    fan: FanControl | None = None
    power_mode: PowerModeControl | None = None
    pd: PdController | None = None
    power_monitor: PowerMonitor | None = None
    dock: DockSensor | None = None
    nfc: NfcLink | None = None
    serial: SerialLink | None = None
    context: DriverContext = field(default_factory=DriverContext)

    def all(self) -> list[Driver]:
        """Every driver, in the order they are opened."""
        drivers: list[Driver] = [*self.thermal]
        for driver in (self.fan, self.power_mode, self.pd, self.power_monitor, self.dock, self.nfc, self.serial):
            if driver is not None:
                drivers.append(driver)
        return drivers


def build_drivers(settings: HardwareSettings, profile: str, board: SimBoard | None) -> DriverSet:
    """Blocking: every configured driver, built from its config string (DriverConfigError names a bad one)."""
    ctx = DriverContext(board=board)
    spec = {name: settings.driver(name, profile) for name in registry.CAPABILITIES}  # type: ignore[arg-type]
    return DriverSet(
        thermal=registry.build_thermal(spec["thermal"], ctx),
        fan=registry.build_fan(spec["fan"], ctx),
        power_mode=registry.build_power_mode(spec["power_mode"], ctx),
        pd=registry.build_pd(spec["pd"], ctx),
        power_monitor=registry.build_power_monitor(spec["power_monitor"], ctx),
        dock=registry.build_dock(spec["dock"], ctx),
        nfc=registry.build_nfc(spec["nfc"], ctx),
        serial=registry.build_serial(spec["serial"], ctx),
        context=ctx,
    )


class HardwareManager:
    """Owns the drivers and everything that polls or reacts to them."""

    def __init__(
        self,
        settings: Settings,
        engines: list[EngineHost],
        register_heartbeat: Callable[[str], Callable[[], None]] | None = None,
    ) -> None:
        self.settings = settings
        # The systemd watchdog's heartbeats: thermal polls beat one, so the watchdog stops pinging if they stall.
        self._register_heartbeat = register_heartbeat
        self.hw = settings.hardware
        self.engines = engines
        self.world: SimWorld | None = None
        self.board: SimBoard | None = None
        self.drivers = DriverSet()
        self.coordinators: dict[str, Coordinator[Any]] = {}
        self.thermal: ThermalControl | None = None
        self.power = PowerContracts([], lambda: None)
        self.dock: DockPipeline | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def simulated(self) -> bool:
        """True in the sim profile, where the drivers talk to the simulated board."""
        return self.settings.profile == "sim"

    def prepare_thresholds(self, settings: Settings) -> Callable[[], None]:
        """A live config change of the governor's thresholds (validated by the settings; applied on commit)."""
        config = settings.hardware.governor_config()

        def commit() -> None:
            if self.thermal is not None:
                self.thermal.set_thresholds(config)

        return commit

    # ------------------------------------------------------------------ start / stop

    async def start(self, spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]) -> None:
        """Build and open drivers, then start pollers and policies as supervised tasks."""
        if self.simulated:
            self.world = SimWorld()
            self.board = await asyncio.to_thread(SimBoard.create, self.world, self.settings.run_dir / "sim")
        self.drivers = await asyncio.to_thread(build_drivers, self.hw, self.settings.profile, self.board)
        for driver in self.drivers.all():
            await self._open(driver)

        def start_task(work: Coroutine[Any, Any, None], name: str) -> None:
            self._tasks.append(spawn(work, name))

        self._start_thermal(start_task, await self._critical_trips())
        self._start_power()
        self._start_polled()
        if self.drivers.dock is not None:
            self.dock = DockPipeline(self.drivers.dock, self.drivers.nfc, self.hw.nfc_read_timeout_seconds)
            start_task(self.dock.run(), "dock-pipeline")
        for coordinator in self.coordinators.values():
            start_task(coordinator.run(), f"poll:{coordinator.name}")
        if self.board is not None:
            start_task(self.board.run(), "sim-board")
            start_task(self._feed_sim_load(), "sim-load")
        log.info(
            "hardware_started",
            profile=self.settings.profile,
            drivers={d.name: d.state.value for d in self.drivers.all()},
        )

    async def _open(self, driver: Driver) -> None:
        try:
            await driver.open()
        except DriverError as exc:
            log.warning("driver_open_failed", driver=driver.name, error=f"{type(exc).__name__}: {exc}")

    def _start_thermal(
        self, start_task: Callable[[Coroutine[Any, Any, None], str], None], critical_trips: dict[str, float]
    ) -> None:
        hw = self.hw
        governor = ThermalGovernor(hw.governor_config(), critical_trips)
        self.thermal = ThermalControl(
            governor, [e.controls for e in self.engines], self.settings.engine.max_batch, self.drivers.fan, start_task
        )
        thermal = self.thermal
        # Only a box that polls thermal sources beats: a heartbeat nobody beats would make systemd restart us.
        beat = self._register_heartbeat("thermal") if self._register_heartbeat and self.drivers.thermal else None
        for position, source in enumerate(self.drivers.thermal):
            kind = source.name.split(":", 1)[0]  # "sysfs", "tmp117": short names for health and logs
            name = f"thermal:{kind}" if f"thermal:{kind}" not in self.coordinators else f"thermal:{kind}#{position}"
            self.coordinators[name] = Coordinator(
                name,
                source,
                source.read,
                hw.thermal_poll_seconds,
                after_poll=beat,
                on_data=lambda data, name=name: thermal.on_readings(name, data),  # type: ignore[misc]
                on_failure=lambda error, name=name: thermal.on_source_failure(name, error),  # type: ignore[misc]
            )

    async def _critical_trips(self) -> dict[str, float]:
        trips: dict[str, float] = {}
        for source in self.drivers.thermal:
            if source.state is DriverState.OPEN:
                with contextlib.suppress(DriverError):
                    trips.update(await source.critical_trips())
        return trips

    def _start_power(self) -> None:
        pd = self.drivers.pd
        if pd is None:
            return
        monitor = None
        if self.drivers.power_monitor is not None:
            monitor = Coordinator(
                "power_monitor",
                self.drivers.power_monitor,
                self.drivers.power_monitor.sample,
                self.hw.power_poll_seconds,
            )
            self.coordinators["power_monitor"] = monitor
        self.coordinators["pd"] = Coordinator("pd", pd, pd.contract, self.hw.power_poll_seconds)
        self.power = PowerContracts([PowerPort(DOCK_PORT, pd, monitor)], self._peer_module)

    def _start_polled(self) -> None:
        hw = self.hw
        if self.drivers.fan is not None:
            self.coordinators["fan"] = Coordinator(
                "fan", self.drivers.fan, self.drivers.fan.status, hw.power_poll_seconds
            )
        if self.drivers.power_mode is not None:
            self.coordinators["power_mode"] = Coordinator(
                "power_mode", self.drivers.power_mode, self.drivers.power_mode.get, hw.serial_poll_seconds
            )
        link = self.drivers.serial
        if link is not None:
            self.coordinators["dock_controller"] = Coordinator(
                "dock_controller", link, link.status, hw.serial_poll_seconds
            )

    def attach_engine(self, engine: EngineHost) -> None:
        """An engine host started while the agent runs (a model placed here): thermal policy applies to it too."""
        self.engines.append(engine)
        if self.thermal is not None:
            self.thermal.attach(engine.controls)

    def detach_engine(self, engine: EngineHost) -> None:
        if engine in self.engines:
            self.engines.remove(engine)
        if self.thermal is not None:
            self.thermal.detach(engine.controls)

    def _peer_module(self) -> str | None:
        if self.dock is not None and self.dock.offer is not None:
            return self.dock.offer.node_id
        return None

    async def _feed_sim_load(self) -> None:
        assert self.world is not None
        max_batch = max(1, self.settings.engine.max_batch)
        while True:
            decoding = sum(int(engine.stats.get("decoding", 0)) for engine in self.engines)
            self.world.set_load(decoding / max_batch)
            await asyncio.sleep(_SIM_LOAD_INTERVAL_S)

    async def stop(self) -> None:
        """Stop pollers, leave the hardware safe (PD at 5 V, fan default), close drivers and buses."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.power.restore_defaults()
        for driver in reversed(self.drivers.all()):
            if driver.state is not DriverState.CLOSED:
                try:
                    await driver.close()
                except DriverError as exc:
                    log.error("driver_close_failed", driver=driver.name, error=str(exc))
        for bus in self.drivers.context.buses.values():
            with contextlib.suppress(DriverError):
                await bus.close()
        if self.board is not None:
            await asyncio.to_thread(self.board.close)
        log.info("hardware_stopped")

    # ------------------------------------------------------------------ health

    def _dock_controller(self) -> dict[str, Any] | None:
        poller = self.coordinators.get("dock_controller")
        status = poller.data if poller is not None and poller.available else None
        if status is None:
            return None
        return {"magnet": status.magnet, "module_present": status.module_present, "vbus_mV": status.vbus_mv}

    def report(self) -> dict[str, Any]:
        """The hardware part of /v1/health."""
        thermal = self.thermal.report() if self.thermal is not None else None
        power_monitor = self.coordinators.get("power_monitor")
        pd = self.coordinators.get("pd")
        contract = pd.data if pd is not None and pd.available else None
        sample = power_monitor.data if power_monitor is not None and power_monitor.available else None
        return {
            "temperature_c": thermal["temperature_c"] if thermal else None,
            "thermal": thermal,
            "power": {
                "contract_state": None if contract is None else contract.state,
                "contract_mV": None if contract is None or contract.selected is None else contract.selected.max_mv,
                "bus_mV": None if sample is None else round(sample.bus_mv, 1),
                "current_mA": None if sample is None else round(sample.current_ma, 1),
                "power_mW": None if sample is None else round(sample.power_mw, 1),
            },
            "dock": None if self.dock is None else {**self.dock.report(), "controller": self._dock_controller()},
            "drivers": {name: c.report() for name, c in self.coordinators.items()},
        }


@asynccontextmanager
async def hardware_subsystem(
    manager: HardwareManager, spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]
) -> AsyncIterator[HardwareManager]:
    """The hardware layer as a supervised subsystem."""
    await manager.start(spawn)
    try:
        yield manager
    finally:
        await manager.stop()
