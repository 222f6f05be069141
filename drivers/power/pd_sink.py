"""What the I2C USB-PD sink controller drivers (STUSB4500, TPS25750) share around the I2C device lifecycle.

Both keep the source's offer as last read until a detach is seen, remember whether they made the chip ask for
more than 5 V, and on close() bring the port back to the 5 V default before releasing the bus.
"""

from __future__ import annotations

import abc

from drivers.base import Contract, NotAttachedError, Pdo
from drivers.i2c.device import I2cDevice
from drivers.i2c.transport import I2cBus


class I2cPdSink(I2cDevice):
    """A USB-PD sink controller on I2C (PdController) whose close() restores the 5 V default contract."""

    def __init__(self, bus: I2cBus, address: int, *, settle_timeout: float, poll_interval: float) -> None:
        super().__init__(bus, address)
        self._settle_timeout = settle_timeout
        self._poll_interval = poll_interval
        self._caps: tuple[Pdo, ...] = ()
        self._raised = False  # the chip asks for more than 5 V because of us; close() must bring the port back

    @property
    def controller(self) -> str:
        """The controller kind."""
        return self._kind

    async def attached(self) -> bool:
        """Whether a source is attached; with none, the offer read last is forgotten."""
        self._require_open()
        attached = await self._read_attached()
        if not attached:
            self._caps = ()
        return attached

    @abc.abstractmethod
    async def reset_to_default(self) -> Contract:
        """Back to the 5 V default contract."""

    async def _prepare(self) -> None:
        """Start the session with no offer read and nothing raised."""
        self._caps, self._raised = (), False

    async def _before_close(self) -> None:
        """Bring the port back to the 5 V default if we raised it; forget the offer either way."""
        try:
            if self._raised:
                await self.reset_to_default()
        finally:
            self._caps = ()

    @abc.abstractmethod
    async def _read_attached(self) -> bool:
        """The chip's own word on whether a source is attached."""

    async def _require_attached(self, action: str) -> None:
        if not await self.attached():
            raise NotAttachedError(f"{self.name}: cannot {action}: no USB-PD source is attached")
