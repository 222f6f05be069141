"""WebSocket /v1/stream: chunk events, a done event with usage, error events, several requests per connection."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.agent_process import RunningAgent


def ws_url(agent: RunningAgent) -> str:
    return agent.inference_url.replace("http://", "ws://") + "/stream"


async def collect(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    """Events of one request, up to and including its done or error event."""
    events = []
    while True:
        event = await ws.receive_json(timeout=120)
        events.append(event)
        if event["type"] in ("done", "error"):
            return events


async def test_documented_javascript_flow(running_agent: RunningAgent) -> None:
    # What the product docs' example does: send {model, messages}, print choices[0].delta.content of each
    # message until the done event.
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(running_agent)) as ws:
        await ws.send_json(
            {
                "model": "smollm2-135m-instruct",
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "temperature": 0,
            }
        )
        events = await collect(ws)
    chunks, done = events[:-1], events[-1]
    assert chunks and all(isinstance(c["choices"][0]["delta"]["content"], str) for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["type"] == "chunk" for c in chunks)
    assert "Paris" in "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert done["type"] == "done" and done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] > 0
    assert done["usage"]["total_tokens"] == done["usage"]["prompt_tokens"] + done["usage"]["completion_tokens"]


async def test_several_requests_on_one_connection(running_agent: RunningAgent) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(running_agent)) as ws:
        # Sent back to back: they run in order, each ends with its own done event.
        for i in range(3):
            await ws.send_json(
                {"id": f"r{i}", "messages": [{"role": "user", "content": f"Count to {i + 2}."}], "max_tokens": 5 + i}
            )
        for i in range(3):
            events = await collect(ws)
            assert {e["request"] for e in events} == {f"r{i}"}
            assert events[-1]["type"] == "done"
            assert events[-1]["usage"]["completion_tokens"] <= 5 + i
        # Omitted model: the default answers.
        await ws.send_json({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        events = await collect(ws)
        assert events[-1]["type"] == "done" and events[0]["model"] == "smollm2-135m-instruct"


async def test_bad_requests_get_error_events_and_the_connection_survives(running_agent: RunningAgent) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(running_agent)) as ws:
        await ws.send_str("{not json")
        error = await ws.receive_json(timeout=30)
        assert error["type"] == "error" and error["error"]["code"] == "invalid_json"
        await ws.send_json({"id": "x", "model": "gpt-9", "messages": [{"role": "user", "content": "Hi"}]})
        error = await ws.receive_json(timeout=30)
        assert error == {
            "type": "error",
            "request": "x",
            "error": {
                "message": error["error"]["message"],
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            },
        }
        await ws.send_json({"messages": [{"role": "user", "content": "Hi"}], "temperature": 9})
        error = await ws.receive_json(timeout=30)
        assert error["error"]["param"] == "temperature"
        await ws.send_json({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        events = await collect(ws)
        assert events[-1]["type"] == "done"


async def test_cancel_ends_only_the_current_request(running_agent: RunningAgent) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(running_agent)) as ws:
        await ws.send_json(
            {"id": "long", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 1000}
        )
        first = await ws.receive_json(timeout=60)
        assert first["type"] == "chunk"
        await ws.send_json({"type": "cancel"})
        while (event := await ws.receive_json(timeout=60))["type"] == "chunk":
            pass
        assert event == {"type": "done", "request": "long", "finish_reason": "cancelled", "usage": None}
        await ws.send_json({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        assert (await collect(ws))[-1]["type"] == "done"
