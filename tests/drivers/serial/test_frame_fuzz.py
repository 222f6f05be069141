"""Fuzzing the dock frame codec: any byte stream, cut anywhere, gives good frames only and a bounded buffer."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from drivers.base import SerialMessage
from drivers.serial.frame import (
    CRC_LENGTH,
    HEADER_LENGTH,
    MAX_KIND,
    MAX_NONCE,
    MAX_PAYLOAD,
    SOF,
    DockStatus,
    ErrorReply,
    FrameDecoder,
    FrameError,
    Kind,
    LedMode,
    LedState,
    Pong,
    encode_frame,
    encode_message,
)

LONGEST_FRAME = HEADER_LENGTH + MAX_PAYLOAD + CRC_LENGTH

_messages = st.builds(
    SerialMessage, kind=st.integers(0, MAX_KIND), sequence=st.integers(0, 0xFF), payload=st.binary(max_size=MAX_PAYLOAD)
)
# Garbage rich in start bytes and plausible version bytes, the worst case for a resynchronising decoder.
_garbage = st.lists(
    st.one_of(st.integers(0, 255), st.sampled_from([SOF, 0x41, 0x44, 0x7F, 0x00, 0xFF])), max_size=40
).map(bytes)


def _feed(decoder: FrameDecoder, stream: bytes, cuts: list[int]) -> list[SerialMessage]:
    """Feed `stream` cut at `cuts`, then let the line go quiet until nothing is pending."""
    out: list[SerialMessage] = []
    start = 0
    for cut in sorted({c % (len(stream) + 1) for c in cuts}) + [len(stream)]:
        out += decoder.feed(memoryview(stream)[start:cut])
        assert decoder.pending < LONGEST_FRAME  # never more than one partial frame is held
        start = cut
    while decoder.pending:
        out += decoder.resync()
    return out


@given(st.binary(max_size=1024), st.lists(st.integers(0, 2048), max_size=8))
@example(bytes([SOF, 0x41, 0x01, 0xFF, 0x00]) * 60, [])  # stray headers claiming 255-byte payloads
@example(bytes([SOF]) * 300, [1, 2, 3])
def test_any_stream_decodes_to_frames_present_in_it(stream: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder()
    out = _feed(decoder, stream, cuts)
    frame_bytes = 0
    for message in out:
        frame = encode_message(message)  # a delivered frame re-encodes to bytes that were on the wire
        assert frame in stream
        frame_bytes += len(frame)
    stats = decoder.stats
    assert stats.frames == len(out)
    # Every byte fed is accounted for: skipped, part of a delivered frame, or (never, after resync) pending.
    assert stats.discarded_bytes + frame_bytes == len(stream)


@given(st.binary(max_size=600), st.lists(st.integers(0, 1200), max_size=8))
def test_chunking_never_changes_the_result(stream: bytes, cuts: list[int]) -> None:
    whole, pieces = FrameDecoder(), FrameDecoder()
    assert _feed(pieces, stream, cuts) == _feed(whole, stream, [])
    assert pieces.stats == whole.stats


@given(st.lists(st.tuples(_garbage, _messages), max_size=5), _garbage, st.lists(st.integers(0, 2000), max_size=6))
def test_good_frames_survive_garbage_between_them(
    parts: list[tuple[bytes, SerialMessage]], tail: bytes, cuts: list[int]
) -> None:
    stream = b"".join(junk + encode_message(m) for junk, m in parts) + tail
    out = iter(_feed(FrameDecoder(), stream, cuts))
    # Good frames come out in order; garbage that happens to contain a valid frame may add messages between.
    assert all(any(got == m for got in out) for _, m in parts)


# --- payloads ------------------------------------------------------------------------------------------------


@given(st.binary(max_size=2 * MAX_NONCE), st.sampled_from(list(Kind)))
def test_any_payload_decodes_or_is_a_frame_error(payload: bytes, kind: Kind) -> None:
    for decode in (
        Pong.decode,
        ErrorReply.decode,
        lambda p: LedState.decode(p, kind),
        lambda p: DockStatus.decode(p, kind),
    ):
        try:
            value = decode(payload)
        except FrameError:
            continue
        if not isinstance(value, ErrorReply):  # error text is decoded leniently, so it need not round-trip
            assert value.encode() == payload


@given(
    st.builds(
        Pong,
        product_id=st.integers(-1, 0x10000),
        firmware=st.tuples(st.integers(-1, 256), st.integers(-1, 256)),
        nonce=st.binary(max_size=MAX_NONCE + 2),
    ),
    st.builds(
        LedState,
        mode=st.sampled_from(list(LedMode)),
        red=st.integers(-1, 256),
        green=st.integers(0, 255),
        blue=st.integers(0, 255),
    ),
    st.builds(ErrorReply, code=st.integers(0, 255), text=st.text(max_size=300)),
)
def test_payloads_round_trip_or_are_refused_when_encoding(pong: Pong, led: LedState, error: ErrorReply) -> None:
    for value, decode in (
        (pong, Pong.decode),
        (led, LedState.decode),
        (DockStatus(True, False, 5000, led), DockStatus.decode),
    ):
        try:
            payload = value.encode()
        except FrameError:
            continue
        assert decode(payload) == value
        assert FrameDecoder().feed(encode_frame(Kind.STATUS, 1, payload)) == [SerialMessage(Kind.STATUS, 1, payload)]
    decoded = ErrorReply.decode(error.encode())
    assert decoded.code == error.code and error.text.startswith(decoded.text)


# --- regressions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pong", "match"),
    [
        # Pong(0x10000, (1, 2)).encode() raised OverflowError and Pong(1, (256, 0)).encode() ValueError, where every
        # other payload raises FrameError for a field that does not fit.
        (Pong(0x10000, (1, 2)), "PONG product id 65536 does not fit in 16 bits"),
        (Pong(-1, (1, 2)), "PONG product id -1 does not fit in 16 bits"),
        (Pong(1, (256, 0)), r"PONG firmware version \(256, 0\) must be two bytes"),
        # A three-part version on purpose (the field is typed as two ints).
        (Pong(1, (1, 2, 3)), r"PONG firmware version \(1, 2, 3\) must be two bytes"),  # type: ignore[arg-type]
    ],
)
def test_pong_fields_out_of_range_are_frame_errors(pong: Pong, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        pong.encode()
