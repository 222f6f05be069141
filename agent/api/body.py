"""Request bodies shared by both APIs: JSON decoding and pydantic validation into OpenAI-style 400s."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from agent.errors import InvalidRequestError

_ModelT = TypeVar("_ModelT", bound=BaseModel)

# Pydantic names the union member that failed inside `loc` ("stop.str", "prompt.list[int]"); those are not
# parameters a client sent, so they are dropped from `param`.
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


# A lone UTF-16 surrogate (an unpaired "\ud800" escape, or its bytes with json's surrogatepass decoding) makes a
# str that no UTF-8 encoder accepts: the tokenizer, log files and the cluster store would fail on it far from here.
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _param_of(location: tuple[int | str, ...], payload: Any) -> str:
    param = ""
    node = payload
    for index, part in enumerate(location):
        # A part that names a key the client sent is a parameter, whatever its spelling ("max-tokens" included);
        # one that does not, and looks like a tag, names a union member or validator, not a parameter.
        sent = isinstance(node, dict) and part in node
        if not sent and isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part):
            continue
        # A discriminated union (tools: "function" | "mcp") names the member by the object's "type" value; it is
        # a tag, not a key, unless the key of that name is what the next part goes into.
        following = location[index + 1] if index + 1 < len(location) else None
        if isinstance(node, dict) and part == node.get("type") and (not sent or following in node):
            continue
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
        if sent or (isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)):
            node = node[part]
        else:
            node = None
    return param


def _lone_surrogate(payload: Any) -> tuple[str, str] | None:
    """The first (param, character) where a decoded body holds a lone surrogate; iterative, as bodies nest deeply."""
    stack: list[tuple[Any, str]] = [(payload, "")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, str):
            found = _SURROGATE.search(node)
            if found:
                return where, found.group()
        elif isinstance(node, dict):
            children: list[tuple[Any, str]] = []
            for key, value in node.items():
                name = f"{where}.{key}" if where else key
                found = _SURROGATE.search(key)
                if found:
                    return name, found.group()
                children.append((value, name))
            stack.extend(reversed(children))
        elif isinstance(node, list):
            stack.extend((node[i], f"{where}[{i}]") for i in reversed(range(len(node))))
    return None


def decode_json(raw: bytes | str) -> Any:
    """Decode a JSON request body; InvalidRequestError when it is not JSON or its text is not valid Unicode."""
    try:
        # json.loads(bytes) does exactly this decoding; done here so the text can be checked before parsing.
        text = raw if isinstance(raw, str) else raw.decode(json.detect_encoding(raw), "surrogatepass")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    encoded = _SURROGATE.search(text)
    if encoded:
        raise InvalidRequestError(
            f"the request body is not valid Unicode text: it holds an encoded UTF-16 surrogate "
            f"({encoded.group()!r}) at character {encoded.start()}; send UTF-8",
            code="invalid_json",
        )
    try:
        payload = json.loads(text)
    except RecursionError:
        raise InvalidRequestError(
            "the request body nests JSON arrays or objects too deeply to parse; flatten it",
            code="invalid_json",
        ) from None
    except ValueError as exc:  # JSONDecodeError, and int()'s digit limit for a number thousands of digits long
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if _SURROGATE_ESCAPE.search(text):
        lone = _lone_surrogate(payload)
        if lone is not None:
            param, char = lone
            where = f"Invalid value for '{param}'" if param else "Invalid request body"
            raise InvalidRequestError(
                f"{where}: it holds a lone UTF-16 surrogate ({char!r}), which is not valid Unicode; escape "
                "characters outside the BMP as surrogate pairs",
                param=param or None,
                code="invalid_value",
            )
    return payload


def parse_body(model: type[_ModelT], payload: Any) -> _ModelT:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the offending parameter."""
    if not isinstance(payload, dict):
        raise InvalidRequestError("the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        param = _param_of(tuple(error["loc"]), payload)
        if error["type"] == "extra_forbidden":
            shown = f"{param}'' (an empty key)" if error["loc"][-1] == "" else param
            raise InvalidRequestError(
                f"Unrecognized request argument supplied: {shown}", param=param, code="unknown_parameter"
            ) from None
        if error["type"] == "missing":
            raise InvalidRequestError(
                f"Missing required parameter: '{param}'", param=param, code="missing_required_parameter"
            ) from None
        raise InvalidRequestError(
            f"Invalid value for '{param}': {error['msg']}", param=param, code="invalid_value"
        ) from None


async def read_json_body(request: web.Request) -> Any:
    """The decoded JSON body; a 400 for another content type or for malformed JSON."""
    if request.content_type != "application/json":
        raise InvalidRequestError(
            f"Content-Type must be application/json, got {request.content_type!r}", code="invalid_content_type"
        )
    return decode_json(await request.read())
