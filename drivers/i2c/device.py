"""The lifecycle every I2C chip driver shares: its name, its state, open() that identifies the chip, close().

A driver names its chip kind, identifies the chip in `_identify` (DeviceMismatchError when another chip answers)
and, where it needs to, prepares it and its session in `_prepare` and returns it to its safe default in
`_before_close`.
"""

from __future__ import annotations

import abc
from typing import ClassVar

from drivers.base import DriverError, DriverState, DriverStateError
from drivers.i2c.transport import I2cBus


class I2cDevice(abc.ABC):
    """One chip at `address` on `bus`: CLOSED until open() has identified it, then OPEN until close()."""

    _kind: ClassVar[str]  # the chip kind the name starts with, e.g. "tmp117"
    # Whether a DriverError during open() leaves the driver FAULTED; otherwise it keeps the state it had.
    _faults_on_failed_open: ClassVar[bool] = True

    def __init__(self, bus: I2cBus, address: int) -> None:
        self._bus = bus
        self._address = address
        self._state = DriverState.CLOSED

    @property
    def name(self) -> str:
        """Shown in health and logs, e.g. "tmp117:i2c-7@0x48"."""
        return f"{self._kind}:{self._bus.name}@0x{self._address:02x}"

    @property
    def state(self) -> DriverState:
        """Lifecycle state."""
        return self._state

    async def open(self) -> None:
        """Open the bus, identify the chip (DeviceMismatchError if it is another) and prepare it; no-op when open."""
        if self._state is DriverState.OPEN:
            return
        await self._bus.open()
        try:
            await self._identify()
            await self._prepare()
        except BaseException as exc:
            if isinstance(exc, DriverError) and self._faults_on_failed_open:
                self._state = DriverState.FAULTED
            # A driver that failed to open holds no bus, whatever went wrong (cancellation included).
            await self._bus.close()
            raise
        self._state = DriverState.OPEN

    async def close(self) -> None:
        """Return the chip to its safe default and release the bus; a driver that is not open just becomes CLOSED."""
        if self._state is not DriverState.OPEN:
            self._state = DriverState.CLOSED
            return
        try:
            await self._before_close()
        finally:
            # The bus is released even when the chip could not be reset: the driver is closed either way.
            self._state = DriverState.CLOSED
            await self._bus.close()

    @abc.abstractmethod
    async def _identify(self) -> None:
        """Check the chip at the address is this driver's kind; DeviceMismatchError when it is not."""

    async def _prepare(self) -> None:  # noqa: B027 - an optional hook, empty on purpose
        """Configure the identified chip and start the driver's session; most drivers need nothing."""

    async def _before_close(self) -> None:  # noqa: B027 - an optional hook, empty on purpose
        """Return the chip to its safe default while the bus is still open; most chips are safe as they are."""

    def _require_open(self) -> None:
        """DriverStateError unless the driver is open."""
        if self._state is not DriverState.OPEN:
            raise DriverStateError(f"{self.name} is {self._state.value}; open() it first")
