"""The agent's one error tree.

`ThoxError` is the root of every exception the `agent` package defines. Two kinds hang from it:

- `AgentError` and its subclasses are what a client sees: each knows its HTTP status and its OpenAI error-envelope
  fields; serving code raises them and `agent.api.middleware` turns them into
  `{"error": {message, type, param, code}}`.
- Every other error (settings, start-up, keys, PKI, tokens, etcd, placement, model store, ...) is an internal
  condition of one subsystem, defined beside it; at the seam where a request meets it, it is translated into an
  `AgentError` (or a peer API refusal), never passed through as a 500 and never swallowed.

Errors of `drivers` (DriverError) and `engines` (EngineError) root in their own packages, which never import
`agent`; the agent translates them the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ThoxError(Exception):
    """Root of every exception the agent package defines."""


class AgentError(ThoxError):
    """Base of every error the agent reports to a client (an HTTP status and an OpenAI error envelope)."""

    status = 500
    type = "server_error"
    code: str | None = None
    # Seconds a client should wait before retrying (sent as Retry-After on 503s).
    retry_after = 1

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if retry_after is not None:
            self.retry_after = retry_after

    def envelope(self) -> dict[str, Any]:
        """The OpenAI error object for this error."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequestError(AgentError):
    """The request is malformed or asks for something we do not do (400)."""

    status = 400
    type = "invalid_request_error"


class UnsupportedParameterError(InvalidRequestError):
    """A known OpenAI parameter (or value) that this server does not implement; refused, never ignored."""

    code = "unsupported_parameter"


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested completion do not fit the model's context window."""

    code = "context_length_exceeded"


class NotFoundError(AgentError):
    """The route or the named resource does not exist (404)."""

    status = 404
    type = "not_found_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    """The requested model is not installed."""

    type = "invalid_request_error"
    code = "model_not_found"


class MethodNotAllowedError(AgentError):
    """The route exists but not with this HTTP method (405); the response's Allow header lists the methods it has."""

    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, message: str, *, allowed: Iterable[str]) -> None:
        super().__init__(message)
        self.allowed = sorted(allowed)


class PayloadTooLargeError(AgentError):
    """The request body exceeds the configured limit (413)."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class EngineUnavailableError(AgentError):
    """The engine host is down, starting or restarting (503); retrying shortly should work."""

    status = 503
    type = "server_error"
    code = "engine_unavailable"


class EngineOverloadedError(AgentError):
    """Every batch slot and queue place is taken (503); the OpenAI SDK retries after Retry-After."""

    status = 503
    type = "server_error"
    code = "server_overloaded"


class EngineFailedError(AgentError):
    """The engine failed while working on this request (500)."""

    status = 500
    type = "server_error"
    code = "engine_error"


class ConflictError(AgentError):
    """The request cannot be done in the current state of the device (409), e.g. no module is docked."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class UnprocessableError(AgentError):
    """The request is well-formed but cannot be satisfied (422), e.g. no offered PDO meets it."""

    status = 422
    type = "invalid_request_error"
    code = "unprocessable"


class ClusterUnavailableError(AgentError):
    """The cluster layer cannot answer (503): not running, or no quorum reachable from this box."""

    status = 503
    type = "server_error"
    code = "cluster_unavailable"
    retry_after = 2


class ClusterRequestError(AgentError):
    """A cluster request refused: joins and tokens (400 malformed, 403 bad token or CA mismatch, 409 already a
    member, 503) and model placement (400 too large or not a chat model, 404 unknown model or node, 500 failed)."""

    _TYPES = {
        400: "invalid_request_error",
        403: "permission_error",
        404: "invalid_request_error",
        409: "invalid_request_error",
    }

    def __init__(self, message: str, *, code: str, status: int) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.type = self._TYPES.get(status, "server_error")


class HardwareUnavailableError(AgentError):
    """A hardware driver failed or is absent (503); the message names the driver and what it said."""

    status = 503
    type = "server_error"
    code = "hardware_unavailable"
    retry_after = 5


class AuthenticationError(AgentError):
    """No API key, or one that is wrong or revoked (401).

    The product docs promise type "authentication_error"; the code is the one OpenAI sends for a bad key.
    """

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(AgentError):
    """The client is known (or needs no key) but may not do this (403): source address, Host/Origin, key scope."""

    status = 403
    # The product docs promise type "permission_error"; the code says which of our checks refused.
    type = "permission_error"
    code = "permission_denied"


class RateLimitError(AgentError):
    """The client's request bucket is empty (429); Retry-After and the x-ratelimit-* headers say when to come back."""

    status = 429
    # OpenAI's own 429 for a requests-per-minute limit: type "requests", code "rate_limit_exceeded".
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        retry_after: int,
        headers: dict[str, str] | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code, retry_after=retry_after)
        # Response headers the middleware copies onto the 429 (Retry-After and x-ratelimit-*).
        self.headers: dict[str, str] = dict(headers or {})
