"""What every driver shares: one Protocol per capability, the value types they exchange, DriverError, DriverState.

The agent programs against these Protocols only. Each capability has a real implementation (sysfs, smbus2,
libgpiod, nfcpy, pyserial) and is exercised in CI against a simulated twin at the lowest level that is faithful:
chips behind a fake SMBus, a generated sysfs tree, an nfcpy `udp` peer, a pty. Every method that touches hardware
is async and never blocks the event loop; blocking libraries run in the driver's own worker thread.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:  # the codec module imports this one; the type is only named here
    from drivers.serial.frame import DockStatus

# ----------------------------------------------------------------------------- errors


class DriverError(Exception):
    """Base of every error raised by the `drivers` package."""


class DriverConfigError(DriverError):
    """A driver config string cannot be parsed or names something that does not exist."""


class DriverStateError(DriverError):
    """A driver was used while closed or faulted."""


class BusError(DriverError):
    """An I2C transfer failed; `errno` is the kernel's code (EREMOTEIO, ENXIO, ETIMEDOUT, ...)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class NotAcknowledgedError(BusError):
    """The chip did not acknowledge its address (NACK: EREMOTEIO on Tegra, ENXIO elsewhere)."""


class BusTimeoutError(BusError):
    """The transfer timed out (ETIMEDOUT, or the worker thread did not answer in time)."""


class DeviceMismatchError(DriverError):
    """The chip at the configured address is not the one configured (wrong device ID)."""


class ImplausibleReadingError(DriverError):
    """A sensor answered with a value no working sensor produces (reset value, -256 C, 0 V on a live bus)."""


class NotAttachedError(DriverError):
    """No module is attached on the port (no USB-PD source, nothing docked)."""


class NegotiationError(DriverError):
    """The USB-PD source rejected the request or never confirmed it."""


class LinkError(DriverError):
    """An NFC or serial link failed (device gone, corrupt frame, no answer)."""


# ----------------------------------------------------------------------------- lifecycle


class DriverState(str, enum.Enum):
    """Lifecycle of a driver: closed until opened; faulted after an error it cannot recover from by itself."""

    CLOSED = "closed"
    OPEN = "open"
    FAULTED = "faulted"


@runtime_checkable
class Driver(Protocol):
    """Lifecycle common to every driver: `open()` before use, `close()` leaves the hardware in its safe default."""

    @property
    def name(self) -> str: ...  # e.g. "stusb4500:i2c-7@0x28", shown in health and logs

    @property
    def state(self) -> DriverState: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...


# ----------------------------------------------------------------------------- thermal, fan, power mode


class ThermalSource(Driver, Protocol):
    """Temperature zones in degrees Celsius; a zone that cannot be read, or reads implausibly, is None (offline)."""

    async def read(self) -> Mapping[str, float | None]: ...

    async def critical_trips(self) -> Mapping[str, float]: ...  # zone -> the kernel's critical trip, where known


@dataclass(frozen=True)
class FanState:
    """What the fan is doing: its profile, PWM duty (0..255) and speed where a tachometer exists."""

    profile: str
    pwm: int | None
    rpm: int | None


class FanControl(Driver, Protocol):
    """Fan profiles: "default" (the platform's own control), "cool" (higher duty), "max" (full speed)."""

    async def set_profile(self, profile: str) -> None: ...

    async def status(self) -> FanState: ...


@dataclass(frozen=True)
class PowerMode:
    """One nvpmodel power mode."""

    id: int
    name: str


class PowerModeControl(Driver, Protocol):
    """The SoC's power mode (nvpmodel on Jetson)."""

    async def modes(self) -> list[PowerMode]: ...

    async def get(self) -> PowerMode: ...

    async def set(self, mode_id: int) -> None: ...


# ----------------------------------------------------------------------------- USB power delivery

PdoKind = Literal["fixed", "battery", "variable", "augmented"]


@dataclass(frozen=True)
class Pdo:
    """One power data object a source offers. `index` is its 1-based object position."""

    index: int
    kind: PdoKind
    min_mv: int  # equals max_mv for a fixed supply
    max_mv: int
    max_ma: int | None  # fixed, variable and augmented (PPS) supplies
    max_mw: int | None  # battery supplies
    raw: int

    @property
    def power_mw(self) -> int:
        """The most power this object offers."""
        if self.max_mw is not None:
            return self.max_mw
        return self.max_mv * (self.max_ma or 0) // 1000


@dataclass(frozen=True)
class Rdo:
    """The request data object of the current contract, as the controller reports it."""

    object_position: int
    operating_ma: int
    max_ma: int
    capability_mismatch: bool
    raw: int


ContractState = Literal["detached", "typec_only", "negotiating", "explicit", "rejected", "failed"]


@dataclass(frozen=True)
class Contract:
    """The power contract on a port as the PD controller sees it."""

    state: ContractState
    source_pdos: tuple[Pdo, ...] = ()
    selected: Pdo | None = None
    rdo: Rdo | None = None


class PdController(Driver, Protocol):
    """A USB-PD sink controller: read the attached source's offers, request one, report the contract."""

    @property
    def controller(self) -> str: ...  # "stusb4500", "tps25750"

    async def attached(self) -> bool: ...

    async def source_caps(self) -> tuple[Pdo, ...]: ...  # NotAttachedError when nothing is attached

    async def request(self, pdo_index: int, operating_ma: int | None = None) -> Contract: ...

    async def contract(self) -> Contract: ...

    async def reset_to_default(self) -> Contract: ...  # back to the 5 V default contract (safe state)


@dataclass(frozen=True)
class PowerSample:
    """One power monitor reading."""

    bus_mv: float
    current_ma: float
    power_mw: float


class PowerMonitor(Driver, Protocol):
    """A bus voltage/current monitor (INA226)."""

    async def sample(self) -> PowerSample: ...


# ----------------------------------------------------------------------------- dock, NFC, serial


@dataclass(frozen=True)
class DockEvent:
    """A module was stacked onto (docked=True) or lifted off the box; `at` is loop time when it was confirmed."""

    docked: bool
    at: float


class DockSensor(Driver, Protocol):
    """The magnetic dock switch, debounced and presence-confirmed."""

    async def present(self) -> bool: ...

    def events(self) -> AsyncIterator[DockEvent]: ...


@dataclass(frozen=True)
class JoinOffer:
    """What a docked module offers over NFC: who it is, where to reach it, and an opaque cluster join token."""

    node_id: str
    endpoint: str  # host:port of its cluster API
    token: str = ""  # the cluster layer's join token; empty when the module only announces itself
    expires_at: int = 0  # unix seconds; 0 = no expiry
    extra: Mapping[str, str] = field(default_factory=dict)


class NfcLink(Driver, Protocol):
    """An NFC reader that can read a module's join offer and present our own offer to a reader."""

    async def read(self, timeout: float) -> JoinOffer | None: ...

    async def offer(self, offer: JoinOffer, timeout: float) -> bool: ...  # True when a reader read it


@dataclass(frozen=True)
class SerialMessage:
    """One decoded frame of the dock controller protocol (see drivers/serial/frame.py)."""

    kind: int
    sequence: int
    payload: bytes


class SerialLink(Driver, Protocol):
    """The framed, checksummed serial link to the dock controller."""

    async def request(self, kind: int, payload: bytes = b"", timeout: float = 1.0) -> SerialMessage: ...

    async def status(self, timeout: float = 1.0) -> DockStatus: ...  # GET_STATUS: magnet, module, VBUS, LED
