"""The box as an MCP server: `/mcp` on port 8080, with four coding tools that run on this box's chat model.

Built on the official `mcp` SDK (Streamable HTTP; both protocol eras: an `initialize` starts a legacy session,
a request carrying `_meta` is served by the 2026-07-28 stateless rules). The SDK's Starlette app runs inside the
inference app through agent/api/mcp/asgi_bridge.py, behind the same middleware as /v1: the API key, `api.allow` and
the Host/Origin check (so the SDK's own DNS-rebinding check, which knows only localhost, is off).

Each tool renders a chat for its task, generates on the engine (or, on a box in a cluster, on the box that serves the
model asked for, the way the WebSocket relays its requests) (holding an admission place like any request,
so a full box answers "busy" instead of queueing without bound), reports progress every few tokens when the
client sent a progress token, and stops generating when the call is cancelled (a legacy
`notifications/cancelled`, or a modern client closing the stream). Results are typed: `structuredContent`
follows the tool's `outputSchema`, and the same JSON is sent as text.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Annotated, Any

import structlog
from aiohttp import web
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field

from agent.api.openai.protocol import ChatCompletionRequest
from agent.api.openai.serving import Finish, OpenAIServing, new_id
from agent.api.openai.stream_socket import ChatRelay
from agent.errors import AgentError

log = structlog.get_logger("agent.mcp")

MCP_PATH = "/mcp"
# Progress goes out every this many generated tokens (and once at the end).
PROGRESS_EVERY_TOKENS = 8
MAX_CODE_CHARS = 64_000

Code = Annotated[str, Field(min_length=1, max_length=MAX_CODE_CHARS, description="The source code")]
Language = Annotated[str | None, Field(max_length=40, description="Its programming language, e.g. python (optional)")]
MaxTokens = Annotated[int, Field(ge=1, le=4096, description="Longest answer, in tokens")]
Model = Annotated[str | None, Field(max_length=128, description="Model id; omit for the box's default model")]


class Answer(BaseModel):
    """What a tool produced."""

    text: str = Field(description="The model's answer")
    model: str = Field(description="The model that answered")
    finish_reason: str = Field(description='"stop" (complete) or "length" (cut at max_tokens or the context)')
    prompt_tokens: int
    completion_tokens: int


_READ_ONLY = ToolAnnotations(readOnlyHint=True, destructiveHint=False, idempotentHint=False, openWorldHint=False)


def build_server(serving: OpenAIServing, version: str, relay: ChatRelay | None = None) -> MCPServer:
    """The MCP server and its tools over `serving`'s models (`relay`: another box's, for models served there)."""
    server = MCPServer(
        "thox",
        title="Thox.ai device",
        version=version,
        instructions=(
            "Coding tools that run on this Thox.ai box's own language model: complete, explain, refactor and write "
            "tests for code. Nothing leaves the box."
        ),
    )
    generate = _Generator(serving, relay)
    _add_complete(server, generate)
    _add_explain(server, generate)
    _add_refactor(server, generate)
    _add_test(server, generate)
    return server


class _Generator:
    """Answers a tool's chat on this box's engine, or on the box that serves the model asked for."""

    def __init__(self, serving: OpenAIServing, relay: ChatRelay | None) -> None:
        self._serving = serving
        self._relay = relay

    async def answer(
        self, ctx: Context, tool: str, prompt: tuple[str, str], max_tokens: int, model: str | None
    ) -> Answer:
        """Generate the answer to (system, user), with progress; AgentErrors become tool errors."""
        system, user = prompt
        body: dict[str, Any] = {
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_completion_tokens": max_tokens,
        }
        if model is not None:
            body["model"] = model
        try:
            request = ChatCompletionRequest.model_validate(body)
            relayed = self._relay(body, new_id("mcp")) if self._relay is not None else None
            if relayed is not None:
                return await self._relayed(ctx, tool, relayed, max_tokens)
            return await self._local(ctx, tool, request, max_tokens)
        except AgentError as exc:
            raise ToolError(f"{tool} failed: {exc.message}") from exc

    async def _local(self, ctx: Context, tool: str, request: ChatCompletionRequest, max_tokens: int) -> Answer:
        serving = self._serving
        prepared = await serving.prepare_chat(request)
        pieces: list[str] = []
        async with prepared.model.engine.admission(), aclosing(serving.generate_text(prepared)) as stream:
            async for item in stream:
                if isinstance(item, Finish):
                    await ctx.report_progress(item.completion_tokens, max_tokens, "done")
                    log.info("mcp_tool_finished", tool=tool, completion_tokens=item.completion_tokens)
                    return Answer(
                        text="".join(pieces),
                        model=prepared.model.id,
                        finish_reason=item.finish_reason,
                        prompt_tokens=item.prompt_tokens,
                        completion_tokens=item.completion_tokens,
                    )
                if isinstance(item, str):
                    pieces.append(item)
                    if len(pieces) % PROGRESS_EVERY_TOKENS == 0:
                        await ctx.report_progress(len(pieces), max_tokens, f"{len(pieces)} tokens generated")
        raise ToolError(f"{tool} failed: the engine ended the generation without finishing it")

    async def _relayed(
        self, ctx: Context, tool: str, events: AsyncGenerator[dict[str, Any], None], max_tokens: int
    ) -> Answer:
        """The answer of the box serving the model, from its streamed chat completion (chunks count as progress)."""
        pieces: list[str] = []
        finish_reason, model, usage = "stop", "", None
        async with aclosing(events) as stream:
            async for event in stream:
                if "error" in event:
                    raise ToolError(f"{tool} failed on the box serving the model: {event['error'].get('message')}")
                model = event.get("model") or model
                usage = event.get("usage") or usage
                for choice in event.get("choices", []):
                    finish_reason = choice.get("finish_reason") or finish_reason
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        pieces.append(text)
                        if len(pieces) % PROGRESS_EVERY_TOKENS == 0:
                            await ctx.report_progress(len(pieces), max_tokens, f"{len(pieces)} chunks received")
        usage = usage or {}
        log.info("mcp_tool_finished", tool=tool, routed_model=model, completion_tokens=usage.get("completion_tokens"))
        return Answer(
            text="".join(pieces),
            model=model,
            finish_reason=finish_reason,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
        )


def _in(language: str | None) -> str:
    return f" {language}" if language else ""


def _add_complete(server: MCPServer, generate: _Generator) -> None:
    @server.tool(
        name="thox_complete",
        title="Complete code",
        description=(
            "Continue a piece of code: returns the code that should come next (not the part given). Give the code "
            "up to where it should continue; optionally what it should do next."
        ),
        annotations=_READ_ONLY,
    )
    async def thox_complete(
        code: Code,
        ctx: Context,
        instructions: Annotated[str | None, Field(max_length=2000, description="What to write next")] = None,
        language: Language = None,
        max_tokens: MaxTokens = 512,
        model: Model = None,
    ) -> Answer:
        system = "You complete code. Reply with only the code that comes next, without repeating the given code."
        user = f"Continue this{_in(language)} code.{(' ' + instructions) if instructions else ''}\n\n{code}"
        return await generate.answer(ctx, "thox_complete", (system, user), max_tokens, model)


def _add_explain(server: MCPServer, generate: _Generator) -> None:
    @server.tool(
        name="thox_explain",
        title="Explain code",
        description="Explain what a piece of code does, step by step, in plain language.",
        annotations=_READ_ONLY,
    )
    async def thox_explain(
        code: Code, ctx: Context, language: Language = None, max_tokens: MaxTokens = 512, model: Model = None
    ) -> Answer:
        system = "You explain code clearly and briefly: what it does, how, and anything surprising."
        user = f"Explain this{_in(language)} code:\n\n{code}"
        return await generate.answer(ctx, "thox_explain", (system, user), max_tokens, model)


def _add_refactor(server: MCPServer, generate: _Generator) -> None:
    @server.tool(
        name="thox_refactor",
        title="Refactor code",
        description=(
            "Rewrite a piece of code as asked (by default: clearer, same behaviour) and return the whole new code. "
            "Nothing is written anywhere: the caller decides what to do with the result."
        ),
        annotations=_READ_ONLY,
    )
    async def thox_refactor(
        code: Code,
        ctx: Context,
        instructions: Annotated[str, Field(max_length=2000, description="What to change")] = (
            "Make it clearer without changing what it does."
        ),
        language: Language = None,
        max_tokens: MaxTokens = 1024,
        model: Model = None,
    ) -> Answer:
        system = "You refactor code. Reply with the whole refactored code only."
        user = f"Refactor this{_in(language)} code. {instructions}\n\n{code}"
        return await generate.answer(ctx, "thox_refactor", (system, user), max_tokens, model)


def _add_test(server: MCPServer, generate: _Generator) -> None:
    @server.tool(
        name="thox_test",
        title="Write tests",
        description="Write unit tests for a piece of code, in the given test framework (default: the usual one).",
        annotations=_READ_ONLY,
    )
    async def thox_test(
        code: Code,
        ctx: Context,
        framework: Annotated[str | None, Field(max_length=40, description="e.g. pytest, jest, go test")] = None,
        language: Language = None,
        max_tokens: MaxTokens = 1024,
        model: Model = None,
    ) -> Answer:
        system = "You write unit tests. Reply with only the test code."
        using = f" using {framework}" if framework else ""
        user = f"Write unit tests{using} for this{_in(language)} code:\n\n{code}"
        return await generate.answer(ctx, "thox_test", (system, user), max_tokens, model)


class McpEndpoint:
    """The SDK's HTTP app for /mcp and its session manager, which runs while the inference API serves."""

    def __init__(self, serving: OpenAIServing, version: str, relay: ChatRelay | None = None) -> None:
        self.server = build_server(serving, version, relay)
        self.app = self.server.streamable_http_app(
            streamable_http_path=MCP_PATH,
            # Host/Origin are checked by the agent's own middleware for the whole port, against this device's
            # real names (thox.local, its hostname, its addresses), which the SDK's check does not know.
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, _app: web.Application | None = None) -> None:
        """Run the session manager in a task of its own: its anyio task group must not share a cancel scope with
        the API's start-up and shutdown code, and a fault in one MCP session must not reach that code."""
        running = asyncio.Event()

        async def hold() -> None:
            async with self.server.session_manager.run():
                running.set()
                await self._stop.wait()

        self._task = asyncio.create_task(hold(), name="mcp-sessions")
        started = asyncio.ensure_future(running.wait())
        try:
            await asyncio.wait({started, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()
        if self._task.done():
            self._task.result()  # the manager failed to start: raise its error

    async def stop(self, _app: web.Application | None = None) -> None:
        """End every MCP session (at shutdown, before the API waits for its handlers: open streams end now)."""
        self._stop.set()
        if self._task is not None:
            task, self._task = self._task, None
            await task
