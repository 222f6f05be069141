"""HTTP routes of the OpenAI-compatible API (port 8080): parsing, SSE framing, and the WebSocket's entry point.

The WebSocket `/v1/stream` and its event format live in `agent.api.openai.stream_socket`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import structlog
from aiohttp import web

from agent.api.body import parse_body, read_json_body
from agent.api.middleware import REQUEST_ID_HEADER, REQUEST_ID_KEY
from agent.api.openai import choices
from agent.api.openai.chat_stream import chat_stream
from agent.api.openai.logprobs import CompletionLogprobs, Scored
from agent.api.openai.mcp_loop import McpToolHost, complete_with_mcp
from agent.api.openai.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, StreamOptions
from agent.api.openai.serving import (
    Finish,
    OpenAIServing,
    Prepared,
    chat_chunk,
    chat_response,
    completion_object,
    new_id,
    now,
    usage_chunk,
)
from agent.api.openai.stream_socket import ChatRelay
from agent.api.openai.stream_socket import stream_socket as serve_stream_socket
from agent.api.security import CALLER_KEY
from agent.errors import AgentError, UnsupportedParameterError

log = structlog.get_logger("agent.api.openai")

SERVING_KEY = web.AppKey("openai_serving", OpenAIServing)
MAX_MESSAGE_BYTES_KEY = web.AppKey("max_message_bytes", int)
# The MCP host whose servers `mcp` tools name (agent/mcp/host.py).
MCP_TOOL_HOST_KEY: web.AppKey[McpToolHost] = web.AppKey("mcp_tool_host")
# Present on a box in a cluster: the WebSocket stream relays requests for models served elsewhere through it.
RELAY_KEY: web.AppKey[ChatRelay] = web.AppKey("chat_relay")


async def _open_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            REQUEST_ID_HEADER: request[REQUEST_ID_KEY],
        }
    )
    await response.prepare(request)
    return response


async def _send_event(response: web.StreamResponse, payload: dict[str, Any] | str) -> None:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    await response.write(f"data: {data}\n\n".encode())


async def _stream_with_error_event(
    request: web.Request, events: AsyncGenerator[dict[str, Any], None]
) -> web.StreamResponse:
    """Send SSE events; a failure after the 200 went out becomes an `{"error": ...}` event."""
    response = await _open_sse(request)
    try:
        async with aclosing(events):
            async for event in events:
                await _send_event(response, event)
    except AgentError as exc:
        log.warning("stream_failed", code=exc.code, message=exc.message)
        await _send_event(response, exc.envelope())
        return response
    except Exception:
        # The 200 is already out; the client still gets the envelope, as an event, instead of a cut stream.
        log.exception("stream_crashed")
        request_id = request[REQUEST_ID_KEY]
        await _send_event(
            response, AgentError(f"internal error; quote request id {request_id} when reporting it").envelope()
        )
        return response
    await _send_event(response, "[DONE]")
    return response


# ---------------------------------------------------------------------------- models


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models."""
    return web.json_response(await request.app[SERVING_KEY].list_models())


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{id}."""
    return web.json_response(await request.app[SERVING_KEY].model(request.match_info["model_id"]))


# ---------------------------------------------------------------------------- chat


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions, plain JSON or SSE."""
    serving = request.app[SERVING_KEY]
    body = parse_body(ChatCompletionRequest, await read_json_body(request))
    if body.mcp_tools():
        return await _chat_with_mcp(request, body)
    prepared = await serving.prepare_chat(body)
    completion_id, created, model = new_id("chatcmpl"), now(), prepared.model.id
    log.info("chat_completion", model=model, stream=body.stream, prompt_tokens=len(prepared.prompt_ids), user=body.user)
    preparations = choices.variants(prepared, body.n or 1)
    # The engine places are held for the whole response; without them, a 503 goes out before any 200.
    async with prepared.model.engine.admission(len(preparations)):
        if not body.stream:
            answers = await choices.complete_all(serving, preparations)
            usage = choices.usage([answer.finish for answer in answers])
            return web.json_response(chat_response(completion_id, created, prepared, answers, usage))
        return await _stream_with_error_event(
            request, _chat_events(serving, preparations, completion_id, created, body.stream_options)
        )


async def _chat_with_mcp(request: web.Request, body: ChatCompletionRequest) -> web.Response:
    """A chat completion offering hosted MCP servers: the agent runs the tool loop (agent/api/openai/mcp_loop.py)."""
    host = request.app.get(MCP_TOOL_HOST_KEY)
    if host is None:
        raise UnsupportedParameterError("this server hosts no MCP servers", param="tools")
    caller = request.get(CALLER_KEY) or f"address:{request.remote}"
    log.info("chat_completion", model=body.model, stream=False, mcp_tools=len(body.mcp_tools()), user=body.user)
    answer = await complete_with_mcp(request.app[SERVING_KEY], host, body, caller, host.max_tool_rounds())
    return web.json_response(answer)


async def _chat_events(
    serving: OpenAIServing,
    preparations: list[Prepared],
    completion_id: str,
    created: int,
    options: StreamOptions | None,
) -> AsyncGenerator[dict[str, Any], None]:
    include_usage = options is not None and options.include_usage
    model = preparations[0].model.id
    async with aclosing(chat_stream(serving, preparations)) as stream:
        async for event in stream:
            if isinstance(event, Finish):
                if include_usage:
                    yield usage_chunk(completion_id, created, model, "chat.completion.chunk", event)
                continue
            yield chat_chunk(
                completion_id,
                created,
                model,
                event.delta,
                event.finish_reason,
                with_usage_field=include_usage,
                index=event.index,
                logprobs=event.logprobs,
            )


# ---------------------------------------------------------------------- completions


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions (legacy text completion), plain JSON or SSE."""
    serving = request.app[SERVING_KEY]
    body = parse_body(CompletionRequest, await read_json_body(request))
    prepared = await serving.prepare_completion(body)
    completion_id, created, model = new_id("cmpl"), now(), prepared.model.id
    log.info("completion", model=model, stream=body.stream, prompt_tokens=len(prepared.prompt_ids), user=body.user)
    preparations = choices.variants(prepared, body.n or 1)
    async with prepared.model.engine.admission(len(preparations)):
        if not body.stream:
            answers = await choices.complete_all(serving, preparations)
            usage = choices.usage([answer.finish for answer in answers]).usage()
            texts = [
                (answer.text, answer.finish.finish_reason, _completion_logprobs(prepared, answer.scored))
                for answer in answers
            ]
            return web.json_response(completion_object(completion_id, created, model, texts, usage))
        return await _stream_with_error_event(
            request, _completion_events(serving, preparations, completion_id, created, body.stream_options)
        )


async def _completion_events(
    serving: OpenAIServing,
    preparations: list[Prepared],
    completion_id: str,
    created: int,
    options: StreamOptions | None,
) -> AsyncGenerator[dict[str, Any], None]:
    include_usage = options is not None and options.include_usage
    prepared = preparations[0]
    model = prepared.model.id
    want_logprobs = prepared.params.logprobs is not None
    shapers = [CompletionLogprobs(prepared.model.text.tokenizer) for _ in preparations]
    pending: list[list[Scored]] = [[] for _ in preparations]
    finishes: list[Finish] = []

    def chunk(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        # A chunk carries the logprobs of the tokens generated since the last chunk of its choice.
        logprobs = shapers[index].shape(pending[index]) if want_logprobs and pending[index] else None
        pending[index] = []
        return completion_object(
            completion_id, created, model, [(text, finish_reason, logprobs)], None, first_index=index
        )

    async with aclosing(choices.merged(serving, preparations)) as stream:
        async for index, item in stream:
            if isinstance(item, Finish):
                finishes.append(item)
                yield chunk(index, "", item.finish_reason)
            elif isinstance(item, Scored):
                pending[index].append(item)
            else:
                yield chunk(index, item, None)
    if include_usage:
        yield usage_chunk(completion_id, created, model, "text_completion", choices.usage(finishes))


def _completion_logprobs(prepared: Prepared, scored: list[Scored]) -> dict[str, Any] | None:
    if prepared.params.logprobs is None:
        return None
    return CompletionLogprobs(prepared.model.text.tokenizer).shape(scored)


# ------------------------------------------------------------------------ websocket


async def stream_socket(request: web.Request) -> web.WebSocketResponse:
    """WebSocket /v1/stream: chat completions as JSON events (format in agent.api.openai.stream_socket)."""
    app = request.app
    return await serve_stream_socket(request, app[SERVING_KEY], app[MAX_MESSAGE_BYTES_KEY], app.get(RELAY_KEY))


async def embeddings(request: web.Request) -> web.Response:
    """POST /v1/embeddings."""
    serving = request.app[SERVING_KEY]
    body = parse_body(EmbeddingRequest, await read_json_body(request))
    log.info("embeddings", model=body.model, inputs=len(body.items()), user=body.user)
    return web.json_response(await serving.embed(body))


def setup_routes(app: web.Application) -> None:
    """Register the OpenAI-compatible routes."""
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/stream", stream_socket)
