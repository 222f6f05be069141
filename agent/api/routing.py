"""The inference API's cluster hop: a request for a model this box does not serve, or arriving while every
decode slot here is taken, goes to a box that serves it (a less busy one, in the second case). HTTP requests are
forwarded whole (`middleware`); each request of a WebSocket stream is relayed as a streamed chat completion
(`relay`)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from agent.cluster.router import ROUTED_PATHS, Router

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class LocalLoad:
    """How busy this box is with one model."""

    in_flight: int
    saturated: bool


class Routing:
    """Decides which requests leave this box, and sends them.

    `local_load(model)` is None when this box does not serve the model, else its requests in flight and whether
    it is saturated (every decode slot taken).
    """

    def __init__(self, router: Router, local_load: Callable[[str], LocalLoad | None]) -> None:
        self._router = router
        self._local_load = local_load

    def target(self, body: Any) -> Mapping[str, Any] | None:
        """The box to send this request body to, or None to serve it here (or answer 404 for an unknown model)."""
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str):
            return None
        here = self._local_load(model)
        if here is None:
            return self._router.pick(model, body)  # None: nobody serves it, and the handler answers 404
        if here.saturated:
            return self._router.pick(model, body, below=here.in_flight)  # only to a box less busy than this one
        return None

    def middleware(self) -> Middleware:
        """Runs after the security middleware: a client is authenticated by the box it called, whoever answers."""

        @web.middleware
        async def route(request: web.Request, handler: Handler) -> web.StreamResponse:
            # A lone box (the common case) pays nothing: no second parse of the body on the hot path.
            if request.method != "POST" or request.path not in ROUTED_PATHS or not self._router.has_peers():
                return await handler(request)
            raw = await request.read()  # cached by aiohttp: the local handler reads the same bytes again
            try:
                body = json.loads(raw)
            except ValueError:
                return await handler(request)  # the handler answers with the precise 400
            target = self.target(body)
            if target is None:
                return await handler(request)
            return await self._router.forward(request, target, raw)

        return route

    def relay(self, body: dict[str, Any], request_id: str) -> AsyncGenerator[dict[str, Any], None] | None:
        """A WebSocket request's streamed chat completion from the box that should answer it (its SSE events, usage
        included), or None to serve it here."""
        if not self._router.has_peers():
            return None
        target = self.target(body)
        if target is None:
            return None
        streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
        headers = {"X-Request-ID": request_id}
        return self._router.stream_events(target, "/v1/chat/completions", streamed, headers)
