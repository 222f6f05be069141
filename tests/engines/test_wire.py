"""The engine host's framing, byte for byte."""

from __future__ import annotations

import asyncio

import pytest

from engines.wire import MAX_FRAME_BYTES, ProtocolError, encode_frame, read_frame


def reader_of(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def test_frame_bytes() -> None:
    assert encode_frame({"op": "cancel", "id": 7}) == b'\x00\x00\x00\x16{"op":"cancel","id":7}'


async def test_frames_round_trip_and_clean_eof() -> None:
    frames = [{"op": "tokens", "id": 1, "ids": [1, 2, 3]}, {"op": "done", "id": 1, "finish_reason": "stop"}]
    reader = reader_of(b"".join(encode_frame(f) for f in frames))
    assert [await read_frame(reader), await read_frame(reader)] == frames
    assert await read_frame(reader) is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x00", "inside a frame header"),
        (b"\x00\x00\x00\x10{}", "inside a frame"),
        ((MAX_FRAME_BYTES + 1).to_bytes(4, "big"), "exceeds"),
        (b"\x00\x00\x00\x03abc", "not JSON"),
        (b"\x00\x00\x00\x02[]", "string 'op'"),
        (b'\x00\x00\x00\x0a{"op": 1} ', "string 'op'"),
    ],
)
async def test_malformed_frames_are_protocol_errors(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        await read_frame(reader_of(data))


def test_oversized_frames_are_refused_when_sending() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_frame({"op": "generate", "prompt": "x" * MAX_FRAME_BYTES})
