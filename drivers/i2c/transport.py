"""The one way drivers reach an I2C chip: combined write/read transfers on a bus owned by one worker thread.

smbus2 blocks in ioctl(), so every transfer runs on the bus's single worker thread, never on the event loop.
One thread per bus also serialises transfers the way the wire does, and the asyncio lock keeps a driver's
multi-transfer sequence (pointer write, then read) from interleaving with another driver's on the same bus.
Transfers use I2C_RDWR messages only (write the register pointer, repeated start, read): that works on plain
I2C adapters such as Tegra's, where SMBus block commands may not.
"""

from __future__ import annotations

import asyncio
import errno
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from smbus2 import i2c_msg

from common.aio import wait_for
from drivers.base import BusError, BusTimeoutError, DriverConfigError, NotAcknowledgedError

_T = TypeVar("_T")

# Tegra's driver answers a NACK with EREMOTEIO; most others with ENXIO. Both mean "nobody answered".
_NACK_ERRNOS = frozenset({errno.EREMOTEIO, errno.ENXIO})


class SMBusLike(Protocol):
    """The part of smbus2.SMBus the transport uses; FakeSMBus implements it too."""

    def i2c_rdwr(self, *messages: Any) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class I2cAddress:
    """Where a chip sits: bus device (e.g. "i2c-7") and 7-bit address."""

    bus: str
    address: int

    def __str__(self) -> str:
        return f"{self.bus}@0x{self.address:02x}"


_ADDRESS = re.compile(r"^(i2c-\d+)@(0x[0-9a-fA-F]{1,2}|\d{1,3})$")


def parse_i2c_address(text: str) -> I2cAddress:
    """Parse "i2c-7@0x28"; DriverConfigError names what is wrong."""
    match = _ADDRESS.match(text.strip())
    if match is None:
        raise DriverConfigError(f"{text!r} is not an I2C location; expected bus@address such as i2c-7@0x28")
    address = int(match.group(2), 0)
    if not 0x08 <= address <= 0x77:
        raise DriverConfigError(f"I2C address 0x{address:02x} in {text!r} is reserved; use 0x08..0x77")
    return I2cAddress(match.group(1), address)


class I2cBus:
    """One I2C bus: a single worker thread, an asyncio lock, and errno -> DriverError translation."""

    def __init__(self, name: str, opener: Callable[[], SMBusLike], timeout: float = 0.5) -> None:
        self.name = name
        self.timeout = timeout
        self._opener = opener
        self._bus: SMBusLike | None = None
        self._worker: ThreadPoolExecutor | None = None
        self._lock: asyncio.Lock | None = None
        self._users = 0

    @classmethod
    def linux(cls, name: str, timeout: float = 0.5) -> I2cBus:
        """The kernel's /dev/<name> (for example /dev/i2c-7)."""
        from smbus2 import SMBus

        return cls(name, lambda: SMBus(f"/dev/{name}"), timeout)

    async def open(self) -> None:
        """Open the bus (reference-counted: every driver on it opens and closes it)."""
        self._users += 1
        if self._worker is not None:
            return
        self._lock = asyncio.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"i2c-{self.name}")
        try:
            self._bus = await self._run(self._opener, "open the bus")
        except BaseException:
            self._users -= 1
            await self._shutdown()
            raise

    async def close(self) -> None:
        """Release one user; the last one closes the device and stops the thread."""
        self._users = max(0, self._users - 1)
        if self._users == 0 and self._worker is not None:
            bus, self._bus = self._bus, None
            if bus is not None:
                await self._run(bus.close, "close the bus")
            await self._shutdown()

    async def _shutdown(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            await asyncio.to_thread(worker.shutdown, wait=False, cancel_futures=True)

    async def read(self, address: int, register: bytes, length: int) -> bytes:
        """Write `register` (the pointer or command bytes), repeated start, read `length` bytes."""

        def transfer(bus: SMBusLike) -> bytes:
            write, read = i2c_msg.write(address, register), i2c_msg.read(address, length)
            bus.i2c_rdwr(write, read)
            return bytes(read)

        return await self.transfer(address, transfer)

    async def write(self, address: int, data: bytes) -> None:
        """One write message: register pointer followed by the data bytes."""

        def transfer(bus: SMBusLike) -> None:
            bus.i2c_rdwr(i2c_msg.write(address, data))

        await self.transfer(address, transfer)

    async def transfer(self, address: int, work: Callable[[SMBusLike], _T]) -> _T:
        """Run `work(bus)` on the bus thread under the bus lock; OSError becomes a BusError naming the chip."""
        if self._lock is None or self._bus is None:
            raise BusError(f"I2C bus {self.name} is not open")
        bus = self._bus
        async with self._lock:
            return await self._run(lambda: work(bus), f"talk to 0x{address:02x}")

    async def _run(self, fn: Callable[[], _T], what: str) -> _T:
        if self._worker is None:
            raise BusError(f"I2C bus {self.name} is not open")
        future = asyncio.get_running_loop().run_in_executor(self._worker, fn)
        try:
            return await wait_for(future, self.timeout)
        except TimeoutError:
            raise BusTimeoutError(
                f"{self.name}: no answer within {self.timeout:.2f}s trying to {what}", errno.ETIMEDOUT
            ) from None
        except OSError as exc:
            code = exc.errno
            if code in _NACK_ERRNOS:
                raise NotAcknowledgedError(
                    f"{self.name}: not acknowledged trying to {what} ({errno.errorcode.get(code, code)})", code
                ) from exc
            if code == errno.ETIMEDOUT:
                raise BusTimeoutError(f"{self.name}: timed out trying to {what}", code) from exc
            raise BusError(f"{self.name}: failed to {what}: {exc.strerror or exc}", code) from exc
