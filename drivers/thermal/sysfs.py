"""Thermal zones from the kernel's thermal sysfs (`/sys/class/thermal/thermal_zone*`) as a ThermalSource.

Each zone has `type` (its name), `temp` in m°C and `trip_point_K_{type,temp}` (kernel
Documentation/driver-api/thermal/sysfs-api.rst). Boards break in known ways, and one bad zone must never take the
others down (research/hardware.md section 1): `temp` may fail to read (EIO/ENODATA from a BPMP-backed zone), read
empty (tj-thermal on Orin NX/Nano), stick at 0 (a broken BPMP path), or read -256 °C (what jtop shows for a dead
zone). All of those make that zone None (offline). Only losing the whole thermal class is an error.
All file I/O runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from drivers.base import DriverConfigError, DriverError, DriverState, DriverStateError

# Plausibility bounds in °C. Nothing on a running Jetson is at or below -40 °C (the lowest rated ambient of the
# modules) or above 150 °C (beyond every silicon junction rating); exactly 0 is the broken-BPMP signature.
MIN_PLAUSIBLE_C = -40.0
MAX_PLAUSIBLE_C = 150.0

_ZONE_DIR = re.compile(r"^thermal_zone(\d+)$")
_TRIP_TYPE = re.compile(r"^trip_point_(\d+)_type$")


def parse_millicelsius(text: str) -> float | None:
    """A `temp` file's text -> °C, or None when empty, not an integer, or implausible."""
    try:
        millic = int(text.strip())
    except ValueError:
        return None
    if millic == 0:
        return None
    celsius = millic / 1000.0
    if celsius <= MIN_PLAUSIBLE_C or celsius > MAX_PLAUSIBLE_C:
        return None
    return celsius


@dataclass(frozen=True)
class ZoneInfo:
    """One discovered zone: the name we report, its sysfs directory, and its critical trip (°C) if it has one."""

    name: str
    path: Path
    critical_c: float | None


def discover_zones(thermal_class: Path) -> list[ZoneInfo]:
    """List the zones under a thermal class directory in index order; duplicate types get "#2", "#3"... (blocking)."""
    if not thermal_class.is_dir():
        raise DriverError(f"{thermal_class} does not exist or is not a directory; is sysfs mounted there?")
    entries: list[tuple[int, Path]] = []
    for entry in thermal_class.iterdir():
        match = _ZONE_DIR.match(entry.name)
        if match and entry.is_dir():
            entries.append((int(match.group(1)), entry))
    zones: list[ZoneInfo] = []
    seen: dict[str, int] = {}
    for index, path in sorted(entries):
        try:
            zone_type = (path / "type").read_text().strip()
        except OSError:
            zone_type = ""
        zone_type = zone_type or f"thermal_zone{index}"  # a zone without a readable type keeps its sysfs name
        seen[zone_type] = seen.get(zone_type, 0) + 1
        name = zone_type if seen[zone_type] == 1 else f"{zone_type}#{seen[zone_type]}"
        zones.append(ZoneInfo(name, path, _critical_trip(path)))
    return zones


def _critical_trip(zone: Path) -> float | None:
    """The lowest "critical" trip of a zone in °C (the one the kernel shuts down at), if any."""
    found: list[float] = []
    for entry in zone.iterdir():
        match = _TRIP_TYPE.match(entry.name)
        if not match:
            continue
        try:
            if entry.read_text().strip() != "critical":
                continue
            found.append(int((zone / f"trip_point_{match.group(1)}_temp").read_text().strip()) / 1000.0)
        except (OSError, ValueError):
            continue  # an unreadable trip is not a trip we can act on
    return min(found) if found else None


def _read_zone(path: Path) -> float | None:
    try:
        return parse_millicelsius((path / "temp").read_text())
    except OSError:
        return None


class SysfsThermal:
    """Every thermal zone under `<root>/class/thermal` (or the named subset), read in a worker thread."""

    def __init__(self, root: Path = Path("/sys"), zones: Sequence[str] | None = None) -> None:
        self._root = Path(root)
        self._wanted = tuple(zones) if zones is not None else None
        self._zones: list[ZoneInfo] = []
        self._state = DriverState.CLOSED

    @property
    def name(self) -> str:
        """E.g. "sysfs:/sys"."""
        return f"sysfs:{self._root}"

    @property
    def state(self) -> DriverState:
        """Lifecycle state; FAULTED while the thermal class directory is gone."""
        return self._state

    @property
    def thermal_class(self) -> Path:
        """`<root>/class/thermal`."""
        return self._root / "class" / "thermal"

    @property
    def zones(self) -> tuple[str, ...]:
        """The zone names read() reports, in sysfs index order (after open())."""
        return tuple(zone.name for zone in self._zones)

    async def open(self) -> None:
        """Discover the zones and their critical trips; DriverConfigError names requested zones that do not exist."""
        zones = await asyncio.to_thread(discover_zones, self.thermal_class)
        if not zones:
            raise DriverError(f"{self.thermal_class} has no thermal_zone* entries; this kernel reports no temperatures")
        if self._wanted is not None:
            by_name = {zone.name: zone for zone in zones}
            missing = [name for name in self._wanted if name not in by_name]
            if missing:
                raise DriverConfigError(
                    f"{self.name}: no thermal zone named {', '.join(repr(m) for m in missing)}; "
                    f"this board has {', '.join(by_name)}"
                )
            zones = [by_name[name] for name in self._wanted]
        self._zones = zones
        self._state = DriverState.OPEN

    async def close(self) -> None:
        """Nothing to put back: this driver only reads."""
        self._state = DriverState.CLOSED

    async def read(self) -> Mapping[str, float | None]:
        """{zone: °C or None (offline)}; DriverError only when the thermal class directory itself is gone."""
        if self._state is DriverState.CLOSED:
            raise DriverStateError(f"{self.name} is closed; open() it first")
        zones = self._zones
        thermal_class = self.thermal_class

        def read_all() -> dict[str, float | None]:
            if not thermal_class.is_dir():
                raise DriverError(f"{thermal_class} disappeared; no temperature can be read (sysfs unmounted?)")
            return {zone.name: _read_zone(zone.path) for zone in zones}

        try:
            readings = await asyncio.to_thread(read_all)
        except DriverError:
            self._state = DriverState.FAULTED
            raise
        self._state = DriverState.OPEN
        return readings

    async def critical_trips(self) -> Mapping[str, float]:
        """{zone: critical trip °C} for the zones that have one, as read at open()."""
        return {zone.name: zone.critical_c for zone in self._zones if zone.critical_c is not None}
