"""The engine host's wire protocol: framing byte for byte, one typed message per op, malformed frames refused."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from engines.base import Done, Failed, GenerationRequest, SamplingParams, TokenLogprob, Tokens
from engines.wire import (
    MAX_FRAME_BYTES,
    Cancel,
    Embed,
    Embeddings,
    Fatal,
    FrameError,
    Limit,
    Limited,
    Message,
    Progress,
    ProtocolError,
    Ready,
    Stats,
    decode_to_agent,
    decode_to_host,
    encode,
    read_payload,
)


def reader_of(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def payload_of(frame: bytes) -> bytes:
    return frame[4:]


def test_frame_bytes() -> None:
    assert encode(Cancel(7)) == b'\x00\x00\x00\x16{"op":"cancel","id":7}'
    assert payload_of(encode(Tokens(3, (5, 6)))) == b'{"op":"tokens","id":3,"ids":[5,6]}'
    assert (
        payload_of(encode(Failed(None, "bad_request", "x")))
        == b'{"op":"error","id":null,"code":"bad_request","message":"x"}'
    )


TO_HOST: list[Message] = [
    GenerationRequest(
        1,
        [1, 2, 3],
        SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, seed=42, presence_penalty=0.5, frequency_penalty=-0.5),
        frozenset({2, 0}),
        grammar='{"grammars":[{"json_schema":{"type":"object"}}]}',
    ),
    GenerationRequest(
        3,
        [4],
        SamplingParams(max_tokens=2, logit_bias=((5, -100.0), (9, 2.5))),
        frozenset(),
    ),
    GenerationRequest(2, [9], SamplingParams(max_tokens=1), frozenset()),
    GenerationRequest(6, [9], SamplingParams(max_tokens=1, logprobs=3), frozenset()),
    Cancel(4),
    Embed(5, [[101, 7, 102], [101, 102]]),
    Limit(3),
]
TO_AGENT: list[Message] = [
    Progress("convert", 3, 30),
    Ready({"flavour": "fused"}, None, 2048, 77),
    Ready({}, {"dimensions": 384}, 8, 1),
    Tokens(1, (4, 5)),
    Tokens(1, (4, 5), (TokenLogprob(-0.25, ((4, -0.25), (9, -1.5))), TokenLogprob(0.0))),
    Done(1, "stop", 3, 2),
    Stats({"live": 1}),
    Limited(2),
    Failed(1, "overloaded", "full"),
    Fatal("out of memory"),
]


@pytest.mark.parametrize("message", TO_HOST, ids=lambda m: type(m).__name__)
def test_messages_to_the_host_round_trip(message: Message) -> None:
    assert decode_to_host(payload_of(encode(message))) == message


@pytest.mark.parametrize("message", TO_AGENT, ids=lambda m: type(m).__name__)
def test_messages_to_the_agent_round_trip(message: Message) -> None:
    assert decode_to_agent(payload_of(encode(message))) == message


def test_embeddings_round_trip_as_little_endian_float32() -> None:
    vectors = np.arange(6, dtype=np.float32).reshape(2, 3) / np.float32(7)
    decoded = decode_to_agent(payload_of(encode(Embeddings(9, vectors, 11))))
    assert isinstance(decoded, Embeddings) and decoded.id == 9 and decoded.tokens == 11
    np.testing.assert_array_equal(decoded.vectors, vectors)


async def test_payloads_are_read_in_order_to_a_clean_end() -> None:
    reader = reader_of(encode(Tokens(1, (1, 2, 3))) + encode(Done(1, "stop", 3, 3)))
    assert [decode_to_agent(p) for p in [await read_payload(reader), await read_payload(reader)] if p] == [
        Tokens(1, (1, 2, 3)),
        Done(1, "stop", 3, 3),
    ]
    assert await read_payload(reader) is None


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"\x00\x00", "inside a frame header"), (b"\x00\x00\x00\x10{}", "inside a frame")],
)
async def test_broken_framing_is_a_protocol_error(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        await read_payload(reader_of(data))


async def test_an_oversized_frame_is_skipped_and_the_next_one_read() -> None:
    length = MAX_FRAME_BYTES + 1
    reader = reader_of(length.to_bytes(4, "big") + b"x" * length + encode(Cancel(1)))
    with pytest.raises(FrameError, match="exceeds"):
        await read_payload(reader)
    assert decode_to_host(await read_payload(reader) or b"") == Cancel(1)


@pytest.mark.parametrize(
    ("payload", "message", "request_id"),
    [
        (b"abc", "not JSON", None),
        (b"[]", "string 'op'", None),
        (b'{"op": 1}', "string 'op'", None),
        (b'{"op": "launch", "id": 3}', "unknown op 'launch'", 3),
        (b'{"op": "cancel"}', "'id' must be an integer", None),
        (b'{"op": "cancel", "id": "7"}', "'id' must be an integer", None),
        (b'{"op": "cancel", "id": true}', "'id' must be an integer", None),
        (b'{"op": "limit"}', "'max_batch' must be an integer >= 1", None),
        (b'{"op": "limit", "max_batch": 0}', "'max_batch' must be an integer >= 1", None),
        (b'{"op": "limit", "max_batch": 2.5}', "'max_batch' must be an integer >= 1", None),
        (b'{"op": "generate", "id": 5, "prompt": [1], "max_tokens": 0}', "'max_tokens'", 5),
        (b'{"op": "generate", "id": 5, "prompt": [1, -2], "max_tokens": 3}', "'prompt'", 5),
        (b'{"op": "generate", "id": 5, "prompt": "hi", "max_tokens": 3}', "'prompt'", 5),
        (b'{"op": "generate", "id": 5, "prompt": [1], "max_tokens": 3, "temperature": "hot"}', "'temperature'", 5),
        (b'{"op": "generate", "id": 5, "prompt": [1], "max_tokens": 3, "seed": 1.5}', "'seed'", 5),
        (b'{"op": "generate", "id": 5, "prompt": [1], "max_tokens": 3, "stop_ids": {}}', "'stop_ids'", 5),
        (b'{"op": "generate", "id": 5, "prompt": [1], "max_tokens": 3, "grammar": 7}', "'grammar'", 5),
        (b'{"op": "generate", "id": 5, "prompt": [1], "max_tokens": 3, "logit_bias": [[1]]}', "'logit_bias'", 5),
        (b'{"op": "generate", "id": 5, "prompt": [1], "max_tokens": 3, "logit_bias": {"1": 2}}', "'logit_bias'", 5),
        (b'{"op": "generate", "id": 5, "prompt": [1], "max_tokens": 3, "logprobs": 21}', "'logprobs'", 5),
        (b'{"op": "generate", "id": 5, "prompt": [1], "max_tokens": 3, "logprobs": -1}', "'logprobs'", 5),
        (b'{"op": "generate", "id": 5, "prompt": [1], "max_tokens": 3, "logprobs": true}', "'logprobs'", 5),
        (b'{"op": "embed", "id": 6, "inputs": []}', "'inputs'", 6),
        (b'{"op": "embed", "id": 6, "inputs": [[1], "x"]}', "'inputs'", 6),
    ],
)
def test_malformed_frames_to_the_host_name_the_field_and_the_request(
    payload: bytes, message: str, request_id: int | None
) -> None:
    with pytest.raises(FrameError, match=message) as caught:
        decode_to_host(payload)
    assert caught.value.request_id == request_id


def test_malformed_frames_to_the_agent_are_refused() -> None:
    with pytest.raises(FrameError, match="'ids'") as caught:
        decode_to_agent(b'{"op": "tokens", "id": 2, "ids": [1, null]}')
    assert caught.value.request_id == 2
    with pytest.raises(FrameError, match="'data'"):
        decode_to_agent(b'{"op": "embeddings", "id": 2, "shape": [1, 2], "data": "AAAA", "tokens": 1}')
    for logprobs in (b"[[-1.0, []]]", b"[[-1.0, []], [0.5, []]]", b'[[-1.0, [["4", -2.0]]], [-1, []]]', b"[[-1]]"):
        # one entry per token, each a logprob (<= 0) with [id, logprob] alternatives
        with pytest.raises(FrameError, match="'logprobs'"):
            decode_to_agent(b'{"op": "tokens", "id": 2, "ids": [1, 2], "logprobs": ' + logprobs + b"}")
    with pytest.raises(FrameError, match="unknown op 'generate'"):
        decode_to_agent(payload_of(encode(Cancel(1))).replace(b"cancel", b"generate"))


def test_oversized_frames_are_refused_when_sending() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode(Fatal("x" * MAX_FRAME_BYTES))
