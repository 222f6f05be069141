"""Request bodies shared by both APIs: JSON decoding and pydantic validation into OpenAI-style 400s."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from agent.errors import InvalidRequestError

_ModelT = TypeVar("_ModelT", bound=BaseModel)

# Pydantic names the union member that failed inside `loc` ("stop.str", "prompt.list[int]"); those are not
# parameters a client sent, so they are dropped from `param`.
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _param_of(location: tuple[int | str, ...]) -> str:
    param = ""
    for part in location:
        if isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part):
            continue
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    return param


def parse_body(model: type[_ModelT], payload: Any) -> _ModelT:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the offending parameter."""
    if not isinstance(payload, dict):
        raise InvalidRequestError("the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        param = _param_of(tuple(error["loc"]))
        if error["type"] == "extra_forbidden":
            raise InvalidRequestError(f"Unrecognized request argument supplied: {param}", param=param,
                                      code="unknown_parameter") from None
        if error["type"] == "missing":
            raise InvalidRequestError(f"Missing required parameter: '{param}'", param=param,
                                      code="missing_required_parameter") from None
        raise InvalidRequestError(f"Invalid value for '{param}': {error['msg']}", param=param,
                                  code="invalid_value") from None


async def read_json_body(request: web.Request) -> Any:
    """The decoded JSON body; a 400 for another content type or for malformed JSON."""
    if request.content_type != "application/json":
        raise InvalidRequestError(
            f"Content-Type must be application/json, got {request.content_type!r}", code="invalid_content_type")
    raw = await request.read()
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
