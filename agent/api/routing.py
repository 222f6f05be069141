"""The inference API's cluster hop: a request for a model this box does not serve, or arriving while every
decode slot here is taken, goes to a box that serves it (a less busy one, in the second case)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from agent.cluster.router import ROUTED_PATHS, Router

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class LocalLoad:
    """How busy this box is with one model."""

    in_flight: int
    saturated: bool


def routing_middleware(router: Router, local_load: Callable[[str], LocalLoad | None]) -> Middleware:
    """Runs after the security middleware: a client is authenticated by the box it called, whoever answers.

    `local_load(model)` is None when this box does not serve the model, else its requests in flight and whether
    it is saturated (every decode slot taken).
    """

    @web.middleware
    async def route(request: web.Request, handler: Handler) -> web.StreamResponse:
        # A lone box (the common case) pays nothing: no second parse of the body on the hot path.
        if request.method != "POST" or request.path not in ROUTED_PATHS or not router.has_peers():
            return await handler(request)
        raw = await request.read()  # cached by aiohttp: the local handler reads the same bytes again
        try:
            body = json.loads(raw)
        except ValueError:
            return await handler(request)  # the handler answers with the precise 400
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str):
            return await handler(request)
        here = local_load(model)
        if here is None:
            target = router.pick(model, body)  # None: nobody serves it, and the handler answers 404
        elif here.saturated:
            target = router.pick(model, body, below=here.in_flight)  # only to a box less busy than this one
        else:
            target = None
        if target is None:
            return await handler(request)
        return await router.forward(request, target, raw)

    return route
