"""OpenAI's official OpenAPI spec (the vendored subset beside this file), normalised to what this product documents.

The subset is kept verbatim; every change is made here, at load time, as one small transformation with its reason.
Each one either repairs a defect of the upstream document (it says one thing in prose and another in schema, or
does not validate), declares a response the product documents (the OpenAI error envelope on 4xx/503, SSE on
`stream: true`), or, on the request side only, narrows what a generator sends to what this server implements and
points the examples at the installed models. None of them widens what a successful response may look like beyond
what the official API itself sends, so a real bug in our server still fails the contract.

`normalised_spec()` is what schemathesis runs against; `validate_event()` checks one decoded SSE `data:` object.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from openapi_schema_validator import OAS30Validator

SUBSET = Path(__file__).with_name("openai-openapi-subset.yaml")

# (method, path) of every operation this server implements; the subset holds exactly these.
SERVED_OPERATIONS = (
    ("POST", "/chat/completions"),
    ("POST", "/completions"),
    ("POST", "/embeddings"),
    ("GET", "/models"),
    ("GET", "/models/{model}"),
)

# The error object exactly as OpenAI's current spec defines it (components.schemas.Error and ErrorResponse);
# the subset's 2.3.0 document does not carry them because none of its five operations references them.
ERROR_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "nullable": True},
            "message": {"type": "string", "nullable": False},
            "param": {"type": "string", "nullable": True},
            "type": {"type": "string", "nullable": False},
        },
        "required": ["type", "message", "param", "code"],
    },
    "ErrorResponse": {
        "type": "object",
        "properties": {"error": {"$ref": "#/components/schemas/Error"}},
        "required": ["error"],
    },
}

# The error statuses the product documents (agent/errors.py, README), per operation. Every route sits behind the
# same security middleware, so 401 (no or bad key from a remote client), 403 (source address, Host/Origin, key
# scope), 429 (rate limit) and 503 (the key store cannot be read) can answer any of them. The POST operations add
# 400 (invalid request, unsupported parameter, context length), 404 (unknown model), 413 (body over
# api.max_request_bytes) and 503 (engine starting, restarting or overloaded); GET /models/{model} adds 404.
# 422 and 409 belong to the cluster API only, and a 500 is never documented: it is always a bug.
_ANY_ROUTE = {
    "401": "No API key, or a wrong or revoked one (remote clients)",
    "403": "Refused by the source-address, Host/Origin or key-scope checks",
    "429": "Rate limit reached; Retry-After and x-ratelimit-* say when to retry",
    "503": "Temporarily unavailable (engine starting or overloaded, key store unreadable); Retry-After is set",
}
_BODY_ROUTE = {
    "400": "Invalid request: malformed JSON, invalid or unsupported parameter, context length exceeded",
    "404": "The requested model is not installed",
    "413": "The request body exceeds api.max_request_bytes",
}
ERROR_STATUSES: dict[tuple[str, str], dict[str, str]] = {
    ("POST", "/chat/completions"): {**_BODY_ROUTE, **_ANY_ROUTE},
    ("POST", "/completions"): {**_BODY_ROUTE, **_ANY_ROUTE},
    ("POST", "/embeddings"): {**_BODY_ROUTE, **_ANY_ROUTE},
    ("GET", "/models"): dict(_ANY_ROUTE),
    ("GET", "/models/{model}"): {"404": "No model with this id is installed", **_ANY_ROUTE},
}

# Operations that answer `stream: true` with server-sent events, and the schema of each event's JSON payload.
STREAMING = {
    "/chat/completions": "CreateChatCompletionStreamResponse",
    "/completions": "CreateCompletionStreamResponse",
}


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping in a YAML tree, parents before children."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _schemas(spec: dict[str, Any]) -> dict[str, Any]:
    schemas: dict[str, Any] = spec["components"]["schemas"]
    return schemas


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


@functools.cache
def _subset() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(SUBSET.read_text())
    return loaded


def dedupe_enums(spec: dict[str, Any]) -> None:
    """Upstream defect: CreateChatCompletionRequest.model lists "gpt-4o-2024-08-06" twice.

    JSON Schema requires enum items to be unique, so the document fails spec validation and jsonschema-based
    tools refuse it. Dropping the repeat changes no instance's validity.
    """
    for node in _walk(spec):
        values = node.get("enum")
        if isinstance(values, list):
            unique: list[Any] = []
            for value in values:
                if value not in unique:
                    unique.append(value)
            node["enum"] = unique


def add_null_to_nullable_enums(spec: dict[str, Any]) -> None:
    """Upstream defect: schemas marked `nullable: true` whose `enum` omits null (chunk `finish_reason`,
    `service_tier`).

    OpenAPI 3.0.3 clarified that an enum must list null for null to be valid, so taken literally these say "null
    allowed" and "null forbidden" at once, and strict validators reject every ordinary stream chunk (whose
    `finish_reason` is null until the last). The authors' intent, and what OpenAI sends, is null; only null is added.
    """
    for node in _walk(spec):
        values = node.get("enum")
        if node.get("nullable") is True and isinstance(values, list) and None not in values:
            values.append(None)


def add_error_responses(spec: dict[str, Any]) -> None:
    """Declare the OpenAI error envelope for the statuses we document (the subset declares only "200").

    OpenAI sends ErrorResponse bodies for every 4xx/5xx, and its SDKs parse them, but the spec declares almost none
    (research/openai_servers.md section 5, problem 3). Without them every correct 400/404 is an undocumented status.
    """
    _schemas(spec).update(copy.deepcopy(ERROR_SCHEMAS))
    for (method, path), statuses in ERROR_STATUSES.items():
        responses = spec["paths"][path][method.lower()]["responses"]
        for status, description in statuses.items():
            assert status not in responses, f"{method} {path} already declares {status}"
            responses[status] = {
                "description": description,
                "content": {"application/json": {"schema": _ref("ErrorResponse")}},
            }


def declare_event_streams(spec: dict[str, Any]) -> None:
    """Declare the `text/event-stream` 200 that `stream: true` documents (in the `stream` parameter's own prose).

    The spec leaves it out, so a correct streamed answer would be an undocumented content type. Each event is
    described the way OpenAPI 3.2's SSE item model (which schemathesis understands for earlier versions too) does:
    an object whose `data` is either the literal `[DONE]` terminator or JSON matching the operation's chunk schema.
    A mid-stream `{"error": ...}` event is deliberately not allowed: in this test it would mean the engine failed.
    """
    for path, chunk_schema in STREAMING.items():
        content = spec["paths"][path]["post"]["responses"]["200"]["content"]
        content["text/event-stream"] = {
            "schema": {
                "type": "object",
                "required": ["data"],
                "properties": {
                    "data": {
                        "type": "string",
                        "anyOf": [
                            {"enum": ["[DONE]"]},
                            {"contentMediaType": "application/json", "contentSchema": _ref(chunk_schema)},
                        ],
                    },
                },
            },
        }


def add_completion_stream_schema(spec: dict[str, Any]) -> None:
    """Streamed /completions chunks: CreateCompletionResponse with `finish_reason` nullable.

    The spec says streamed and whole completion objects "share the same shape", yet every chunk but the last has
    no finish reason yet, and OpenAI sends `"finish_reason": null` there (as it does, and the spec documents, for
    chat chunks). Only this new stream schema gets the null; the whole response keeps its non-null enum.
    """
    schemas = _schemas(spec)
    stream = copy.deepcopy(schemas["CreateCompletionResponse"])
    stream["description"] = "A streamed chunk of a completion (normalised: finish_reason is null until the last)."
    stream["properties"]["choices"]["items"]["properties"]["finish_reason"]["nullable"] = True
    schemas["CreateCompletionStreamResponse"] = stream


def make_stream_usage_nullable(spec: dict[str, Any]) -> None:
    """CreateChatCompletionStreamResponse.usage: the spec's own description says it "contains a null value except
    for the last chunk" when include_usage is set, but the schema (type: object) does not allow null; newer upstream
    releases mark it nullable. Only null is added; a present usage object is still checked in full."""
    _schemas(spec)["CreateChatCompletionStreamResponse"]["properties"]["usage"]["nullable"] = True


_BASE64 = r"^(?:[A-Za-z0-9+/]{4})+(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$|^(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)$"


def allow_base64_embeddings(spec: dict[str, Any]) -> None:
    """Embedding.embedding: with `encoding_format: "base64"` (a documented request option) OpenAI returns the
    vector as one base64 string, which the schema (array of numbers) forbids; openai/openai-openapi#424 (open,
    labelled bug). The string branch must be non-empty standard base64 (a pattern, since validators do not check
    `format: byte`), so any other string still fails."""
    embedding = _schemas(spec)["Embedding"]["properties"]["embedding"]
    vector = {key: embedding.pop(key) for key in ("type", "items")}
    embedding["oneOf"] = [vector, {"type": "string", "format": "byte", "pattern": _BASE64}]


def use_served_models(spec: dict[str, Any], chat_models: Sequence[str], embedding_models: Sequence[str]) -> None:
    """Point the `model` examples (and the enum of known ids) at the models this server has installed.

    The examples name OpenAI's hosted models ("gpt-4o", "text-embedding-3-small", and "gpt-4o-mini" for the path
    of GET /models/{model}, whose own comment says it should be "an actual ID"), so every example request would only
    ever reach our 404. The free-form `type: string` branch stays, so unknown ids are still generated.
    """
    request_schemas = {
        "CreateChatCompletionRequest": chat_models,
        "CreateCompletionRequest": chat_models,
        "CreateEmbeddingRequest": embedding_models,
    }
    for name, models in request_schemas.items():
        if not models:
            continue
        model = _schemas(spec)[name]["properties"]["model"]
        model["example"] = models[0]
        for branch in model["anyOf"]:
            if "enum" in branch:
                branch["enum"] = list(models)
    if chat_models:
        (parameter,) = spec["paths"]["/models/{model}"]["get"]["parameters"]
        parameter["schema"]["example"] = chat_models[0]


# Request parameters this server refuses with a 400 unless they carry their neutral value, which is what omitting
# them means (README, "API behaviour worth knowing": parameters we do not implement yet are refused with a 400
# naming them; the table is agent/api/openai/protocol.py).
NOT_IMPLEMENTED: dict[str, tuple[str, ...]] = {
    "CreateChatCompletionRequest": (
        "n",
        "top_logprobs",
        "logit_bias",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "functions",
        "function_call",
        # n, top_logprobs, logit_bias, tools, tool_choice, parallel_tool_calls, response_format (and tool calls in
        # the history) are implemented, but generated values would get 400s by design, which schemathesis would
        # count as refusing valid data: n above 16 (the spec allows 128), top_logprobs without logprobs (the spec
        # cannot say that one needs the other), logit_bias keys that are not token ids of the model (the spec's
        # map is free-form), schemas with a keyword the grammar engine cannot enforce. tests/agent/test_choices.py,
        # test_logprobs.py, test_logit_bias.py, test_structured_outputs.py and test_tool_calls.py cover them.
        "response_format",
    ),
    "CreateCompletionRequest": ("n", "logit_bias", "echo", "suffix", "best_of"),
    # Only the model's own size is accepted (it cannot shorten vectors).
    "CreateEmbeddingRequest": ("dimensions",),
    # Assistant turns echoed back: tool calls are left out with the tools above; function_call is not implemented.
    "ChatCompletionRequestAssistantMessage": ("tool_calls", "function_call"),
}
# Spec-valid values refused the same way: a null `prompt` (the spec's "<|endoftext|>" default document) and
# `max_tokens: 0` (useful only with `echo` and prompt logprobs, neither of which is implemented).
NOT_IMPLEMENTED_VALUES: dict[tuple[str, str], dict[str, Any]] = {
    ("CreateCompletionRequest", "prompt"): {"nullable": False},
    ("CreateCompletionRequest", "max_tokens"): {"minimum": 1},
}
# oneOf branches (by $ref) of the same kind: tool/function result messages and image content parts.
NOT_IMPLEMENTED_BRANCHES: dict[str, tuple[str, ...]] = {
    "ChatCompletionRequestMessage": ("ChatCompletionRequestToolMessage", "ChatCompletionRequestFunctionMessage"),
    "ChatCompletionRequestUserMessageContentPart": ("ChatCompletionRequestMessageContentPartImage",),
}


def restrict_to_implemented(spec: dict[str, Any]) -> None:
    """Drop the request parameters, values and message kinds we refuse; see NOT_IMPLEMENTED and the tables after it.

    This narrows what the generator sends, never what a response may contain. Without it nearly every generated
    request carries one of some twenty refused parameters, so the fuzzer almost never reaches the model and the
    200 (and streamed) responses go unchecked. The refusals themselves are covered by tests/agent.
    """
    schemas = _schemas(spec)
    for name, params in NOT_IMPLEMENTED.items():
        properties = schemas[name]["properties"]
        for param in params:
            del properties[param]
        required = schemas[name].get("required", [])
        assert not set(params) & set(required), f"{name}: cannot drop a required parameter"
    for (name, param), narrowed in NOT_IMPLEMENTED_VALUES.items():
        schemas[name]["properties"][param].update(narrowed)
    for name, refs in NOT_IMPLEMENTED_BRANCHES.items():
        branches = schemas[name]["oneOf"]
        kept = [branch for branch in branches if branch["$ref"].rsplit("/", 1)[-1] not in refs]
        assert len(kept) == len(branches) - len(refs), f"{name}: a branch to drop is missing"
        schemas[name]["oneOf"] = kept


def normalised_spec(
    chat_models: Iterable[str] = (), embedding_models: Iterable[str] = (), *, implemented_only: bool = True
) -> dict[str, Any]:
    """The vendored subset with every normalisation above applied (a fresh copy on each call).

    `implemented_only=False` keeps the refused parameters in the request schemas (the full official surface).
    """
    spec = copy.deepcopy(_subset())
    operations = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    assert operations == set(SERVED_OPERATIONS), f"the subset's operations are not the served ones: {operations}"
    if implemented_only:
        restrict_to_implemented(spec)
    dedupe_enums(spec)
    add_error_responses(spec)
    add_completion_stream_schema(spec)
    make_stream_usage_nullable(spec)
    add_null_to_nullable_enums(spec)
    declare_event_streams(spec)
    allow_base64_embeddings(spec)
    use_served_models(spec, list(chat_models), list(embedding_models))
    return spec


@functools.cache
def _validator(schema_name: str) -> OAS30Validator:
    spec = normalised_spec()
    # The root resource carries `components`, so the `#/components/schemas/...` references resolve inside it.
    return OAS30Validator({"$ref": f"#/components/schemas/{schema_name}", "components": spec["components"]})


def event_errors(event: Any, schema_name: str) -> list[str]:
    """Why a decoded SSE `data:` object does not match `schema_name` (OAS 3.0 rules, `nullable`); [] if it does."""
    errors = _validator(schema_name).iter_errors(event)
    return [f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}" for error in errors]


def validate_event(event: Any, schema_name: str) -> None:
    """Raise AssertionError naming every violation of `schema_name` in one decoded SSE `data:` object."""
    errors = event_errors(event, schema_name)
    assert not errors, f"{schema_name} violated by {event!r}:\n" + "\n".join(errors)
