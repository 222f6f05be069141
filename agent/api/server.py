"""aiohttp's server with our error envelope for requests its HTTP parser refuses.

A request aiohttp cannot parse (a NUL byte in a header, a bad request line, an oversized header) never reaches
the application or its middleware: aiohttp answers it with a plain-text 400 and logs an ERROR with a traceback.
The connection handler here answers it with the OpenAI error envelope instead, and logs one WARNING line. Server
faults (5xx) keep aiohttp's own handling.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_request import BaseRequest

from agent.api.middleware import REQUEST_ID_HEADER
from agent.errors import AgentError

log = structlog.get_logger("agent.api")


class _EnvelopeRequestHandler(web.RequestHandler):
    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        reason = (getattr(exc, "message", None) or message or str(exc) or "unreadable request").strip()
        request_id = uuid.uuid4().hex
        log.warning(
            "http_request_unparsable", status=status, reason=reason[:200], remote=request.remote, request_id=request_id
        )
        error = AgentError(f"the HTTP request could not be parsed: {reason[:200]}", code="bad_http_request")
        error.status, error.type = status, "invalid_request_error"
        response = web.Response(
            status=status,
            text=json.dumps(error.envelope()),
            content_type="application/json",
            headers={REQUEST_ID_HEADER: request_id},
        )
        response.force_close()  # what follows a request that could not be parsed cannot be trusted either
        return response


class _EnvelopeServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _EnvelopeRequestHandler(self, loop=self._loop, **self._kwargs)


class EnvelopeAppRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer unparsable requests with the error envelope."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        kwargs: dict[str, Any] = dict(made._kwargs)
        return _EnvelopeServer(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **kwargs,
        )
