"""WebSocket /v1/stream in process (real app and serving, scripted engine): disconnects, cancels, 503s, and no
task of a connection outliving its socket."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from agent.api.app import build_inference_app
from tests.agent.api.fake_engine import MODEL_ID, ScriptedEngine, scripted_serving
from tests.waiting import until

QUESTION = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32}
SOCKET_TASKS = ("ws-worker", "ws-request")

ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture
async def client(aiohttp_client: ClientFactory, engine: ScriptedEngine) -> TestClient[web.Request, web.Application]:
    return await aiohttp_client(build_inference_app(scripted_serving(engine), max_request_bytes=1 << 20))


def socket_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() in SOCKET_TASKS and not t.done()]


async def events_until_end(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    events = []
    while True:
        event = await ws.receive_json(timeout=10)
        events.append(event)
        if event["type"] in ("done", "error"):
            return events


async def test_a_whole_request_streams_chunks_then_done(client: TestClient[web.Request, web.Application]) -> None:
    async with client.ws_connect("/v1/stream") as ws:
        await ws.send_json({**QUESTION, "id": "q1"})
        events = await events_until_end(ws)
    assert [e["type"] for e in events[:-1]] == ["chunk"] * (len(events) - 1)
    assert "Paris" in "".join(e["choices"][0]["delta"]["content"] for e in events[:-1])
    assert events[-1]["type"] == "done" and events[-1]["request"] == "q1" and events[-1]["model"] == MODEL_ID


async def test_client_closing_mid_generation_ends_it_and_leaves_no_task(
    client: TestClient[web.Request, web.Application], engine: ScriptedEngine
) -> None:
    engine.hold = True
    with capture_logs() as logs:
        async with client.ws_connect("/v1/stream") as ws:
            await ws.send_json(QUESTION)
            first = await ws.receive_json(timeout=10)
            assert first["type"] == "chunk"
            assert socket_tasks(), "a request is running for this socket"
        # The generation is abandoned (the engine gets its cancel), the handler returns, its tasks are gone.
        await until(lambda: engine.abandoned == 1, "the generation was cancelled in the engine")
        await until(lambda: not socket_tasks(), f"no socket task outlives the socket: {socket_tasks()}")
        await until(lambda: any(e["event"] == "stream_socket_closed" for e in logs), "the handler returned")
    assert engine.in_flight == 0, "the engine place is given back"


async def test_client_closing_with_requests_queued_leaves_no_task(
    client: TestClient[web.Request, web.Application], engine: ScriptedEngine
) -> None:
    engine.hold = True
    async with client.ws_connect("/v1/stream") as ws:
        for i in range(3):
            await ws.send_json({**QUESTION, "id": i})
        assert (await ws.receive_json(timeout=10))["request"] == 0
    await until(lambda: not socket_tasks(), f"no socket task outlives the socket: {socket_tasks()}")
    assert engine.started == 1 and engine.abandoned == 1, "queued requests never start once the client left"


async def test_cancel_ends_the_current_request_and_the_connection_goes_on(
    client: TestClient[web.Request, web.Application], engine: ScriptedEngine
) -> None:
    engine.hold = True
    async with client.ws_connect("/v1/stream") as ws:
        await ws.send_json({**QUESTION, "id": "long"})
        assert (await ws.receive_json(timeout=10))["type"] == "chunk"
        await ws.send_json({"type": "cancel"})
        events = await events_until_end(ws)
        assert events[-1] == {"type": "done", "request": "long", "finish_reason": "cancelled", "usage": None}
        assert engine.abandoned == 1
        engine.hold = False
        await ws.send_json({**QUESTION, "id": "next"})
        events = await events_until_end(ws)
        assert events[-1]["type"] == "done" and events[-1]["request"] == "next"
        assert events[-1]["finish_reason"] in ("stop", "length") and engine.finished == 1
        # A cancel with nothing running changes nothing and gets no answer.
        await ws.send_json({"type": "cancel"})
        await ws.send_json({**QUESTION, "id": "after"})
        assert (await events_until_end(ws))[-1]["request"] == "after"


async def test_an_engine_without_room_gets_a_503_error_event_and_the_connection_stays(
    aiohttp_client: ClientFactory,
) -> None:
    engine = ScriptedEngine(max_batch=1, max_queue=0)
    engine.hold = True
    client = await aiohttp_client(build_inference_app(scripted_serving(engine), max_request_bytes=1 << 20))
    async with client.ws_connect("/v1/stream") as first, client.ws_connect("/v1/stream") as second:
        await first.send_json(QUESTION)
        assert (await first.receive_json(timeout=10))["type"] == "chunk"
        await second.send_json({**QUESTION, "id": "no-room"})
        refused = await second.receive_json(timeout=10)
        assert refused["type"] == "error" and refused["request"] == "no-room"
        assert refused["error"]["code"] == "server_overloaded" and refused["error"]["type"] == "server_error"
        engine.controls.suspend("too hot", code="thermal_critical")
        stopped = await events_until_end(first)
        assert stopped[-1]["type"] == "error" and stopped[-1]["error"]["code"] == "thermal_critical"
        await second.send_json({**QUESTION, "id": "while-stopped"})
        refused = await second.receive_json(timeout=10)
        assert refused["error"]["code"] == "thermal_critical"
        engine.controls.resume()
        engine.hold = False
        await second.send_json({**QUESTION, "id": "again"})
        assert (await events_until_end(second))[-1]["type"] == "done"
    await until(lambda: not socket_tasks(), f"no socket task outlives the socket: {socket_tasks()}")


async def test_bad_messages_get_error_events_and_the_connection_stays(
    client: TestClient[web.Request, web.Application],
) -> None:
    async with client.ws_connect("/v1/stream") as ws:
        await ws.send_str("{not json")
        assert (await ws.receive_json(timeout=10))["error"]["code"] == "invalid_json"
        await ws.send_bytes(b"{}")
        assert (await ws.receive_json(timeout=10))["error"]["code"] == "invalid_json"
        await ws.send_json([1, 2])
        assert (await ws.receive_json(timeout=10))["error"]["code"] == "invalid_json"
        await ws.send_json({"id": "bad", "messages": "nope"})
        event = await ws.receive_json(timeout=10)
        assert event["type"] == "error" and event["request"] == "bad" and event["error"]["param"] == "messages"
        await ws.send_str("[" * 100_000 + "]" * 100_000)  # nested too deep for the parser's recursion
        assert (await ws.receive_json(timeout=10))["error"]["code"] == "invalid_json"
        await ws.send_str('{"messages": [{"role": "user", "content": "\\ud800"}]}')  # a lone surrogate
        assert (await ws.receive_json(timeout=10))["error"]["code"] == "invalid_value"
        await ws.send_json({**QUESTION, "id": "good"})
        assert (await events_until_end(ws))[-1]["type"] == "done"
