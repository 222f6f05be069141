"""The wire side of chips with 16-bit registers behind a pointer register, MSB first (TMP117, INA226).

The first byte of every write sets the pointer; two more bytes (MSB first) write the register it points at.
A read returns the register the pointer selects, MSB first (longer reads are padded by the bus, not modelled).
A chip model adds what its registers do: what a write changes, what a read clears, and its conversions.
"""

from __future__ import annotations

import abc
import threading


def word_bytes(value: int, length: int) -> bytes:
    """A 16-bit register as a read of `length` bytes returns it: MSB first, cut short for a shorter read."""
    return value.to_bytes(2, "big")[:length]


class Register16Model(abc.ABC):
    """A register file behind a pointer register, with every write message kept for wire-level assertions."""

    registers: dict[int, int]  # register -> its 16-bit value; a model fills it (and refills it on reset)

    def __init__(self, pointer: int) -> None:
        self._lock = threading.Lock()
        self.pointer = pointer
        self.writes: list[bytes] = []  # every write message, for wire-level assertions in tests

    def on_write(self, data: bytes) -> None:
        """Pointer byte, optionally followed by a 16-bit MSB-first register value."""
        with self._lock:
            self.writes.append(bytes(data))
            if not data:
                return
            self.pointer = data[0]
            if len(data) >= 3:
                self._write_register(data[0], data[1] << 8 | data[2])

    def on_read(self, length: int) -> bytes:
        """The pointed-at register, MSB first, as it reads after the conversions completed by now."""
        with self._lock:
            self._convert()
            value = self.registers.get(self.pointer, 0x0000)
            self._after_read(self.pointer, value)
            return word_bytes(value, length)

    @abc.abstractmethod
    def implausible(self, length: int) -> bytes:
        """What the chip returns when its reading is garbage."""

    @abc.abstractmethod
    def _write_register(self, register: int, value: int) -> None:
        """Apply a host write of `value` to `register` (read-only bits and registers ignore it)."""

    @abc.abstractmethod
    def _convert(self) -> None:
        """Bring the result registers up to date with the conversions completed since the model last looked."""

    @abc.abstractmethod
    def _after_read(self, register: int, value: int) -> None:
        """What reading `register` (which read `value`) clears, such as a data-ready flag."""
