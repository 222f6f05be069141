"""The inference API's cluster hop: a request for a model this box does not serve goes to a box that does."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from agent.cluster.router import ROUTED_PATHS, Router

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def routing_middleware(router: Router, serves: Callable[[str], bool]) -> Middleware:
    """Runs after the security middleware: a client is authenticated by the box it called, whoever answers."""

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
        if not isinstance(model, str) or serves(model):
            return await handler(request)
        target = router.pick(model, body)
        if target is None:
            return await handler(request)  # nobody serves it: the handler's 404 model_not_found
        return await router.forward(request, target, raw)

    return route
