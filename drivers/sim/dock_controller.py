"""A twin of the dock controller MCU on a pty: the real SerialDockLink talks to it through the kernel's tty layer.

`start()` opens a pseudo-terminal pair; `path` is the slave device (/dev/pts/N), which pyserial opens like any UART.
The controller side runs in its own thread on the master fd: it decodes frames with the same FrameDecoder, answers
PING, GET_STATUS (from the world's `status` callable; the LED part is the twin's own, as on the MCU) and SET_LED,
and replies ERROR to kinds it does not handle and to malformed payloads, exactly as docs/serial-protocol.md says.
Frames with a bad CRC get no reply (their sequence number cannot be trusted); the box's retry covers them.

Faults, each drawn per outgoing frame from a seeded generator at its rate: "garbage" writes random bytes before the
frame (line noise between frames), "drop" sends nothing (the controller stops answering), "corrupt" flips one bit
of the frame. The master fd is non-blocking, so a box that stops reading loses bytes instead of wedging the thread,
as a UART without flow control would.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import queue
import random
import select
import threading
import tty
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Literal

from drivers.base import SerialMessage
from drivers.serial.frame import (
    DOCK_PRODUCT_ID,
    MAX_NONCE,
    DockStatus,
    ErrorCode,
    ErrorReply,
    FrameDecoder,
    FrameError,
    Kind,
    LedState,
    Pong,
    encode_frame,
    kind_name,
)
from drivers.sim.world import SimWorld

SerialFaultKind = Literal["garbage", "drop", "corrupt"]
SERIAL_FAULT_KINDS: tuple[SerialFaultKind, ...] = ("garbage", "drop", "corrupt")


@dataclass(frozen=True)
class SerialFault:
    """Inject `kind` into a fraction `rate` of the frames the controller sends, at most `limit` times if set."""

    kind: SerialFaultKind
    rate: float = 1.0
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SERIAL_FAULT_KINDS:
            raise ValueError(f"unknown serial fault {self.kind!r}; expected one of {SERIAL_FAULT_KINDS}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"fault rate {self.rate} is outside 0..1")


def status_from_world(world: SimWorld, vbus_mv: int = 5000) -> Callable[[], DockStatus]:
    """A status source for the twin: magnet and module follow the world's stack; VBUS is `vbus_mv` while docked."""

    def status() -> DockStatus:
        docked = world.adjacent() is not None
        return DockStatus(magnet=docked, module_present=docked, vbus_mv=vbus_mv if docked else 0)

    return status


class DockControllerTwin:
    """The dock controller's firmware behaviour behind a pty, in its own thread."""

    def __init__(
        self,
        status: Callable[[], DockStatus],
        *,
        product_id: int = DOCK_PRODUCT_ID,
        firmware: tuple[int, int] = (1, 0),
        faults: Iterable[SerialFault] = (),
        seed: int = 0,
    ) -> None:
        self.product_id = product_id
        self.firmware = firmware
        self.led = LedState()
        self.decoder = FrameDecoder()
        self.requests: list[SerialMessage] = []  # every frame received intact, in order
        self.injected: list[SerialFaultKind] = []  # every fault applied, in order
        self._status = status
        self.set_faults(faults)
        self._rng = random.Random(seed)
        # ("event", status payload or None for the current status) or ("raw", bytes to put on the wire)
        self._outbox: queue.SimpleQueue[tuple[str, bytes | None]] = queue.SimpleQueue()
        self._event_sequences = itertools.cycle(range(256))
        self._master = self._slave = self._wake_r = self._wake_w = -1
        self._path = ""
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def path(self) -> str:
        """The slave device for SerialDockLink(url=path)."""
        if not self._path:
            raise RuntimeError("the dock controller twin is not started")
        return self._path

    def start(self) -> DockControllerTwin:
        """Open the pty pair and start answering."""
        if self._thread is not None:
            return self
        self._master, self._slave = os.openpty()
        # Raw from the start, so nothing the twin writes before pyserial configures the port is echoed or mangled;
        # the twin keeps the slave open so the master never reads EIO between a link's close and the next open.
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._path = os.ttyname(self._slave)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"dock-controller {self._path}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the thread and close the fds (blocks briefly: from a loop, use `aclose()`)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping = True
            self._wake()
            thread.join(timeout=5.0)
        for fd in (self._master, self._slave, self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = self._wake_r = self._wake_w = -1

    async def aclose(self) -> None:
        """stop() without blocking the loop."""
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> DockControllerTwin:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def set_faults(self, faults: Iterable[SerialFault]) -> None:
        """Replace the active faults (and their counts); safe from any thread."""
        active = tuple(faults)
        # One attribute, so the controller thread never pairs new rules with old counts.
        self._faults: tuple[tuple[SerialFault, ...], list[int]] = (active, [0] * len(active))

    def notify(self, status: DockStatus | None = None) -> None:
        """Send an unsolicited EVENT with `status` (the current status when None); safe from any thread."""
        self._outbox.put(("event", None if status is None else status.encode()))
        self._wake()

    def inject(self, data: bytes) -> None:
        """Put raw bytes on the wire (noise, a truncated frame) before anything sent later; safe from any thread."""
        self._outbox.put(("raw", bytes(data)))
        self._wake()

    # ------------------------------------------------------------------ the controller thread

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _run(self) -> None:
        while not self._stopping:
            ready, _, _ = select.select([self._master, self._wake_r], [], [])
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 256)
                self._send_events()
            if self._master in ready and not self._stopping:
                try:
                    data = os.read(self._master, 4096)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno == errno.EIO:
                        continue  # no slave open for a moment; cannot happen while we hold ours
                    raise
                for message in self.decoder.feed(data):
                    self.requests.append(message)
                    kind, payload = self._answer(message)
                    self._send(encode_frame(kind, message.sequence, payload))

    def _send_events(self) -> None:
        while True:
            try:
                what, data = self._outbox.get_nowait()
            except queue.Empty:
                return
            if what == "raw" and data is not None:
                with contextlib.suppress(BlockingIOError):
                    os.write(self._master, data)
                continue
            payload = self._status_payload() if data is None else data
            if isinstance(payload, bytes):  # a status that cannot be read is not announced
                self._send(encode_frame(Kind.EVENT, next(self._event_sequences), payload))

    def _status_payload(self) -> bytes | tuple[int, bytes]:
        try:
            return replace(self._status(), led=self.led).encode()
        except Exception as exc:  # the world's failure becomes the controller's INTERNAL error, as an ADC fault would
            return _error(ErrorCode.INTERNAL, f"status unavailable: {exc}")

    def _answer(self, message: SerialMessage) -> tuple[int, bytes]:
        kind, payload = message.kind, message.payload
        if kind == Kind.PING:
            if len(payload) > MAX_NONCE:
                return _error(ErrorCode.BAD_LENGTH, f"PING nonce is {len(payload)} bytes; at most {MAX_NONCE}")
            return Kind.PONG, Pong(self.product_id, self.firmware, payload).encode()
        if kind == Kind.GET_STATUS:
            if payload:
                return _error(ErrorCode.BAD_LENGTH, f"GET_STATUS takes no payload, got {len(payload)} bytes")
            status = self._status_payload()
            return (Kind.STATUS, status) if isinstance(status, bytes) else status
        if kind == Kind.SET_LED:
            try:
                self.led = LedState.decode(payload, Kind.SET_LED)
            except FrameError as exc:
                return _error(ErrorCode.BAD_LENGTH if len(payload) != 4 else ErrorCode.BAD_VALUE, str(exc))
            return Kind.LED, self.led.encode()
        return _error(ErrorCode.UNKNOWN_KIND, f"kind {kind_name(kind)} is not a request this controller handles")

    def _send(self, frame: bytes) -> None:
        out = bytearray()
        faults, counts = self._faults
        for index, fault in enumerate(faults):
            if fault.limit is not None and counts[index] >= fault.limit:
                continue
            if self._rng.random() >= fault.rate:
                continue
            counts[index] += 1
            self.injected.append(fault.kind)
            if fault.kind == "drop":
                return
            if fault.kind == "garbage":
                out += self._rng.randbytes(self._rng.randint(1, 24))
            elif fault.kind == "corrupt":
                corrupted = bytearray(frame)
                corrupted[self._rng.randrange(len(corrupted))] ^= 1 << self._rng.randrange(8)
                frame = bytes(corrupted)
        out += frame
        with contextlib.suppress(BlockingIOError):
            os.write(self._master, out)  # nobody reading: the bytes are lost, as on a UART


def _error(code: ErrorCode, text: str) -> tuple[int, bytes]:
    return Kind.ERROR, ErrorReply(code, text).encode()
