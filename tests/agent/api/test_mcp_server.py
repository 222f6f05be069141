"""/mcp in process (the real inference app, the official SDK client, a scripted engine): both protocol eras,
typed tools, progress, cancellation that stops generation, argument errors as tool errors."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import jsonschema
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from mcp import Client

from agent.api.app import build_inference_app
from agent.api.mcp.server import McpEndpoint
from tests.agent.api.fake_engine import ScriptedEngine, scripted_serving
from tests.waiting import until

ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
TOOLS = {"thox_complete", "thox_explain", "thox_refactor", "thox_test"}
ERAS = ["legacy", "2026-07-28"]


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture
async def url(aiohttp_client: ClientFactory, engine: ScriptedEngine) -> str:
    serving = scripted_serving(engine)
    app = build_inference_app(serving, max_request_bytes=1 << 20, mcp=McpEndpoint(serving, "9.9.9"))
    client = await aiohttp_client(app)
    return str(client.make_url("/mcp"))


@pytest.mark.parametrize("mode", ERAS)
async def test_the_four_tools_are_listed_with_descriptions_and_typed_schemas(url: str, mode: str) -> None:
    async with Client(url, mode=mode) as client:
        listed = (await client.list_tools()).tools
    assert {tool.name for tool in listed} == TOOLS
    for tool in listed:
        assert tool.description and len(tool.description) > 30
        assert "code" in tool.input_schema["required"]
        assert tool.output_schema is not None and "text" in tool.output_schema["properties"]
        assert tool.annotations is not None and tool.annotations.read_only_hint


@pytest.mark.parametrize("mode", ERAS)
async def test_a_call_answers_from_the_engine_with_structured_content(url: str, mode: str) -> None:
    async with Client(url, mode=mode) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        result = await client.call_tool("thox_explain", {"code": "print(1)", "language": "python"})
    assert not result.is_error
    structured = result.structured_content
    assert structured is not None
    jsonschema.validate(structured, tools["thox_explain"].output_schema or {})
    assert structured["text"] == " The capital of France is Paris." and structured["finish_reason"] == "stop"
    assert structured["completion_tokens"] == 7 and structured["model"] == "scripted-chat"


@pytest.mark.parametrize("mode", ERAS)
async def test_long_generations_report_progress(url: str, mode: str, engine: ScriptedEngine) -> None:
    engine.answer = engine.answer * 5  # 35 tokens: progress every 8, then the end
    reported: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reported.append((progress, total))

    async with Client(url, mode=mode) as client:
        result = await client.call_tool(
            "thox_test", {"code": "def f(): return 1", "max_tokens": 100}, progress_callback=on_progress
        )
    assert not result.is_error
    await until(lambda: len(reported) >= 5, "five progress notifications", 5)
    assert [done for done, _ in reported] == [8, 16, 24, 32, 35]
    assert all(total == 100 for _, total in reported)


@pytest.mark.parametrize("mode", ERAS)
async def test_cancelling_a_call_stops_the_generation(url: str, mode: str, engine: ScriptedEngine) -> None:
    engine.hold = True  # the generation waits after its first token until the gate opens (never, here)
    async with Client(url, mode=mode) as client:
        call = asyncio.ensure_future(client.call_tool("thox_refactor", {"code": "x = 1"}))
        await until(lambda: engine.started == 1, "the generation to start", 10)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # A legacy client sends notifications/cancelled; a modern one closes the stream. Either ends it.
        await until(lambda: engine.abandoned == 1, "the generation to be abandoned", 10)
    assert engine.finished == 0


@pytest.mark.parametrize(
    ("arguments", "field"),
    [({}, "code"), ({"code": ""}, "code"), ({"code": "x", "max_tokens": 0}, "max_tokens"), ({"code": 3}, "code")],
)
async def test_bad_arguments_are_tool_errors_naming_the_field(url: str, arguments: dict[str, Any], field: str) -> None:
    async with Client(url, mode="2026-07-28") as client:
        result = await client.call_tool("thox_complete", arguments)
    assert result.is_error
    assert field in result.content[0].text  # type: ignore[union-attr]


async def test_an_unknown_model_is_a_tool_error_that_says_so(url: str) -> None:
    async with Client(url, mode="2026-07-28") as client:
        result = await client.call_tool("thox_explain", {"code": "x", "model": "nope"})
    assert result.is_error
    assert "nope" in result.content[0].text  # type: ignore[union-attr]
