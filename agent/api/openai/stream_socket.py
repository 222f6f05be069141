"""WebSocket `/v1/stream`: chat completions as JSON events over one long-lived connection.

Event format (one JSON text message per event):
  client -> server   a chat completion request body (`model` optional, `messages`, sampling parameters; `stream`
                     and `stream_options` are implied and may be omitted), optionally with a client `"id"` that is
                     echoed in every event of that request; or `{"type": "cancel"}` to stop the current request.
  server -> client   `{"type": "chunk", "request": <client id or null>, "id", "object": "chat.completion.chunk",
                     "created", "model", "choices": [{"index": i, "delta": {"content": "..."}, "logprobs"}]}`:
                     for each choice i (n of them, 1 unless the request says), a first chunk with
                     `role: "assistant"`, then text in `delta.content` (or `delta.tool_calls` when tools were
                     offered; `logprobs` as in SSE chunks when requested);
                     then `{"type": "done", "request", "id", "model", "finish_reason" (choice 0's),
                     "choices": [{"index", "finish_reason"}], "usage": {...}}` once every choice has ended;
                     a cancelled request ends with `{"type": "done", "request", "finish_reason": "cancelled",
                     "usage": null}`;
                     or `{"type": "error", "request", "error": {"message", "type", "param", "code"}}`.
Requests on one connection run one after another in the order sent; a bad request gets an error event and the
connection stays open. When the client goes away, the request in progress is cancelled (its generation leaves the
engine's batch) and nothing the connection started outlives it.

On a box in a cluster, a request for a model served by another box (or arriving while every decode slot here is
taken) is relayed to it as a streamed chat completion, and its chunks come back as the same events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any, TypeAlias

import structlog
from aiohttp import WSMsgType, web

from agent.api.body import decode_json, parse_body
from agent.api.middleware import REQUEST_ID_HEADER, REQUEST_ID_KEY
from agent.api.openai import choices
from agent.api.openai.chat_stream import chat_stream
from agent.api.openai.protocol import ChatCompletionRequest
from agent.api.openai.serving import Finish, OpenAIServing, chat_chunk, new_id, now
from agent.errors import AgentError, InvalidRequestError

log = structlog.get_logger("agent.api.openai")

# (request body, request id) -> the SSE events of another box's answer to it, or None to answer here.
ChatRelay: TypeAlias = Callable[[dict[str, Any], str], AsyncGenerator[dict[str, Any], None] | None]


class _Connection:
    """One socket: the handler reads messages, a worker runs the queued requests one at a time."""

    def __init__(
        self, ws: web.WebSocketResponse, serving: OpenAIServing, relay: ChatRelay | None, request_id: str
    ) -> None:
        self.ws = ws
        self.serving = serving
        self.relay = relay
        self.request_id = request_id
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._current: asyncio.Task[None] | None = None
        # Set only by a client's cancel message: the one reason a request task may end cancelled while the
        # worker itself goes on.
        self._client_cancelled = False

    def cancel_current(self) -> None:
        """The client asked to stop the request in progress (a no-op when none runs)."""
        task = self._current
        if task is not None and not task.done():
            self._client_cancelled = True
            task.cancel()

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send_json(event)

    async def run_requests(self) -> None:
        """Run queued requests in order until cancelled (the socket closed); re-raises its own cancellation."""
        while True:
            payload = await self.queue.get()
            client_id = payload.get("id")
            self._client_cancelled = False
            task = asyncio.create_task(self._run_one(payload), name="ws-request")
            self._current = task
            try:
                # Not `await task`: that would turn the worker's own cancellation into the request's and the
                # worker could not tell them apart.
                await asyncio.wait({task})
            except asyncio.CancelledError:
                task.cancel()
                await asyncio.wait({task})
                raise
            finally:
                self._current = None
            event = self._closing_event(task, client_id)
            if event is None or self.ws.closed:
                continue
            try:
                await self.send(event)
            except ConnectionError:  # the client went away meanwhile; the handler cancels this worker
                continue

    def _closing_event(self, task: asyncio.Task[None], client_id: Any) -> dict[str, Any] | None:
        """The event that ends a finished request whose task could not send one itself."""
        if task.cancelled():
            if self._client_cancelled:
                return {"type": "done", "request": client_id, "finish_reason": "cancelled", "usage": None}
            return None
        failure = task.exception()
        if failure is None or isinstance(failure, ConnectionError):  # done, or the client went away mid-send
            return None
        log.error("stream_request_crashed", exc_info=failure)
        return {
            "type": "error",
            "request": client_id,
            **AgentError("internal error while generating; see the agent log").envelope(),
        }

    async def _run_one(self, payload: dict[str, Any]) -> None:
        client_id = payload.pop("id", None)
        payload.pop("type", None)
        payload.setdefault("stream", True)
        try:
            body = parse_body(ChatCompletionRequest, payload)  # the same checks wherever it is answered
            relayed = self.relay(payload, self.request_id) if self.relay is not None else None
            if relayed is not None:
                await self._relay(relayed, client_id)
                return
            prepared = await self.serving.prepare_chat(body)
            completion_id, created, model = new_id("chatcmpl"), now(), prepared.model.id
            preparations = choices.variants(prepared, body.n or 1)
            finished: list[dict[str, Any]] = []
            async with (
                prepared.model.engine.admission(len(preparations)),
                aclosing(chat_stream(self.serving, preparations)) as stream,
            ):
                async for event in stream:
                    if isinstance(event, Finish):
                        await self.send(
                            {
                                "type": "done",
                                "request": client_id,
                                "id": completion_id,
                                "model": model,
                                "finish_reason": finished[0]["finish_reason"],
                                "choices": finished,
                                "usage": event.usage(),
                            }
                        )
                        return
                    if event.finish_reason is not None:
                        finished.append({"index": event.index, "finish_reason": event.finish_reason})
                        finished.sort(key=lambda c: c["index"])
                        continue
                    chunk = chat_chunk(
                        completion_id,
                        created,
                        model,
                        event.delta,
                        None,
                        with_usage_field=False,
                        index=event.index,
                        logprobs=event.logprobs,
                    )
                    await self.send({"type": "chunk", "request": client_id, **chunk})
        except AgentError as exc:
            await self.send({"type": "error", "request": client_id, **exc.envelope()})

    async def _relay(self, events: AsyncGenerator[dict[str, Any], None], client_id: Any) -> None:
        """Send another box's streamed answer as this socket's events."""
        finished: list[dict[str, Any]] = []
        usage = None
        async with aclosing(events) as stream:
            async for event in stream:
                if "error" in event:
                    await self.send({"type": "error", "request": client_id, **event})
                    return
                usage = event.pop("usage", None) or usage  # only the last event has it
                news = []
                for choice in event.get("choices", []):
                    if choice.get("finish_reason") is not None:
                        finished.append({"index": choice["index"], "finish_reason": choice["finish_reason"]})
                    if choice.get("delta") or choice.get("logprobs"):
                        news.append({**choice, "finish_reason": None})
                if news:
                    await self.send({"type": "chunk", "request": client_id, **event, "choices": news})
        finished.sort(key=lambda c: c["index"])
        await self.send(
            {
                "type": "done",
                "request": client_id,
                "id": event.get("id"),
                "model": event.get("model"),
                "finish_reason": finished[0]["finish_reason"] if finished else None,
                "choices": finished,
                "usage": usage,
            }
        )


def _refusal(message: str) -> dict[str, Any]:
    return {"type": "error", "request": None, **InvalidRequestError(message, code="invalid_json").envelope()}


async def stream_socket(
    request: web.Request, serving: OpenAIServing, max_message_bytes: int, relay: ChatRelay | None = None
) -> web.WebSocketResponse:
    """Serve one WebSocket connection until the client closes it (format in the module docstring)."""
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=max_message_bytes)
    ws.headers[REQUEST_ID_HEADER] = request[REQUEST_ID_KEY]
    await ws.prepare(request)
    log.info("stream_socket_opened")
    connection = _Connection(ws, serving, relay, request[REQUEST_ID_KEY])
    worker = asyncio.create_task(connection.run_requests(), name="ws-worker")
    try:
        async for message in ws:
            if message.type == WSMsgType.BINARY:
                await connection.send(_refusal("send requests as JSON text messages"))
                continue
            if message.type != WSMsgType.TEXT:
                continue
            try:
                payload = decode_json(message.data)
            except InvalidRequestError as exc:  # not JSON, nested too deep, or not valid Unicode
                await connection.send({"type": "error", "request": None, **exc.envelope()})
                continue
            if not isinstance(payload, dict):
                await connection.send(_refusal("each message must be a JSON object"))
            elif payload.get("type") == "cancel":
                connection.cancel_current()
            else:
                connection.queue.put_nowait(payload)
    finally:
        # The client left (or the server stops): whatever is generating for it is cancelled, and waited for
        # unless aiohttp cancels this handler too once the connection is gone (the worker still ends on its own).
        worker.cancel()
        try:
            await asyncio.gather(worker, return_exceptions=True)
        finally:
            log.info("stream_socket_closed")
    return ws
