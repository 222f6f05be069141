"""The engine host process itself (`python -m engines.host`), driven over its socket like the agent drives it."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engines.base import Done, Failed, GenerationRequest, SamplingParams, Tokens
from engines.wire import Cancel, Limit, Limited, Progress, Ready, Stats, ToAgent, decode_to_agent, encode, read_payload
from tests import bundled
from tests.agent_process import TEST_MODEL_CACHE
from tests.waiting import until

HEADER = 4


class HostConnection:
    def __init__(
        self, process: asyncio.subprocess.Process, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.process, self.reader, self.writer = process, reader, writer

    async def next(self) -> ToAgent:
        while True:
            payload = await asyncio.wait_for(read_payload(self.reader), 120)
            assert payload is not None, "the engine host closed the connection"
            message = decode_to_agent(payload)
            if not isinstance(message, Stats):  # counters come whenever they change
                return message

    def raw(self, payload: bytes) -> None:
        self.writer.write(len(payload).to_bytes(HEADER, "big") + payload)


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[HostConnection]:
    socket = tmp_path / "engine.sock"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engines.host",
        "--socket",
        str(socket),
        "--gguf",
        str(bundled.smollm2_gguf()),
        "--cache-dir",
        str(TEST_MODEL_CACHE),
        "--threads",
        "1",
        "--max-context",
        "256",
        "--max-batch",
        "2",
    )
    try:

        async def connected() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
            try:
                return await asyncio.open_unix_connection(str(socket))
            except (FileNotFoundError, ConnectionRefusedError):
                assert process.returncode is None, "the engine host exited before listening"
                return None

        streams = await until(connected, "the engine host listening on its socket", 120, interval=0.05)
        assert streams is not None
        reader, writer = streams
        connection = HostConnection(process, reader, writer)
        while not isinstance(message := await connection.next(), Ready):
            assert isinstance(message, Progress), message
        yield connection
        writer.close()
        assert await asyncio.wait_for(process.wait(), 30) == 0, "the host exits cleanly when its agent leaves"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


MALFORMED = [
    (b'{"op": "cancel"}', None, "'id' must be an integer"),
    (b'{"op": "cancel", "id": "3"}', None, "'id' must be an integer"),
    (b'{"op": "limit", "max_batch": "all"}', None, "'max_batch'"),
    (b'{"op": "limit"}', None, "'max_batch'"),
    (b'{"op": "generate", "id": 8, "prompt": [1, 2]}', 8, "'max_tokens'"),
    (b'{"op": "embed", "id": 9}', 9, "'inputs'"),
    (b'{"op": "reboot", "id": 10}', 10, "unknown op"),
    (b"not json at all", None, "not JSON"),
    (b"[1, 2, 3]", None, "string 'op'"),
]


async def test_every_malformed_frame_gets_an_error_reply_and_the_host_keeps_serving(host: HostConnection) -> None:
    for payload, request_id, text in MALFORMED:
        host.raw(payload)
        reply = await host.next()
        assert isinstance(reply, Failed) and reply.code == "bad_request", (payload, reply)
        assert reply.id == request_id and text in reply.message, (payload, reply)
    host.writer.write(encode(Limit(1)))
    assert await host.next() == Limited(1)
    host.writer.write(encode(Cancel(12345)))  # an unknown id: it may just have finished; no answer, no harm
    host.writer.write(encode(GenerationRequest(1, [1, 2, 3], SamplingParams(max_tokens=4, temperature=0), frozenset())))
    tokens: list[int] = []
    while not isinstance(message := await host.next(), Done):
        assert isinstance(message, Tokens) and message.id == 1, message
        tokens += message.ids
    assert message == Done(1, "length", 3, 4) and len(tokens) == 4
    assert host.process.returncode is None
