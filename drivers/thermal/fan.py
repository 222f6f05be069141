"""The board fan through its hwmon node: `pwm1` (duty 0..255), `pwm1_enable` (1 manual, 2 automatic) and a
tachometer `fan1_input` (RPM) where the board has one (research/hardware.md section 1).

Profiles: "default" hands the fan back to whatever controlled it when we opened (normally the platform's automatic
control, pwm1_enable=2), "cool" and "max" take manual control at a fixed duty. close() returns to "default".
On JetPack 5/6 the nvfancontrol service also drives pwm1; a manual profile only sticks while that service is
stopped, which needs a privileged helper (research section 8), not this driver. All file I/O runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from dataclasses import dataclass
from pathlib import Path

from drivers.base import DriverConfigError, DriverError, DriverState, DriverStateError, FanState

MANUAL = 1
AUTOMATIC = 2
# Manual duties per profile; "default" is not here because it restores what was there before.
PROFILE_PWM: dict[str, int] = {"cool": 180, "max": 255}
PROFILES: tuple[str, ...] = ("default", *PROFILE_PWM)


def describe_write_error(path: Path, exc: OSError) -> str:
    """Say why a sysfs attribute could not be written, and what usually causes it."""
    what = f"cannot write {path}: {exc.strerror or exc}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            f"{what}. The agent needs write access to the fan's hwmon attributes "
            "(a udev rule giving its group pwm1/pwm1_enable, or the privileged helper)"
        )
    if exc.errno == errno.EROFS:
        return (
            f"{what}. /sys is read-only for this process; systemd's ProtectKernelTunables=yes does that, "
            "so leave it off for the agent or make the path a ReadWritePaths= entry"
        )
    return f"{what}; is this really a pwm fan's hwmon node?"


@dataclass(frozen=True)
class HwmonNode:
    """The hwmon directory that owns pwm1, and where its tachometer is (None when the board has none)."""

    path: Path
    tach: Path | None


def find_fan(hwmon_class: Path, hwmon_name: str | None) -> HwmonNode:
    """The first hwmon node with a pwm1 (and the given `name`, if any) plus its tachometer (blocking)."""
    if not hwmon_class.is_dir():
        raise DriverConfigError(f"{hwmon_class} does not exist; no hwmon devices to find a fan in")
    nodes = sorted(
        (p for p in hwmon_class.iterdir() if p.name.startswith("hwmon")),
        key=lambda p: int(p.name[5:]) if p.name[5:].isdigit() else 1 << 30,
    )
    names = {node: _read_text(node / "name") for node in nodes}
    for node in nodes:
        if (node / "pwm1").exists() and hwmon_name in (None, names[node]):
            if (node / "fan1_input").exists():
                return HwmonNode(node, node / "fan1_input")
            # Some boards expose the tachometer as a separate hwmon node (for example "pwm_tach").
            tach = next(
                (
                    n / "fan1_input"
                    for n in nodes
                    if n != node and "tach" in (names[n] or "") and (n / "fan1_input").exists()
                ),
                None,
            )
            return HwmonNode(node, tach)
    wanted = f"named {hwmon_name!r} " if hwmon_name else ""
    found = ", ".join(f"{n.name}={names[n]!r}" for n in nodes) or "none"
    raise DriverConfigError(f"no hwmon node {wanted}with pwm1 under {hwmon_class} (found: {found})")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _write(path: Path, value: int) -> None:
    # sysfs attributes are written in place with one write(); no temp-file-and-rename on sysfs.
    try:
        with path.open("w") as handle:
            handle.write(f"{value}\n")
    except OSError as exc:
        raise DriverError(describe_write_error(path, exc)) from exc


class HwmonFan:
    """A PWM fan as FanControl: profiles over pwm1/pwm1_enable, state from pwm1 and the tachometer."""

    def __init__(self, root: Path = Path("/sys"), hwmon_name: str | None = None) -> None:
        self._root = Path(root)
        self._hwmon_name = hwmon_name
        self._node: HwmonNode | None = None
        self._saved_enable = AUTOMATIC
        self._saved_pwm: int | None = None
        self._profile = "default"
        self._state = DriverState.CLOSED

    @property
    def name(self) -> str:
        """E.g. "hwmon:/sys/class/hwmon/hwmon1" once opened."""
        where = self._node.path if self._node else self._root / "class" / "hwmon"
        return f"hwmon:{where}"

    @property
    def state(self) -> DriverState:
        """Lifecycle state (the fan's own state is `status()`)."""
        return self._state

    @property
    def profile(self) -> str:
        """The profile last applied."""
        return self._profile

    async def open(self) -> None:
        """Find the fan and remember how it was controlled, so "default" and close() can put that back."""
        node = await asyncio.to_thread(find_fan, self._root / "class" / "hwmon", self._hwmon_name)
        enable = await asyncio.to_thread(_read_int, node.path / "pwm1_enable")
        pwm = await asyncio.to_thread(_read_int, node.path / "pwm1")
        self._node = node
        # A node without a readable pwm1_enable is treated as platform-controlled, the usual Jetson default.
        self._saved_enable = enable if enable is not None else AUTOMATIC
        self._saved_pwm = pwm
        self._profile = "default"
        self._state = DriverState.OPEN

    async def set_profile(self, profile: str) -> None:
        """Apply "default", "cool" or "max"; DriverError names the valid profiles or says why pwm1 is unwritable."""
        node = self._require_open()
        if profile not in PROFILES:
            raise DriverError(f"unknown fan profile {profile!r}; valid profiles are {', '.join(PROFILES)}")

        def apply() -> None:
            if profile == "default":
                _write(node.path / "pwm1_enable", self._saved_enable)
                if self._saved_enable == MANUAL and self._saved_pwm is not None:
                    _write(node.path / "pwm1", self._saved_pwm)
                return
            # Manual mode first: with automatic control on, the kernel or service would overwrite the duty.
            _write(node.path / "pwm1_enable", MANUAL)
            try:
                _write(node.path / "pwm1", PROFILE_PWM[profile])
            except DriverError:
                # Never leave the fan in manual mode at an unknown duty: give it back to its previous control.
                with contextlib.suppress(DriverError):
                    _write(node.path / "pwm1_enable", self._saved_enable)
                raise

        await asyncio.to_thread(apply)
        self._profile = profile

    async def status(self) -> FanState:
        """Profile, duty and RPM (None where the attribute cannot be read or there is no tachometer)."""
        node = self._require_open()

        def read() -> FanState:
            rpm = _read_int(node.tach) if node.tach is not None else None
            return FanState(self._profile, _read_int(node.path / "pwm1"), rpm)

        return await asyncio.to_thread(read)

    async def close(self) -> None:
        """Restore the "default" profile (the safe state); the driver is closed even if that write fails."""
        if self._state is DriverState.CLOSED:
            return
        try:
            await self.set_profile("default")
        finally:
            self._state = DriverState.CLOSED

    def _require_open(self) -> HwmonNode:
        if self._state is not DriverState.OPEN or self._node is None:
            raise DriverStateError(f"{self.name} is {self._state.value}; open() it first")
        return self._node
