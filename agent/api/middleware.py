"""Middleware shared by both APIs: request ids and the one error envelope.

Every response carries `X-Request-ID` (the client's, when it is a sane token, else a new one) and every log line
written while serving the request carries it too. Every error, whatever raised it (our own AgentError tree,
aiohttp's 404/405/413, a bug), leaves as `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from agent.errors import (
    AgentError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
)

log = structlog.get_logger("agent.api")

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_KEY = web.RequestKey("request_id", str)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: AgentError, request_id: str) -> web.Response:
    """The JSON envelope for an error, with the request id header."""
    response = web.json_response(error.envelope(), status=error.status)
    response.headers[REQUEST_ID_HEADER] = request_id
    if error.status in (429, 503):
        response.headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, RateLimitError):
        response.headers.update(error.headers)
    if error.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="thox"'
    if isinstance(error, MethodNotAllowedError):
        # RFC 9110 section 15.5.6: a 405 must say which methods the resource does support.
        response.headers["Allow"] = ", ".join(error.allowed)

    return response


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> AgentError:
    if isinstance(exc, web.HTTPNotFound):
        return NotFoundError(f"Unknown route: {request.method} {request.path}", code="unknown_route")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return MethodNotAllowedError(
            f"{request.method} is not allowed on {request.path}; use {allowed}", allowed=exc.allowed_methods
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLargeError(f"request body too large: {exc.text}")
    error = AgentError(exc.reason or "HTTP error")
    error.status = exc.status
    error.type = "invalid_request_error" if exc.status < 500 else "server_error"
    return error


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Assign the request id, bind it for logging, and turn every failure into the error envelope."""
    supplied = request.headers.get(REQUEST_ID_HEADER)
    request_id = supplied if supplied and _REQUEST_ID.match(supplied) else uuid.uuid4().hex
    request[REQUEST_ID_KEY] = request_id
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    if supplied is not None and supplied != request_id:
        return error_response(
            InvalidRequestError(
                f"{REQUEST_ID_HEADER} must be 1-128 characters of letters, digits, '.', '_', ':' or '-'",
                param=REQUEST_ID_HEADER,
                code="invalid_request_id",
            ),
            request_id,
        )
    try:
        response = await handler(request)
    except AgentError as exc:
        log.info(
            "request_failed",
            method=request.method,
            path=request.path,
            status=exc.status,
            code=exc.code,
            message=exc.message,
        )
        return error_response(exc, request_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = _from_http_exception(exc, request)
        log.info("request_failed", method=request.method, path=request.path, status=error.status, code=error.code)
        return error_response(error, request_id)
    except Exception:
        log.exception("request_crashed", method=request.method, path=request.path)
        return error_response(
            AgentError(f"internal error; quote request id {request_id} when reporting it"), request_id
        )
    if not response.prepared:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response
