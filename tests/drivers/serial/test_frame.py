"""The dock controller frame codec: exact bytes on the wire, payload layouts, and the decoder's resynchronisation."""

from __future__ import annotations

import binascii

import pytest

from drivers.base import LinkError, SerialMessage
from drivers.serial.frame import (
    DOCK_PRODUCT_ID,
    DockStatus,
    ErrorCode,
    ErrorReply,
    FrameDecoder,
    FrameError,
    Kind,
    LedMode,
    LedState,
    Pong,
    crc16_ccitt_false,
    encode_frame,
    encode_message,
    kind_name,
)


def wire(text: str) -> bytes:
    return bytes.fromhex(text)


# ----------------------------------------------------------------------------- CRC


def test_crc_check_value() -> None:
    assert crc16_ccitt_false(b"123456789") == 0x29B1


@pytest.mark.parametrize("data", [b"", b"\x00", b"\xff\xff", bytes(range(256)), b"thox dock controller"])
def test_crc_agrees_with_an_independent_implementation(data: bytes) -> None:
    # binascii.crc_hqx is CRC-16 with polynomial 0x1021, unreflected; seeded 0xFFFF it is CCITT-FALSE.
    assert crc16_ccitt_false(data) == binascii.crc_hqx(data, 0xFFFF)


# ----------------------------------------------------------------------------- encoding

ENCODED = [
    ("PING, no payload", Kind.PING, 1, b"", "a5 41 01 00 00 d8 ab"),
    ("PING with nonce", Kind.PING, 1, b"thox", "a5 41 01 04 00 74 68 6f 78 38 60"),
    ("GET_STATUS", Kind.GET_STATUS, 0x7F, b"", "a5 43 7f 00 00 b9 85"),
    (
        "SET_LED blink",
        Kind.SET_LED,
        0xFF,
        LedState(LedMode.BLINK, 0x10, 0x20, 0x30).encode(),
        "a5 45 ff 04 00 02 10 20 30 3e b2",
    ),
    (
        "STATUS 20 V, red LED",
        Kind.STATUS,
        2,
        DockStatus(True, False, 20000, LedState(LedMode.ON, 255, 0, 0)).encode(),
        "a5 44 02 07 00 01 20 4e 01 ff 00 00 c2 44",
    ),
    ("ERROR", Kind.ERROR, 3, ErrorReply(ErrorCode.UNKNOWN_KIND, "no").encode(), "a5 7f 03 03 00 01 6e 6f 28 5d"),
    (
        "EVENT, everything off",
        Kind.EVENT,
        0,
        DockStatus(False, False, 0).encode(),
        "a5 50 00 07 00 00 00 00 00 00 00 00 4c 74",
    ),
]


@pytest.mark.parametrize(
    ("kind", "sequence", "payload", "expected"), [row[1:] for row in ENCODED], ids=[row[0] for row in ENCODED]
)
def test_encoded_bytes(kind: int, sequence: int, payload: bytes, expected: str) -> None:
    frame = encode_frame(kind, sequence, payload)
    assert frame == wire(expected)
    # Layout: SOF, version 1 in the top bits, little-endian length, little-endian CRC over all after SOF.
    assert frame[1] >> 6 == 1 and frame[1] & 0x3F == kind and frame[2] == sequence
    assert int.from_bytes(frame[3:5], "little") == len(payload)
    assert int.from_bytes(frame[-2:], "little") == binascii.crc_hqx(frame[1:-2], 0xFFFF)


def test_largest_frame() -> None:
    frame = encode_message(SerialMessage(Kind.PING, 9, bytes(255)))
    assert len(frame) == 262 and frame[:5] == wire("a5 41 09 ff 00")


@pytest.mark.parametrize(
    ("kind", "sequence", "payload", "message"),
    [
        (0x40, 1, b"", "6 bits"),
        (Kind.PING, 256, b"", "one byte"),
        (Kind.PING, -1, b"", "one byte"),
        (Kind.PING, 1, bytes(256), "exceeds 255"),
    ],
)
def test_unencodable_frames(kind: int, sequence: int, payload: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        encode_frame(kind, sequence, payload)


# ----------------------------------------------------------------------------- payloads


def test_status_payload_layout() -> None:
    status = DockStatus(magnet=True, module_present=True, vbus_mv=5012, led=LedState(LedMode.PULSE, 1, 2, 3))
    assert status.encode() == wire("03 94 13 03 01 02 03")
    assert DockStatus.decode(wire("03 94 13 03 01 02 03")) == status
    assert DockStatus.decode(wire("02 00 00 00 00 00 00")) == DockStatus(False, True, 0)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("03 94 13 00 00 00", "must be 7 bytes"),
        ("04 94 13 00 00 00 00", "reserved bits"),
        ("01 94 13 07 00 00 00", "LED mode 7"),
    ],
)
def test_bad_status_payloads(payload: str, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        DockStatus.decode(wire(payload))


def test_pong_payload_layout() -> None:
    pong = Pong(DOCK_PRODUCT_ID, (1, 2), b"abc")
    assert pong.encode() == wire("0c 7d 01 02 61 62 63")
    assert Pong.decode(pong.encode()) == pong
    with pytest.raises(FrameError, match="4..20 bytes"):
        Pong.decode(wire("0c 7d 01"))


def test_led_payload_layout() -> None:
    assert LedState(LedMode.ON, 0xAA, 0xBB, 0xCC).encode() == wire("01 aa bb cc")
    with pytest.raises(FrameError, match="outside 0..255"):
        LedState(LedMode.ON, 256).encode()
    with pytest.raises(FrameError, match="SET_LED payload must be 4 bytes"):
        LedState.decode(wire("01 00 00"), Kind.SET_LED)


def test_error_payload_layout_and_truncation() -> None:
    assert ErrorReply(ErrorCode.BAD_VALUE, "bad").encode() == wire("03 62 61 64")
    assert ErrorReply.decode(wire("03 62 61 64")) == ErrorReply(3, "bad")
    assert ErrorReply(3, "bad").code_name == "BAD_VALUE" and ErrorReply(0x42, "").code_name == "0x42"
    # 200 two-byte characters do not fit in 254 bytes: cut on a character boundary, never mid-character.
    long = ErrorReply(ErrorCode.INTERNAL, "é" * 200).encode()
    assert len(long) == 1 + 254 and long[1:].decode() == "é" * 127
    with pytest.raises(FrameError, match="empty"):
        ErrorReply.decode(b"")


def test_kind_names() -> None:
    assert (kind_name(Kind.GET_STATUS), kind_name(0x2A)) == ("GET_STATUS", "0x2a")


def test_frame_errors_are_link_errors() -> None:
    assert issubclass(FrameError, LinkError)


# ----------------------------------------------------------------------------- decoding

PING = encode_frame(Kind.PING, 1, b"thox")
STATUS = encode_frame(Kind.GET_STATUS, 2)
LED = encode_frame(Kind.SET_LED, 3, wire("01 01 02 03"))
M_PING = SerialMessage(Kind.PING, 1, b"thox")
M_STATUS = SerialMessage(Kind.GET_STATUS, 2, b"")
M_LED = SerialMessage(Kind.SET_LED, 3, wire("01 01 02 03"))


def corrupt(frame: bytes, index: int) -> bytes:
    damaged = bytearray(frame)
    damaged[index] ^= 0x04
    return bytes(damaged)


def test_decodes_one_frame_in_one_chunk() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(PING) == [M_PING]
    assert (decoder.pending, decoder.stats.frames) == (0, 1)


def test_decodes_byte_by_byte() -> None:
    decoder = FrameDecoder()
    out: list[SerialMessage] = []
    for byte in PING + STATUS:
        out += decoder.feed(bytes((byte,)))
    assert out == [M_PING, M_STATUS]


def test_decodes_several_frames_in_one_chunk() -> None:
    assert FrameDecoder().feed(PING + STATUS + LED) == [M_PING, M_STATUS, M_LED]


RESYNC = [
    ("garbage before", wire("00 11 22 33") + PING, [M_PING], dict(discarded_bytes=4)),
    # Each stray 0xA5 is rejected by its header (version bits 0b10), before any CRC: no waiting for a payload.
    (
        "garbage with start bytes before",
        wire("a5 a5 13 a5") + PING,
        [M_PING],
        dict(header_errors=3, crc_errors=0, frames=1, discarded_bytes=4),
    ),
    ("bad CRC, then a good frame", corrupt(PING, -1) + STATUS, [M_STATUS], dict(crc_errors=1)),
    ("bad payload byte between good frames", PING + corrupt(STATUS, 2) + LED, [M_PING, M_LED], dict(crc_errors=1)),
    ("wrong version byte", PING[:1] + bytes((PING[1] ^ 0xC0,)) + PING[2:] + STATUS, [M_STATUS], dict(header_errors=1)),
    ("length over 255", wire("a5 41 01 00 01") + STATUS, [M_STATUS], dict(header_errors=1)),
    (
        "good frame inside a damaged frame's claimed length",
        wire("a5 41 07 0a 00") + STATUS + wire("00 00 00 00 00") + LED,
        [M_STATUS, M_LED],
        dict(crc_errors=1),
    ),
    (
        "frame of another version with a valid CRC",
        b"\xa5\x81\x01\x00\x00" + binascii.crc_hqx(b"\x81\x01\x00\x00", 0xFFFF).to_bytes(2, "little") + LED,
        [M_LED],
        dict(header_errors=1),
    ),
]


@pytest.mark.parametrize(("stream", "expected", "stats"), [row[1:] for row in RESYNC], ids=[row[0] for row in RESYNC])
def test_resynchronises_without_losing_the_following_frame(
    stream: bytes, expected: list[SerialMessage], stats: dict[str, int]
) -> None:
    for chunk in (len(stream), 1, 3):  # whole, byte by byte, in odd pieces
        decoder = FrameDecoder()
        out: list[SerialMessage] = []
        for start in range(0, len(stream), chunk):
            out += decoder.feed(stream[start : start + chunk])
        assert out == expected
        assert decoder.pending == 0
        for name, value in stats.items():
            assert getattr(decoder.stats, name) == value, name


def test_resync_gives_up_on_a_frame_that_never_completes() -> None:
    decoder = FrameDecoder()
    # A header claiming 32 bytes, then a whole good frame: the decoder cannot know yet that it is not payload.
    assert decoder.feed(wire("a5 41 07 20 00") + STATUS) == []
    assert decoder.pending == 5 + len(STATUS)
    assert decoder.resync() == [M_STATUS]
    assert (decoder.pending, decoder.stats.abandoned, decoder.stats.discarded_bytes) == (0, 1, 5)
    assert decoder.resync() == [] and decoder.stats.abandoned == 1


def test_every_single_bit_flip_is_detected() -> None:
    frame = encode_frame(Kind.STATUS, 5, DockStatus(True, True, 5000).encode())
    for index in range(len(frame)):
        for bit in range(8):
            damaged = bytearray(frame)
            damaged[index] ^= 1 << bit
            decoder = FrameDecoder()
            out = decoder.feed(bytes(damaged)) + decoder.resync() + decoder.feed(STATUS)
            assert out == [M_STATUS], (index, bit)
