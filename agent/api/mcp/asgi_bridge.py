"""Serve an ASGI application (the MCP SDK's Starlette app) from an aiohttp route, on the same port and event loop.

aiohttp hands us a request; the ASGI app gets the scope, reads the body through `receive` and answers through
`send`, which writes an aiohttp StreamResponse as the messages come (SSE streams included). After the body,
`receive` reports `http.disconnect` once the client's connection closes or once the response is complete.

The app runs in a task of its own. ASGI tells an app that its client left through `receive`, never by
cancelling it; the agent's runner cancels a handler whose client disconnects (handler_cancellation), and a
client routinely closes the connection right after reading a streamed answer, while the SDK is still finishing
that request (a cancellation there made it discard the session it had just opened). So the handler's
cancellation becomes `http.disconnect`, and the handler waits for the app to wind down before it goes.
A third-party bridge (aiohttp-asgi 0.7.1) returned `http.request` for ever after the body, which spins the SDK's
disconnect listener (../shared/research/mcp.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import Any

import structlog
from aiohttp import web

log = structlog.get_logger("agent.mcp")

AsgiMessage = MutableMapping[str, Any]
AsgiApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[AsgiMessage]], Callable[[AsgiMessage], Awaitable[None]]],
    Coroutine[Any, Any, None],
]

# How often a waiting `receive` checks whether the client went away (for runners that do not cancel handlers).
DISCONNECT_POLL_SECONDS = 0.25
# How long an app that was told of a disconnect may take to end before it is cancelled.
WIND_DOWN_SECONDS = 5.0
_BODY_CHUNK = 64 * 1024


class _Exchange:
    """One request's ASGI conversation."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None
        self.status = 500
        self._headers: list[tuple[str, str]] = []
        self._body_done = False
        self.ended = asyncio.Event()  # the response is complete, or the client is gone

    def scope(self) -> dict[str, Any]:
        request = self.request
        peer = request.transport.get_extra_info("peername") if request.transport else None
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": f"{request.version.major}.{request.version.minor}",
            "method": request.method,
            "scheme": request.scheme,
            "path": request.path,
            "raw_path": request.raw_path.split("?", 1)[0].encode(),
            "query_string": request.query_string.encode(),
            "root_path": "",
            "headers": [(name.lower(), value) for name, value in request.raw_headers],
            "client": tuple(peer[:2]) if peer else None,
            "server": tuple(sock[:2]) if sock else None,
        }

    async def receive(self) -> AsgiMessage:
        if not self._body_done:
            chunk = await self.request.content.read(_BODY_CHUNK)
            self._body_done = self.request.content.at_eof()
            return {"type": "http.request", "body": chunk, "more_body": not self._body_done}
        while not self.ended.is_set():
            transport = self.request.transport
            if transport is None or transport.is_closing():
                break
            try:
                await asyncio.wait_for(self.ended.wait(), DISCONNECT_POLL_SECONDS)
            except TimeoutError:
                continue
        return {"type": "http.disconnect"}

    async def send(self, message: AsgiMessage) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = int(message["status"])
            self._headers = [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1")) for k, v in message["headers"]]
            return
        if kind != "http.response.body" or self.ended.is_set():
            return
        response = self.response
        if response is None:
            response = self.response = web.StreamResponse(status=self.status)
            for name, value in self._headers:
                response.headers.add(name, value)
            await response.prepare(self.request)
        body = message.get("body", b"")
        if body:
            await response.write(body)
        if not message.get("more_body", False):
            await response.write_eof()
            self.ended.set()


def asgi_handler(app: AsgiApp) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An aiohttp handler that runs `app` for each request."""

    async def handle(request: web.Request) -> web.StreamResponse:
        exchange = _Exchange(request)
        task = asyncio.create_task(app(exchange.scope(), exchange.receive, exchange.send), name="asgi-request")
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            exchange.ended.set()  # the client is gone: the app hears it from `receive`
            await asyncio.wait({task}, timeout=WIND_DOWN_SECONDS)
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
            if not task.cancelled() and task.exception() is not None:
                log.warning("asgi_request_failed_after_disconnect", error=repr(task.exception()))
            raise
        if exchange.response is None:  # the app ended without answering: an empty response with its status
            return web.Response(status=exchange.status)
        return exchange.response

    return handle
