"""The serial link to the dock controller MCU: request/reply with sequence numbers over pyserial-asyncio-fast.

pyserial-asyncio-fast already keeps pyserial's blocking calls off the loop: `serial_for_url()` (open, termios set-up,
the exclusive lock) runs in the loop's default executor, and so do the flush and close when the transport goes
away. Reads and writes happen on the loop through `add_reader`/`add_writer` on the port's non-blocking fd. So
`open()` awaits the library and needs no thread of its own.

One reader task owns the stream: it feeds `FrameDecoder` and routes each message. A reply goes to the request
waiting on its sequence number; an EVENT goes to the queue `events()` reads; anything else (a reply arriving after
its request gave up) is counted and dropped. Requests are serialised (the controller handles one at a time) and
each attempt gets a fresh sequence number; a late reply to an earlier attempt of the same request is accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator

import serial
import serial_asyncio_fast

from common.aio import wait_for
from drivers.base import DeviceMismatchError, DriverState, DriverStateError, LinkError, SerialMessage
from drivers.serial.frame import (
    DOCK_PRODUCT_ID,
    REPLY_KINDS,
    DockStatus,
    ErrorReply,
    FrameDecoder,
    Kind,
    LedState,
    Pong,
    encode_frame,
    kind_name,
)

# A frame of 262 bytes takes 23 ms at 115200 baud; a line quiet for longer than this mid-frame is not finishing it.
IDLE_RESYNC = 0.05
_READ_SIZE = 1024
# Unsolicited events nobody reads are kept up to this many; the oldest go first.
EVENT_BACKLOG = 256


class ControllerError(LinkError):
    """The dock controller answered with an ERROR frame."""

    def __init__(self, message: str, code: int, text: str) -> None:
        super().__init__(message)
        self.code = code
        self.text = text


class SerialDockLink:
    """SerialLink to the dock controller: framed requests, one retry, unsolicited EVENTs on a queue."""

    def __init__(
        self,
        url: str,
        baudrate: int = 115200,
        *,
        retries: int = 1,
        verify: bool = True,
        verify_timeout: float = 1.0,
        idle_resync: float = IDLE_RESYNC,
    ) -> None:
        self.url = url
        self.baudrate = baudrate
        self.retries = retries
        self.verify = verify
        self.verify_timeout = verify_timeout
        self.idle_resync = idle_resync
        self.decoder = FrameDecoder()
        self.stale_replies = 0
        self.timeouts = 0
        self.events_dropped = 0
        self.controller: Pong | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[SerialMessage]] = {}
        self._events: asyncio.Queue[SerialMessage | LinkError | None] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self._sequences: Iterator[int] = itertools.cycle(range(1, 256))  # 0 is never sent by the box
        self._state = DriverState.CLOSED

    @property
    def name(self) -> str:
        return f"serial:{self.url}"

    @property
    def state(self) -> DriverState:
        return self._state

    async def open(self) -> None:
        """Open the port (off the loop, in the library), start the reader, and PING the controller."""
        if self._state is DriverState.OPEN:
            return
        loop = asyncio.get_running_loop()
        try:
            reader, writer = await serial_asyncio_fast.open_serial_connection(
                loop=loop,
                url=self.url,
                baudrate=self.baudrate,
                bytesize=serial.EIGHTBITS,
                parity=serial.PARITY_NONE,
                stopbits=serial.STOPBITS_ONE,
                exclusive=True,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            self._state = DriverState.FAULTED
            raise LinkError(
                f"{self.name}: cannot open the dock controller's port at {self.baudrate} 8N1: {exc}"
            ) from exc
        self._reader, self._writer = reader, writer
        self.decoder = FrameDecoder()
        self._events = asyncio.Queue()
        self._reader_task = asyncio.create_task(self._read_loop(reader), name=f"{self.name} reader")
        self._state = DriverState.OPEN
        if not self.verify:
            return
        try:
            pong = await self.ping(timeout=self.verify_timeout)
        except BaseException:
            await self.close()
            self._state = DriverState.FAULTED
            raise
        if pong.product_id != DOCK_PRODUCT_ID:
            await self.close()
            self._state = DriverState.FAULTED
            raise DeviceMismatchError(
                f"{self.name}: answered PING as product 0x{pong.product_id:04x} firmware "
                f"{pong.firmware[0]}.{pong.firmware[1]}, expected a Thox dock controller "
                f"(0x{DOCK_PRODUCT_ID:04x})"
            )
        self.controller = pong

    async def close(self) -> None:
        """Stop the reader, fail waiting requests, end event iterators and close the port."""
        task, self._reader_task = self._reader_task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # waits without re-raising the task's own cancellation
        self._fail_pending(LinkError(f"{self.name}: link closed"))
        writer, self._writer = self._writer, None
        self._reader = None
        if writer is not None:
            # Abort, not close: every request drained its frame already, and close() would tcdrain() in an
            # executor thread that can hang for good on a port whose other end stopped reading.
            if not writer.transport.is_closing():  # after a hang-up the library is already closing it
                writer.transport.abort()
            with contextlib.suppress(OSError):  # the port may already be gone; it is closed either way
                await writer.wait_closed()
        self._queue_event(None)
        self._state = DriverState.CLOSED

    # ------------------------------------------------------------------ requests

    async def request(self, kind: int, payload: bytes = b"", timeout: float = 1.0) -> SerialMessage:
        """Send one request and return its reply; LinkError on no answer, ControllerError on an ERROR reply."""
        writer = self._require_open()
        async with self._lock:
            reply: asyncio.Future[SerialMessage] = asyncio.get_running_loop().create_future()
            sequences: list[int] = []
            try:
                for _ in range(1 + self.retries):
                    sequence = next(self._sequences)
                    frame = encode_frame(kind, sequence, payload)  # FrameError before anything is sent
                    sequences.append(sequence)
                    self._pending[sequence] = reply
                    try:
                        writer.write(frame)
                        await writer.drain()
                    except OSError as exc:  # ConnectionResetError once the transport has lost the port
                        raise LinkError(f"{self.name}: sending {kind_name(kind)} failed: {exc}") from exc
                    await asyncio.wait([reply], timeout=timeout)
                    if reply.done():
                        break
                    self.timeouts += 1
            finally:
                for sequence in sequences:
                    self._pending.pop(sequence, None)
            if not reply.done():
                reply.cancel()
                raise LinkError(
                    f"{self.name}: no answer to {kind_name(kind)} (sequence "
                    f"{', '.join(map(str, sequences))}) within {timeout:g}s per attempt"
                )
        message = reply.result()  # raises the reader's LinkError if the link broke meanwhile
        if message.kind == Kind.ERROR:
            error = ErrorReply.decode(message.payload)
            raise ControllerError(
                f"{self.name}: the dock controller rejected {kind_name(kind)}: {error.text} ({error.code_name})",
                error.code,
                error.text,
            )
        expected = REPLY_KINDS.get(kind)
        if expected is not None and message.kind != expected:
            raise LinkError(
                f"{self.name}: {kind_name(kind)} answered with {kind_name(message.kind)}, expected {expected.name}"
            )
        return message

    async def ping(self, nonce: bytes = b"thox", timeout: float = 1.0) -> Pong:
        """PING; the controller's identity, after checking it echoed the nonce."""
        pong = Pong.decode((await self.request(Kind.PING, nonce, timeout)).payload)
        if pong.nonce != nonce:
            raise LinkError(f"{self.name}: PONG echoed {pong.nonce!r}, sent {nonce!r}")
        return pong

    async def status(self, timeout: float = 1.0) -> DockStatus:
        """GET_STATUS: magnet, module presence, VBUS and LED as the controller sees them."""
        return DockStatus.decode((await self.request(Kind.GET_STATUS, b"", timeout)).payload)

    async def set_led(self, led: LedState, timeout: float = 1.0) -> LedState:
        """SET_LED; the state the controller applied."""
        return LedState.decode((await self.request(Kind.SET_LED, led.encode(), timeout)).payload)

    async def events(self) -> AsyncIterator[SerialMessage]:
        """Unsolicited frames (EVENT) in arrival order, until close(); LinkError if the link breaks."""
        while True:
            item = await self._events.get()
            if item is None or isinstance(item, LinkError):
                self._events.put_nowait(item)  # leave the end for any other iterator
                if item is None:
                    return
                raise item
            yield item

    # ------------------------------------------------------------------ the reader

    def _require_open(self) -> asyncio.StreamWriter:
        if self._state is not DriverState.OPEN or self._writer is None:
            raise DriverStateError(f"{self.name} is {self._state.value}; open() it first")
        return self._writer

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                if self.decoder.pending:
                    try:
                        data = await wait_for(reader.read(_READ_SIZE), self.idle_resync)
                    except (TimeoutError, asyncio.TimeoutError):
                        self._dispatch(self.decoder.resync())
                        continue
                else:
                    data = await reader.read(_READ_SIZE)
                if not data:
                    self._break(LinkError(f"{self.name}: the port closed (device unplugged?)"))
                    return
                self._dispatch(self.decoder.feed(data))
        except OSError as exc:  # serial.SerialException is an OSError
            self._break(LinkError(f"{self.name}: reading failed: {exc}"))

    def _dispatch(self, messages: list[SerialMessage]) -> None:
        for message in messages:
            if message.kind == Kind.EVENT:
                self._queue_event(message)
                continue
            waiter = self._pending.get(message.sequence)
            if waiter is None or waiter.done():
                self.stale_replies += 1
            else:
                waiter.set_result(message)

    def _break(self, error: LinkError) -> None:
        self._state = DriverState.FAULTED
        self._fail_pending(error)
        self._queue_event(error)

    def _queue_event(self, item: SerialMessage | LinkError | None) -> None:
        if self._events.qsize() >= EVENT_BACKLOG:
            self._events.get_nowait()
            self.events_dropped += 1
        self._events.put_nowait(item)

    def _fail_pending(self, error: LinkError) -> None:
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(error)
        self._pending.clear()
