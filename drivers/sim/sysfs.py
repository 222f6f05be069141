"""A file-level twin of a Jetson Orin's thermal and fan sysfs, generated under any directory.

The layout follows the kernel's thermal sysfs API and hwmon ABI as L4T exposes them (research/hardware.md
section 1): `class/thermal/thermal_zoneN` and `class/hwmon/hwmonK` are symlinks into `devices/`, each zone has
`type`, `temp` (m°C), `mode`, `policy` and `trip_point_K_{type,temp,hyst}`; the fan is a hwmon node named
"pwmfan" with `pwm1` (0..255), `pwm1_enable` (1 manual, 2 automatic) and a tachometer `fan1_input` (RPM).

Zone names are Orin's (T234). Trip temperatures are plausible Orin-like values, NOT measured on a device:
a passive (software throttling) trip at 99 °C and a critical (kernel shutdown) trip at 105 °C for the CPU, GPU,
CV and SoC zones, and a "hot" trip on tj-thermal. Confirm on hardware with `grep . trip_point_*`.

Every method here blocks (file I/O): call them from a worker thread (`asyncio.to_thread`), or before the event
loop runs. `create()` is the async way to build one. Faults mirror what boards really do: a zone whose `temp`
cannot be read, a stuck zone, jtop's -256 °C, a broken BPMP path's constant 0, an empty `temp` (tj-thermal on
Orin NX/Nano), and a `pwm1` the process cannot write.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

FaultKind = Literal["unreadable", "stuck", "implausible", "zero", "empty"]
FAULT_KINDS: tuple[FaultKind, ...] = ("unreadable", "stuck", "implausible", "zero", "empty")


@dataclass(frozen=True)
class SimTrip:
    """One trip point: kernel type ("critical", "hot", "passive", "active"), temperature and hysteresis in m°C."""

    type: str
    temp_mc: int
    hyst_mc: int = 0


@dataclass(frozen=True)
class SimZone:
    """A thermal zone of the twin: its `type` string, starting temperature and trip points."""

    type: str
    initial_c: float = 45.0
    trips: tuple[SimTrip, ...] = ()


_SOC_TRIPS = (SimTrip("passive", 99_000, 2_000), SimTrip("critical", 105_000))

ORIN_ZONES: tuple[SimZone, ...] = (
    SimZone("cpu-thermal", 47.5, _SOC_TRIPS),
    SimZone("gpu-thermal", 46.0, _SOC_TRIPS),
    SimZone("cv0-thermal", 45.0, _SOC_TRIPS),
    SimZone("soc0-thermal", 46.5, _SOC_TRIPS),
    SimZone("soc1-thermal", 46.0, _SOC_TRIPS),
    SimZone("tj-thermal", 47.5, (SimTrip("hot", 103_000, 2_000),)),
)

# What the platform's fan control (nvfancontrol on JetPack 5/6) does in automatic mode, over the hottest zone:
# off below AUTO_FAN_START_C, then from a kick-start duty rising linearly to full at AUTO_FAN_FULL_C.
# A plausible "quiet"-profile shape, not NVIDIA's shipped table.
AUTO_FAN_START_C = 35.0
AUTO_FAN_FULL_C = 75.0
AUTO_FAN_KICKSTART_PWM = 64
MAX_RPM = 5000


def rpm_for_pwm(pwm: int) -> int:
    """Tachometer reading of the twin's fan at a given duty: proportional, 0 when stopped."""
    return 0 if pwm <= 0 else pwm * MAX_RPM // 255


def auto_pwm(hottest_c: float) -> int:
    """The duty the platform's automatic control picks for the hottest zone."""
    if hottest_c < AUTO_FAN_START_C:
        return 0
    if hottest_c >= AUTO_FAN_FULL_C:
        return 255
    span = (hottest_c - AUTO_FAN_START_C) / (AUTO_FAN_FULL_C - AUTO_FAN_START_C)
    return round(AUTO_FAN_KICKSTART_PWM + (255 - AUTO_FAN_KICKSTART_PWM) * span)


def _write_atomic(path: Path, text: str) -> None:
    # A reader must never see a half-written attribute (the kernel hands out whole values), so write a
    # sibling and rename it over the attribute.
    scratch = path.with_name(f".{path.name}.sim-new")
    scratch.write_text(text)
    os.replace(scratch, path)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class SimSysfs:
    """A generated Orin-like /sys under `root`; `refresh()` moves it one step of the outside world forward."""

    def __init__(
        self,
        root: Path,
        zone_temperatures: Callable[[], Mapping[str, float]] | None = None,
        zones: Sequence[SimZone] = ORIN_ZONES,
        fan: bool = True,
    ) -> None:
        self.root = Path(root)
        self.zones = tuple(zones)
        self.zone_temperatures: Callable[[], Mapping[str, float]] = zone_temperatures or (lambda: {})
        # Keyed by zone index: boards can have several zones with the same type.
        self._temps = {index: zone.initial_c for index, zone in enumerate(self.zones)}
        self._faults: dict[int, FaultKind] = {}
        self._removed: set[int] = set()
        self._lock = threading.Lock()
        self._has_fan = fan
        self._pwm = 0
        self._build()
        self.refresh()

    @classmethod
    async def create(
        cls,
        root: Path,
        zone_temperatures: Callable[[], Mapping[str, float]] | None = None,
        zones: Sequence[SimZone] = ORIN_ZONES,
        fan: bool = True,
    ) -> SimSysfs:
        """Build the tree in a worker thread (for use from async code)."""
        return await asyncio.to_thread(cls, root, zone_temperatures, zones, fan)

    # ------------------------------------------------------------------ layout

    @property
    def thermal_class(self) -> Path:
        """`<root>/class/thermal`."""
        return self.root / "class" / "thermal"

    def zone_dir(self, zone_type: str) -> Path:
        """The directory (through its class symlink) of the first zone with this type."""
        return self._zone_path(self._indices(zone_type)[0])

    def _zone_path(self, index: int) -> Path:
        return self.thermal_class / f"thermal_zone{index}"

    @property
    def fan_dir(self) -> Path:
        """The pwmfan hwmon node (through its class symlink)."""
        if not self._has_fan:
            raise LookupError("this twin was built without a fan")
        return self.root / "class" / "hwmon" / "hwmon1"

    def _indices(self, zone_type: str) -> list[int]:
        indices = [index for index, zone in enumerate(self.zones) if zone.type == zone_type]
        if not indices:
            raise KeyError(f"no zone {zone_type!r} in the twin; it has {', '.join(z.type for z in self.zones)}")
        return indices

    def _build(self) -> None:
        devices = self.root / "devices" / "virtual" / "thermal"
        self.thermal_class.mkdir(parents=True, exist_ok=True)
        for index, zone in enumerate(self.zones):
            real = devices / f"thermal_zone{index}"
            real.mkdir(parents=True, exist_ok=True)
            (real / "type").write_text(f"{zone.type}\n")
            (real / "mode").write_text("enabled\n")
            (real / "policy").write_text("step_wise\n")
            (real / "available_policies").write_text("step_wise power_allocator user_space\n")
            for k, trip in enumerate(zone.trips):
                (real / f"trip_point_{k}_type").write_text(f"{trip.type}\n")
                (real / f"trip_point_{k}_temp").write_text(f"{trip.temp_mc}\n")
                (real / f"trip_point_{k}_hyst").write_text(f"{trip.hyst_mc}\n")
            _symlink(self.thermal_class / real.name, Path("../../devices/virtual/thermal") / real.name)
        hwmon_class = self.root / "class" / "hwmon"
        hwmon_class.mkdir(parents=True, exist_ok=True)
        # A power monitor node first, so a driver that takes "the first hwmon" instead of the fan is caught.
        ina = self.root / "devices" / "platform" / "bus@0" / "c240000.i2c" / "i2c-1" / "1-0040" / "hwmon" / "hwmon0"
        ina.mkdir(parents=True, exist_ok=True)
        (ina / "name").write_text("ina3221\n")
        (ina / "in1_input").write_text("5072\n")
        _symlink(hwmon_class / "hwmon0", Path("../../devices/platform/bus@0/c240000.i2c/i2c-1/1-0040/hwmon/hwmon0"))
        if self._has_fan:
            fan = self.root / "devices" / "platform" / "pwm-fan" / "hwmon" / "hwmon1"
            fan.mkdir(parents=True, exist_ok=True)
            (fan / "name").write_text("pwmfan\n")
            (fan / "pwm1").write_text("0\n")
            (fan / "pwm1_enable").write_text("2\n")  # the platform's automatic control owns the fan at boot
            (fan / "fan1_input").write_text("0\n")
            _symlink(hwmon_class / "hwmon1", Path("../../devices/platform/pwm-fan/hwmon/hwmon1"))

    # ------------------------------------------------------------------ the world moves

    def refresh(self) -> None:
        """Write each zone's temperature (atomically) and let the fan follow its control mode."""
        with self._lock:
            world = self.zone_temperatures()
            for index, zone in enumerate(self.zones):
                if zone.type in world:
                    self._temps[index] = float(world[zone.type])
                fault = self._faults.get(index)
                if fault in ("stuck", "unreadable") or index in self._removed:
                    continue
                text = {"implausible": "-256000", "zero": "0", "empty": ""}.get(
                    fault or "", str(round(self._temps[index] * 1000))
                )
                _write_atomic(self._zone_path(index) / "temp", f"{text}\n" if text else "")
            if self._has_fan:
                self._refresh_fan()

    def _refresh_fan(self) -> None:
        fan = self.fan_dir
        if _read_int(fan / "pwm1_enable") == 2 and (fan / "pwm1").is_file():
            _write_atomic(fan / "pwm1", f"{auto_pwm(max(self._temps.values(), default=0.0))}\n")
        pwm = _read_int(fan / "pwm1")
        if pwm is not None:
            self._pwm = max(0, min(255, pwm))
        _write_atomic(fan / "fan1_input", f"{rpm_for_pwm(self._pwm)}\n")

    def fan_pwm(self) -> int:
        """The duty the fan runs at now (pwm1 read back), so the world can cool by it."""
        if not self._has_fan:
            return 0
        with self._lock:
            pwm = _read_int(self.fan_dir / "pwm1")
            if pwm is not None:
                self._pwm = max(0, min(255, pwm))
            return self._pwm

    def temperature(self, zone_type: str) -> float:
        """The temperature the world last gave a zone (what `temp` shows when the zone is healthy)."""
        index = self._indices(zone_type)[0]
        with self._lock:
            return self._temps[index]

    # ------------------------------------------------------------------ faults

    def set_fault(self, zone_type: str, kind: FaultKind | None) -> None:
        """Break a zone ("unreadable", "stuck", "implausible" = -256 °C, "zero", "empty") or heal it (None).

        With duplicate zone types every zone of that type is affected.
        """
        if kind is not None and kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; expected one of {', '.join(FAULT_KINDS)} or None")
        indices = self._indices(zone_type)
        with self._lock:
            for index in indices:
                temp = self._zone_path(index) / "temp"
                if self._faults.pop(index, None) == "unreadable":
                    shutil.rmtree(temp)
                    temp.write_text(f"{round(self._temps[index] * 1000)}\n")
                if kind is None:
                    continue
                self._faults[index] = kind
                if kind == "unreadable":
                    # chmod does not stop root (the test suite runs as root); reading a directory fails for
                    # anyone with EISDIR, an OSError like the EIO/ENODATA a dead BPMP path gives.
                    temp.unlink(missing_ok=True)
                    temp.mkdir()
        self.refresh()

    def set_pwm_writable(self, writable: bool) -> None:
        """Make `pwm1` unwritable (and unreadable) for everyone, root included, or restore it."""
        pwm1 = self.fan_dir / "pwm1"
        with self._lock:
            if not writable and not pwm1.is_dir():
                pwm1.unlink(missing_ok=True)
                pwm1.mkdir()
            elif writable and pwm1.is_dir():
                shutil.rmtree(pwm1)
                pwm1.write_text(f"{self._pwm}\n")

    def remove_zone(self, zone_type: str) -> None:
        """Take one zone away, as when a driver unbinds (its class symlink disappears)."""
        indices = self._indices(zone_type)
        with self._lock:
            for index in indices:
                self._removed.add(index)
                with contextlib.suppress(FileNotFoundError):
                    self._zone_path(index).unlink()


def _symlink(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)
