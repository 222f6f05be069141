"""One simulated physical world shared by every twin: air temperature, heat from inference, the fan, and the stack.

Twins never hold physics themselves; they ask the world when a driver reads them (a TMP117 conversion, a sysfs
refresh), so every twin agrees on one state. Temperatures follow a first-order thermal model per zone: each zone
relaxes towards `ambient + idle rise + load rise * load - fan cooling` with a time constant, evaluated lazily
from the elapsed time. The world is touched from the event loop and from bus worker threads, so it is locked.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from drivers.base import JoinOffer


@dataclass(frozen=True)
class ZonePhysics:
    """How one zone heats: degrees above ambient when idle and at full load, and how much full fan removes."""

    idle_rise_c: float
    load_rise_c: float
    fan_cooling_c: float
    critical_c: float = 105.0


# Orin-like zones (names as on a T234; rises are plausible figures for a passively cooled box, not measurements).
ORIN_ZONES: Mapping[str, ZonePhysics] = {
    "cpu-thermal": ZonePhysics(8.0, 30.0, 12.0),
    "gpu-thermal": ZonePhysics(6.0, 34.0, 14.0),
    "cv0-thermal": ZonePhysics(5.0, 10.0, 6.0),
    "soc0-thermal": ZonePhysics(7.0, 22.0, 10.0),
    "soc1-thermal": ZonePhysics(7.0, 21.0, 10.0),
    "tj-thermal": ZonePhysics(9.0, 36.0, 14.0),
    "board": ZonePhysics(3.0, 8.0, 4.0, critical_c=85.0),
}

DEFAULT_PDOS = ((5000, 3000), (9000, 3000), (15000, 3000), (20000, 2250))


@dataclass(frozen=True)
class SimModule:
    """A module stacked on the box: its USB-PD source offers (raw PDO words) and the join offer its NFC tag holds."""

    module_id: str
    source_pdos: tuple[int, ...]
    offer: JoinOffer | None = None


@dataclass
class _ZoneState:
    physics: ZonePhysics
    celsius: float
    pinned: float | None = None


@dataclass
class SimWorld:
    """The shared simulated world; every method is thread-safe."""

    ambient_c: float = 25.0
    time_constant_s: float = 30.0
    zones: Mapping[str, ZonePhysics] = field(default_factory=lambda: dict(ORIN_ZONES))
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._load = 0.0
        self._fan = 0.0
        self._power_scale = 1.0
        self._state = {name: _ZoneState(p, self.ambient_c + p.idle_rise_c) for name, p in self.zones.items()}
        self._updated = self.clock()
        self._stack: list[SimModule] = []
        self._stack_listeners: list[Callable[[SimModule | None], None]] = []

    # ------------------------------------------------------------------ thermal

    def _advance(self) -> None:
        now = self.clock()
        elapsed = max(0.0, now - self._updated)
        self._updated = now
        decay = 1.0 - math.exp(-elapsed / self.time_constant_s) if self.time_constant_s > 0 else 1.0
        for zone in self._state.values():
            target = self._target(zone.physics)
            zone.celsius += (target - zone.celsius) * decay

    def _target(self, physics: ZonePhysics) -> float:
        return (
            self.ambient_c
            + physics.idle_rise_c
            + physics.load_rise_c * self._load * self._power_scale
            - physics.fan_cooling_c * self._fan
        )

    def temperatures(self) -> dict[str, float]:
        """Every zone's temperature now, in degrees Celsius."""
        with self._lock:
            self._advance()
            return {name: z.pinned if z.pinned is not None else z.celsius for name, z in self._state.items()}

    def critical_trips(self) -> dict[str, float]:
        """Every zone's critical trip (what the kernel would shut down at)."""
        return {name: p.critical_c for name, p in self.zones.items()}

    def set_thermal(self, *, ambient_c: float | None = None, time_constant_s: float | None = None) -> None:
        """Change the air temperature or how fast zones follow it."""
        with self._lock:
            self._advance()
            if ambient_c is not None:
                self.ambient_c = ambient_c
            if time_constant_s is not None:
                self.time_constant_s = time_constant_s

    def pin(self, zone: str, celsius: float | None) -> None:
        """Hold one zone at a fixed temperature (None releases it); KeyError for unknown zones."""
        with self._lock:
            self._advance()
            self._state[zone].pinned = celsius

    def set_load(self, load: float) -> None:
        """Inference load, 0 (idle) to 1 (every batch slot decoding); it turns into heat."""
        with self._lock:
            self._advance()
            self._load = min(1.0, max(0.0, load))

    def set_fan(self, duty: float) -> None:
        """Fan duty 0..1 as the fan's PWM currently drives it."""
        with self._lock:
            self._advance()
            self._fan = min(1.0, max(0.0, duty))

    def set_power_scale(self, scale: float) -> None:
        """How much of the load's heat the current power mode produces (1 = MAXN)."""
        with self._lock:
            self._advance()
            self._power_scale = max(0.0, scale)

    @property
    def load(self) -> float:
        with self._lock:
            return self._load

    def board_current_ma(self, bus_mv: float) -> float:
        """Current the box draws from the dock's supply at `bus_mv`: idle plus load (about 4 W to 15 W)."""
        if bus_mv <= 0:
            return 0.0
        with self._lock:
            watts = 4.0 + 11.0 * self._load * self._power_scale
        return watts / (bus_mv / 1000.0) * 1000.0

    # ------------------------------------------------------------------ the stack

    def stack(self, module: SimModule) -> None:
        """Put a module on top of the stack; ValueError if one with that id is already stacked."""
        with self._lock:
            if any(m.module_id == module.module_id for m in self._stack):
                raise ValueError(f"module {module.module_id!r} is already stacked")
            self._stack.append(module)
            adjacent = self._stack[0]
            listeners = list(self._stack_listeners)
        for listener in listeners:
            listener(adjacent)

    def unstack(self, module_id: str) -> SimModule:
        """Lift a module (and so everything above it) off; KeyError if it is not stacked."""
        with self._lock:
            for position, module in enumerate(self._stack):
                if module.module_id == module_id:
                    del self._stack[position:]
                    break
            else:
                raise KeyError(module_id)
            adjacent = self._stack[0] if self._stack else None
            listeners = list(self._stack_listeners)
        for listener in listeners:
            listener(adjacent)
        return module

    def update_module(self, module_id: str, **changes: object) -> None:
        """Change a stacked module's offers in place (for scenarios: a source that changes its caps)."""
        with self._lock:
            self._stack = [
                replace(m, **changes) if m.module_id == module_id else m  # type: ignore[arg-type]
                for m in self._stack
            ]

    @property
    def modules(self) -> tuple[SimModule, ...]:
        with self._lock:
            return tuple(self._stack)

    def adjacent(self) -> SimModule | None:
        """The module directly on the box's dock port (the one its PD controller and NFC reader see)."""
        with self._lock:
            return self._stack[0] if self._stack else None

    def on_stack_change(self, listener: Callable[[SimModule | None], None]) -> None:
        """Call `listener(adjacent module or None)` after every stack change (from the changing thread)."""
        with self._lock:
            self._stack_listeners.append(listener)

    def snapshot(self) -> dict[str, object]:
        """The world's state for the sim API."""
        temperatures = self.temperatures()
        with self._lock:
            return {
                "ambient_c": self.ambient_c,
                "time_constant_s": self.time_constant_s,
                "load": self._load,
                "fan_duty": self._fan,
                "power_scale": self._power_scale,
                "zones": {name: round(c, 3) for name, c in temperatures.items()},
                "pinned": {name: z.pinned for name, z in self._state.items() if z.pinned is not None},
                "modules": [
                    {
                        "id": m.module_id,
                        "source_pdos": [f"0x{p:08x}" for p in m.source_pdos],
                        "offer": None
                        if m.offer is None
                        else {"node_id": m.offer.node_id, "endpoint": m.offer.endpoint},
                    }
                    for m in self._stack
                ],
            }
