"""An API-level twin of nvpmodel: an Orin Nano's modes, each scaling the heat that inference produces."""

from __future__ import annotations

from drivers.base import DriverError, DriverState, PowerMode
from drivers.sim.world import SimWorld

# Orin Nano 8GB modes as third-party guides list them (research/hardware.md, unverified), with the share of
# full-power heat each produces in the world model.
SIM_MODES: tuple[tuple[PowerMode, float], ...] = (
    (PowerMode(0, "15W"), 1.0),
    (PowerMode(1, "7W"), 0.5),
)


class SimPowerMode:
    """PowerModeControl over the simulated world."""

    def __init__(self, world: SimWorld) -> None:
        self._world = world
        self._state = DriverState.CLOSED
        self._mode = SIM_MODES[0][0]

    @property
    def name(self) -> str:
        return "sim:nvpmodel"

    @property
    def state(self) -> DriverState:
        return self._state

    async def open(self) -> None:
        """Nothing to open; the twin is always there."""
        self._state = DriverState.OPEN

    async def close(self) -> None:
        """Back to the default mode, as a real box boots."""
        await self.set(SIM_MODES[0][0].id)
        self._state = DriverState.CLOSED

    async def modes(self) -> list[PowerMode]:
        """Every mode the twin offers."""
        return [mode for mode, _ in SIM_MODES]

    async def get(self) -> PowerMode:
        """The current mode."""
        return self._mode

    async def set(self, mode_id: int) -> None:
        """Switch mode; DriverError for an id the box does not have."""
        for mode, scale in SIM_MODES:
            if mode.id == mode_id:
                self._mode = mode
                self._world.set_power_scale(scale)
                return
        known = ", ".join(f"{m.id} ({m.name})" for m, _ in SIM_MODES)
        raise DriverError(f"power mode {mode_id} does not exist; modes: {known}")
