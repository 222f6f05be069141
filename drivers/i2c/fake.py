"""A userspace I2C bus for CI: smbus2's method surface in front of chip models that answer with wire bytes.

CI kernels have no i2c-stub (research/hardware.md), so simulated chips live here, in the style of Zephyr's bus
emulators: a chip model registers at an address and sees each message of a transfer as bytes. Chip models speak
the wire's byte order (MSB-first registers), so a driver that forgets to swap bytes fails against them just as it
would against silicon. A missing address raises OSError(EREMOTEIO), as Tegra's driver does on a NACK.

Faults are injected per transfer at a configurable rate: bus-level NACK (EREMOTEIO), ENXIO and timeout, and
reading-level "stuck" (the previous answer to the same request again) and "implausible" (the chip's own
power-on/garbage value).
"""

from __future__ import annotations

import errno
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from smbus2 import i2c_msg
from smbus2.smbus2 import I2C_M_RD

FaultKind = Literal["nack", "enxio", "timeout", "stuck", "implausible"]
FAULT_KINDS: tuple[FaultKind, ...] = ("nack", "enxio", "timeout", "stuck", "implausible")


class I2cTarget(Protocol):
    """A chip model: receives each message of a transfer addressed to it."""

    def on_write(self, data: bytes) -> None: ...

    def on_read(self, length: int) -> bytes: ...

    def implausible(self, length: int) -> bytes: ...  # what the chip returns when its reading is garbage


@dataclass
class FaultRule:
    """Inject `kind` into a fraction `rate` of transfers (to `address`, or to every address when None)."""

    kind: FaultKind
    rate: float
    address: int | None = None


@dataclass
class FaultInjector:
    """Draws faults from a seeded generator and records every draw, so tests can count what was injected."""

    seed: int = 0
    rules: list[FaultRule] = field(default_factory=list)
    # A timed-out transfer holds the bus this long (longer than the transport's timeout).
    timeout_seconds: float = 0.6
    history: list[tuple[int, FaultKind | None]] = field(default_factory=list)
    _rng: random.Random = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def set_rules(self, rules: Iterable[FaultRule]) -> None:
        """Replace the active rules."""
        with self._lock:
            self.rules = list(rules)

    def draw(self, address: int) -> FaultKind | None:
        """The fault for one transfer to `address`, if any (at most one per transfer)."""
        with self._lock:
            kind: FaultKind | None = None
            for rule in self.rules:
                if rule.address in (None, address) and self._rng.random() < rule.rate:
                    kind = rule.kind
                    break
            self.history.append((address, kind))
            if len(self.history) > 100_000:
                del self.history[:50_000]
            return kind


class FakeSMBus:
    """smbus2.SMBus's surface over registered chip models; thread-safe like a kernel adapter."""

    def __init__(self, faults: FaultInjector | None = None) -> None:
        self.faults = faults or FaultInjector()
        self.targets: dict[int, I2cTarget] = {}
        self.closed = False
        self._lock = threading.Lock()
        self._last_answer: dict[tuple[int, bytes, int], bytes] = {}

    def attach(self, address: int, target: I2cTarget) -> None:
        """Put a chip on the bus."""
        with self._lock:
            self.targets[address] = target

    def detach(self, address: int) -> None:
        """Take a chip off the bus: it stops acknowledging."""
        with self._lock:
            self.targets.pop(address, None)

    # ------------------------------------------------------------------ the I2C_RDWR ioctl

    def i2c_rdwr(self, *messages: Any) -> None:
        """Run one combined transfer; read messages are filled in place like the kernel does."""
        if self.closed:
            raise OSError(errno.EBADF, "bus closed")
        if not messages:
            return
        address = int(messages[0].addr)
        fault = self.faults.draw(address)
        if fault == "nack":
            raise OSError(errno.EREMOTEIO, "Remote I/O error")
        if fault == "enxio":
            raise OSError(errno.ENXIO, "No such device or address")
        if fault == "timeout":
            time.sleep(self.faults.timeout_seconds)
            raise OSError(errno.ETIMEDOUT, "Connection timed out")
        with self._lock:
            request = b""
            for message in messages:
                target = self.targets.get(int(message.addr))
                if target is None:
                    raise OSError(errno.EREMOTEIO, "Remote I/O error")
                if message.flags & I2C_M_RD:
                    length = int(message.len)
                    key = (int(message.addr), request, length)
                    if fault == "stuck" and key in self._last_answer:
                        answer = self._last_answer[key]
                    elif fault == "implausible":
                        answer = target.implausible(length)
                    else:
                        answer = target.on_read(length)
                    answer = answer[:length].ljust(length, b"\xff")
                    self._last_answer[key] = answer
                    _fill(message, answer)
                else:
                    request = bytes(message)
                    target.on_write(request)

    # ------------------------------------------------------------------ SMBus commands, as the kernel emulates them

    def read_i2c_block_data(self, address: int, register: int, length: int, force: bool | None = None) -> list[int]:
        """Pointer write then read, as bytes on the wire."""
        read = i2c_msg.read(address, length)
        self.i2c_rdwr(i2c_msg.write(address, [register]), read)
        return list(bytes(read))

    def write_i2c_block_data(self, address: int, register: int, data: list[int], force: bool | None = None) -> None:
        """Pointer then data bytes in one write."""
        self.i2c_rdwr(i2c_msg.write(address, [register, *data]))

    def read_byte_data(self, address: int, register: int, force: bool | None = None) -> int:
        """One register byte."""
        return self.read_i2c_block_data(address, register, 1)[0]

    def write_byte_data(self, address: int, register: int, value: int, force: bool | None = None) -> None:
        """One register byte."""
        self.write_i2c_block_data(address, register, [value])

    def read_word_data(self, address: int, register: int, force: bool | None = None) -> int:
        """SMBus word: the first byte on the wire is the LOW byte (the trap MSB-first chips set)."""
        low, high = self.read_i2c_block_data(address, register, 2)
        return low | high << 8

    def write_word_data(self, address: int, register: int, value: int, force: bool | None = None) -> None:
        """SMBus word: low byte first on the wire."""
        self.write_i2c_block_data(address, register, [value & 0xFF, value >> 8])

    def close(self) -> None:
        """Like SMBus.close()."""
        self.closed = True


def _fill(message: Any, data: bytes) -> None:
    import ctypes

    ctypes.memmove(message.buf, data, len(data))
