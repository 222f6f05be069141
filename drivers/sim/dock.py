"""The dock switch's twin: the simulated world moves a magnet, the same Debouncer as on hardware decides.

The world (or a test) calls `set_magnet(present)` from any thread. The twin turns each change into what the hall
switch's output would do: the new level at once, or, with `bounce` set, a short train of toggles `bounce_interval`
apart that ends on the new level, as a magnet snapping on chatters through the switch's hysteresis. The raw levels
go through `Debouncer` exactly as edge events do in `GpioDock`, so the sim profile exercises the debounce and
confirmation path rather than a shortcut. Fault "stuck" freezes the switch output where it is: the magnet can move,
the sensor no longer notices, until the fault is cleared and the switch reads the magnet again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Literal

from drivers.base import DockEvent, DriverConfigError, DriverState, DriverStateError
from drivers.dock.debounce import DEFAULT_CONFIRM, DEFAULT_DEBOUNCE, DebouncePump, Debouncer, require_pump
from drivers.sim.world import SimModule, SimWorld

DockFault = Literal["stuck"]
DOCK_FAULTS: tuple[DockFault, ...] = ("stuck",)


class SimDock:
    """DockSensor twin driven by `set_magnet`; optional contact bounce; fault "stuck"."""

    def __init__(
        self,
        *,
        label: str = "dock",
        magnet: bool = False,
        debounce: float = DEFAULT_DEBOUNCE,
        confirm: float = DEFAULT_CONFIRM,
        bounce: int = 0,
        bounce_interval: float = 0.002,
        world: SimWorld | None = None,
    ) -> None:
        Debouncer(debounce, confirm)  # validates the times now
        if bounce < 0:
            raise DriverConfigError(f"sim dock {label}: bounce count {bounce} is negative")
        if bounce and not 0 < bounce_interval < debounce:
            # A train slower than the debounce time would be a real dock/undock sequence, not bounce.
            raise DriverConfigError(
                f"sim dock {label}: bounce_interval {bounce_interval}s must be between 0 and "
                f"the debounce time {debounce}s"
            )
        self.label = label
        self.debounce = debounce
        self.confirm = confirm
        self.bounce = bounce
        self.bounce_interval = bounce_interval
        self._magnet = magnet
        self._fault: DockFault | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pump: DebouncePump | None = None
        self._train: list[asyncio.TimerHandle] = []
        self._state = DriverState.CLOSED
        if world is not None:
            self._magnet = world.adjacent() is not None
            world.on_stack_change(self._on_stack_change)

    @property
    def name(self) -> str:
        return f"sim:{self.label}"

    @property
    def state(self) -> DriverState:
        return self._state

    @property
    def magnet(self) -> bool:
        """Where the world has put the magnet (not what the sensor reports)."""
        return self._magnet

    @property
    def fault(self) -> DockFault | None:
        """The injected fault, if any."""
        return self._fault

    async def open(self) -> None:
        """Start sensing; a magnet already present is reported after debounce and confirm, like a new dock."""
        if self._state is DriverState.OPEN:
            return
        loop = asyncio.get_running_loop()
        self._pump = DebouncePump(Debouncer(self.debounce, self.confirm, level=False, at=loop.time()))
        # Publish the loop before reading the magnet: a set_magnet() racing from another thread either sees the
        # loop and schedules its change, or wrote the magnet before we read it here.
        self._loop = loop
        self._state = DriverState.OPEN
        self._pump.feed(self._magnet)

    async def close(self) -> None:
        """Stop sensing; iterators end."""
        self._loop = None
        self._cancel_train()
        if self._pump is not None:
            self._pump.close()
        self._state = DriverState.CLOSED

    async def present(self) -> bool:
        """Whether a module is docked (confirmed)."""
        if self._state is not DriverState.OPEN:
            raise DriverStateError(f"dock sensor {self.name} is {self._state.value}; open() it first")
        return require_pump(self._pump, self.name).present

    async def events(self) -> AsyncIterator[DockEvent]:
        """Dock and undock events as they are confirmed, until close()."""
        async for event in require_pump(self._pump, self.name).events():
            yield event

    # ------------------------------------------------------------------ the world's side

    def set_magnet(self, present: bool) -> None:
        """Move the magnet onto (True) or away from the switch; safe from any thread."""
        self._magnet = present
        self._on_loop(self._switch)

    def set_fault(self, kind: DockFault | None) -> None:
        """Inject "stuck" (the switch output freezes) or clear it (None); safe from any thread."""
        if kind is not None and kind not in DOCK_FAULTS:
            raise DriverConfigError(f"sim dock {self.label}: unknown fault {kind!r}; expected one of {DOCK_FAULTS}")
        self._fault = kind
        if kind is None:
            self._on_loop(self._switch)
        else:
            self._on_loop(self._cancel_train)

    def _on_stack_change(self, adjacent: SimModule | None) -> None:
        self.set_magnet(adjacent is not None)

    def _on_loop(self, callback: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None:
            return  # closed: open() reads the magnet when it starts
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            callback()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(callback)

    def _switch(self) -> None:
        pump, loop = self._pump, self._loop
        if pump is None or loop is None or self._fault == "stuck":
            return
        self._cancel_train()
        present = self._magnet
        if not self.bounce or present == pump.debouncer.level:
            pump.feed(present)
            return
        # The final level is the magnet's; before it, `bounce` round trips through the other level.
        start = loop.time()
        for step in range(2 * self.bounce + 1):
            at = start + step * self.bounce_interval
            level = present if step % 2 == 0 else not present
            self._train.append(loop.call_at(at, pump.feed, level, at))

    def _cancel_train(self) -> None:
        for handle in self._train:
            handle.cancel()
        self._train.clear()
