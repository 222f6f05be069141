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
from agent.api.openai.stream_socket import stream_socket as serve_stream_socket
from agent.api.openai.tools import ToolCallShaper
from agent.errors import AgentError

log = structlog.get_logger("agent.api.openai")

SERVING_KEY = web.AppKey("openai_serving", OpenAIServing)
MAX_MESSAGE_BYTES_KEY = web.AppKey("max_message_bytes", int)


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
    return web.json_response(request.app[SERVING_KEY].list_models())


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{id}."""
    serving = request.app[SERVING_KEY]
    model = serving.registry.get(request.match_info["model_id"])
    return web.json_response(serving.model_card(model))


# ---------------------------------------------------------------------------- chat


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions, plain JSON or SSE."""
    serving = request.app[SERVING_KEY]
    body = parse_body(ChatCompletionRequest, await read_json_body(request))
    prepared = await serving.prepare_chat(body)
    completion_id, created, model = new_id("chatcmpl"), now(), prepared.model.id
    log.info("chat_completion", model=model, stream=body.stream, prompt_tokens=len(prepared.prompt_ids), user=body.user)
    preparations = choices.variants(prepared, body.n or 1)
    # The engine places are held for the whole response; without them, a 503 goes out before any 200.
    async with prepared.model.engine.admission(len(preparations)):
        if not body.stream:
            answers = await choices.complete_all(serving, preparations)
            usage = choices.usage([finish for _, finish in answers])
            return web.json_response(
                chat_response(completion_id, created, model, answers, usage, offered_tools=prepared.tools)
            )
        return await _stream_with_error_event(
            request, _chat_events(serving, preparations, completion_id, created, body.stream_options)
        )


async def _chat_events(
    serving: OpenAIServing,
    preparations: list[Prepared],
    completion_id: str,
    created: int,
    options: StreamOptions | None,
) -> AsyncGenerator[dict[str, Any], None]:
    include_usage = options is not None and options.include_usage
    prepared = preparations[0]
    model = prepared.model.id

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return chat_chunk(
            completion_id, created, model, delta, finish_reason, with_usage_field=include_usage, index=index
        )

    shapers = [ToolCallShaper(prepared.tools) for _ in preparations]
    for index in range(len(preparations)):
        yield chunk(index, {"role": "assistant", "content": ""} if not prepared.tools else {"role": "assistant"})
    finishes: list[Finish] = []
    async with aclosing(choices.merged(serving, preparations)) as stream:
        async for index, item in stream:
            shaper = shapers[index]
            if isinstance(item, Finish):
                for delta in shaper.flush():
                    yield chunk(index, delta)
                yield chunk(index, {}, shaper.finish_reason(item.finish_reason))
                finishes.append(item)
                continue
            for delta in shaper.push(item):
                yield chunk(index, delta)
    if include_usage:
        yield usage_chunk(completion_id, created, model, "chat.completion.chunk", choices.usage(finishes))


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
            usage = choices.usage([finish for _, finish in answers]).usage()
            texts = [(text, finish.finish_reason) for text, finish in answers]
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
    model = preparations[0].model.id
    finishes: list[Finish] = []
    async with aclosing(choices.merged(serving, preparations)) as stream:
        async for index, item in stream:
            if isinstance(item, Finish):
                finishes.append(item)
                yield completion_object(
                    completion_id, created, model, [("", item.finish_reason)], None, first_index=index
                )
                continue
            yield completion_object(completion_id, created, model, [(item, None)], None, first_index=index)
    if include_usage:
        yield usage_chunk(completion_id, created, model, "text_completion", choices.usage(finishes))


# ------------------------------------------------------------------------ websocket


async def stream_socket(request: web.Request) -> web.WebSocketResponse:
    """WebSocket /v1/stream: chat completions as JSON events (format in agent.api.openai.stream_socket)."""
    return await serve_stream_socket(request, request.app[SERVING_KEY], request.app[MAX_MESSAGE_BYTES_KEY])


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
