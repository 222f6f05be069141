"""The dock controller protocol's frames and payloads: pure encode/decode, no I/O (docs/serial-protocol.md).

    0xA5 | ver<<6 | kind | sequence | length (u16 LE, <= 255) | payload | CRC-16/CCITT-FALSE (u16 LE)

The CRC covers every byte after the start byte up to the end of the payload. The decoder resynchronises by
dropping a single byte whenever a candidate frame fails (bad header or CRC) and searching for the next start byte,
so a good frame that follows garbage, or lies inside a corrupt frame's claimed length, is still found.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from drivers.base import LinkError, SerialMessage

SOF = 0xA5
VERSION = 1
HEADER_LENGTH = 5  # SOF, version/kind, sequence, length (2)
CRC_LENGTH = 2
MAX_PAYLOAD = 255
MAX_KIND = 0x3F
MAX_NONCE = 16
MAX_ERROR_TEXT = MAX_PAYLOAD - 1
DOCK_PRODUCT_ID = 0x7D0C  # what a Thox dock controller answers in PONG


class FrameError(LinkError):
    """A frame or payload cannot be encoded, or a payload does not decode as its kind requires."""


class Kind(enum.IntEnum):
    """Message kinds (6 bits). Requests go box -> controller; EVENT is the only unsolicited frame."""

    PING = 0x01
    PONG = 0x02
    GET_STATUS = 0x03
    STATUS = 0x04
    SET_LED = 0x05
    LED = 0x06
    EVENT = 0x10
    ERROR = 0x3F


# The reply kind each request expects (besides ERROR).
REPLY_KINDS: dict[int, Kind] = {Kind.PING: Kind.PONG, Kind.GET_STATUS: Kind.STATUS, Kind.SET_LED: Kind.LED}


class ErrorCode(enum.IntEnum):
    """Codes the controller puts in ERROR replies."""

    UNKNOWN_KIND = 0x01  # not a request kind this firmware handles
    BAD_LENGTH = 0x02  # payload length wrong for the kind
    BAD_VALUE = 0x03  # a field out of range (LED mode, reserved bits)
    BUSY = 0x04  # cannot act now (e.g. LED owned by the bootloader)
    INTERNAL = 0x05  # the controller's own failure (ADC timeout, ...)


class LedMode(enum.IntEnum):
    """What the dock's RGB LED does."""

    OFF = 0
    ON = 1
    BLINK = 2  # 1 Hz, 50 % duty
    PULSE = 3  # 2 s breathing


def kind_name(kind: int) -> str:
    """ "PING" for a known kind, "0x2a" otherwise (for messages)."""
    try:
        return Kind(kind).name
    except ValueError:
        return f"0x{kind:02x}"


# ----------------------------------------------------------------------------- CRC


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = (crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16_ccitt_false(data: bytes | bytearray | memoryview, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, not reflected, no final XOR ("123456789" -> 0x29B1)."""
    for byte in bytes(data):
        crc = ((crc << 8) & 0xFFFF) ^ _CRC_TABLE[(crc >> 8) ^ byte]
    return crc


# ----------------------------------------------------------------------------- frames


def encode_frame(kind: int, sequence: int, payload: bytes = b"") -> bytes:
    """The bytes on the wire for one message."""
    if not 0 <= kind <= MAX_KIND:
        raise FrameError(f"message kind {kind} does not fit in 6 bits (0..{MAX_KIND})")
    if not 0 <= sequence <= 0xFF:
        raise FrameError(f"sequence {sequence} does not fit in one byte")
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"{kind_name(kind)} payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    body = bytes((VERSION << 6 | kind, sequence)) + len(payload).to_bytes(2, "little") + payload
    return bytes((SOF,)) + body + crc16_ccitt_false(body).to_bytes(2, "little")


def encode_message(message: SerialMessage) -> bytes:
    """encode_frame for a SerialMessage."""
    return encode_frame(message.kind, message.sequence, message.payload)


@dataclass
class DecoderStats:
    """What the decoder has seen: good frames and each kind of damage."""

    frames: int = 0
    header_errors: int = 0  # a start byte followed by another version or a length over MAX_PAYLOAD
    crc_errors: int = 0
    abandoned: int = 0  # partial frames given up by resync() after the line went quiet
    discarded_bytes: int = 0  # bytes skipped while hunting for a start byte


class FrameDecoder:
    """Streaming decoder: feed any chunks, get whole messages; damage is counted and skipped."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.stats = DecoderStats()

    @property
    def pending(self) -> int:
        """Bytes held that do not yet form a frame (a partial frame at the head)."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[SerialMessage]:
        """Add received bytes; return every message completed by them, in order."""
        self._buffer += data
        return self._scan()

    def resync(self) -> list[SerialMessage]:
        """Give up on the partial frame at the head (the line went quiet mid-frame) and decode what follows."""
        if not self._buffer:
            return []
        self.stats.abandoned += 1
        self._skip(1)
        return self._scan()

    def _skip(self, count: int) -> None:
        del self._buffer[:count]
        self.stats.discarded_bytes += count

    def _scan(self) -> list[SerialMessage]:
        messages: list[SerialMessage] = []
        buffer = self._buffer
        while buffer:
            start = buffer.find(SOF)
            if start < 0:
                self._skip(len(buffer))
                break
            if start:
                self._skip(start)
            if len(buffer) < HEADER_LENGTH:
                break
            length = buffer[3] | buffer[4] << 8
            if buffer[1] >> 6 != VERSION or length > MAX_PAYLOAD:
                # Rejecting here, before the CRC, stops a stray 0xA5 from making us wait for up to 64 KiB.
                self.stats.header_errors += 1
                self._skip(1)
                continue
            end = HEADER_LENGTH + length + CRC_LENGTH
            if len(buffer) < end:
                break
            received = buffer[end - 2] | buffer[end - 1] << 8
            if crc16_ccitt_false(memoryview(buffer)[1 : end - 2]) != received:
                # Drop only the start byte: the real frame may begin inside what this one claimed.
                self.stats.crc_errors += 1
                self._skip(1)
                continue
            messages.append(
                SerialMessage(
                    kind=buffer[1] & MAX_KIND, sequence=buffer[2], payload=bytes(buffer[HEADER_LENGTH : end - 2])
                )
            )
            del buffer[:end]
            self.stats.frames += 1
        return messages


# ----------------------------------------------------------------------------- payloads


def _expect_length(kind: Kind, payload: bytes, length: int) -> None:
    if len(payload) != length:
        raise FrameError(f"{kind.name} payload must be {length} bytes, got {len(payload)}: {payload.hex(' ')}")


@dataclass(frozen=True)
class Pong:
    """PONG: who answered (product id, firmware version) and the PING's nonce echoed back."""

    product_id: int
    firmware: tuple[int, int]
    nonce: bytes = b""

    def encode(self) -> bytes:
        """product u16 LE, firmware major, minor, nonce."""
        if len(self.nonce) > MAX_NONCE:
            raise FrameError(f"PING nonce of {len(self.nonce)} bytes exceeds {MAX_NONCE}")
        if not 0 <= self.product_id <= 0xFFFF:
            raise FrameError(f"PONG product id {self.product_id} does not fit in 16 bits")
        if len(self.firmware) != 2 or not all(0 <= part <= 0xFF for part in self.firmware):
            raise FrameError(f"PONG firmware version {self.firmware} must be two bytes (major, minor)")
        return self.product_id.to_bytes(2, "little") + bytes(self.firmware) + self.nonce

    @classmethod
    def decode(cls, payload: bytes) -> Pong:
        """Parse a PONG payload."""
        if not 4 <= len(payload) <= 4 + MAX_NONCE:
            raise FrameError(f"PONG payload must be 4..{4 + MAX_NONCE} bytes, got {len(payload)}")
        return cls(int.from_bytes(payload[:2], "little"), (payload[2], payload[3]), bytes(payload[4:]))


@dataclass(frozen=True)
class LedState:
    """The dock LED: mode and colour (SET_LED payload, LED reply, and part of STATUS)."""

    mode: LedMode = LedMode.OFF
    red: int = 0
    green: int = 0
    blue: int = 0

    def encode(self) -> bytes:
        """mode, red, green, blue: one byte each."""
        for channel in (self.red, self.green, self.blue):
            if not 0 <= channel <= 0xFF:
                raise FrameError(f"LED colour channel {channel} is outside 0..255")
        return bytes((self.mode, self.red, self.green, self.blue))

    @classmethod
    def decode(cls, payload: bytes, kind: Kind = Kind.LED) -> LedState:
        """Parse 4 bytes; FrameError(BAD_VALUE) on an unknown mode."""
        _expect_length(kind, payload, 4)
        try:
            mode = LedMode(payload[0])
        except ValueError:
            raise FrameError(f"LED mode {payload[0]} is not one of {[m.value for m in LedMode]}") from None
        return cls(mode, payload[1], payload[2], payload[3])


_MAGNET = 0x01
_MODULE = 0x02
STATUS_LENGTH = 7


@dataclass(frozen=True)
class DockStatus:
    """STATUS/EVENT: the dock's magnet switch, module detect pin, VBUS (its ADC, mV) and LED."""

    magnet: bool
    module_present: bool
    vbus_mv: int
    led: LedState = LedState()

    def encode(self) -> bytes:
        """flags (bit0 magnet, bit1 module), VBUS mV u16 LE, LED (4 bytes)."""
        if not 0 <= self.vbus_mv <= 0xFFFF:
            raise FrameError(f"VBUS {self.vbus_mv} mV does not fit in 16 bits")
        flags = (_MAGNET if self.magnet else 0) | (_MODULE if self.module_present else 0)
        return bytes((flags,)) + self.vbus_mv.to_bytes(2, "little") + self.led.encode()

    @classmethod
    def decode(cls, payload: bytes, kind: Kind = Kind.STATUS) -> DockStatus:
        """Parse 7 bytes; reserved flag bits must be zero."""
        _expect_length(kind, payload, STATUS_LENGTH)
        flags = payload[0]
        if flags & ~(_MAGNET | _MODULE):
            raise FrameError(f"{kind.name} flags 0x{flags:02x} set reserved bits")
        return cls(
            bool(flags & _MAGNET),
            bool(flags & _MODULE),
            int.from_bytes(payload[1:3], "little"),
            LedState.decode(payload[3:], kind),
        )


@dataclass(frozen=True)
class ErrorReply:
    """ERROR: a code and a short UTF-8 explanation from the controller."""

    code: int
    text: str

    def encode(self) -> bytes:
        """code, then the text (truncated to fit, on a character boundary)."""
        text = self.text.encode()[:MAX_ERROR_TEXT].decode(errors="ignore").encode()
        return bytes((self.code & 0xFF,)) + text

    @classmethod
    def decode(cls, payload: bytes) -> ErrorReply:
        """Parse code + text; undecodable text is kept with replacement characters."""
        if not payload:
            raise FrameError("ERROR payload is empty; expected a code byte")
        return cls(payload[0], payload[1:].decode(errors="replace"))

    @property
    def code_name(self) -> str:
        """ "BAD_VALUE" for a known code, "0x2a" otherwise."""
        try:
            return ErrorCode(self.code).name
        except ValueError:
            return f"0x{self.code:02x}"
