"""Fuzzing request bodies: any bytes are a validated request or an InvalidRequestError naming what is wrong."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import BaseModel

from agent.api.body import decode_json, parse_body, read_json_body
from agent.api.middleware import request_context
from agent.api.openai.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from agent.errors import InvalidRequestError

MODELS: list[type[BaseModel]] = [ChatCompletionRequest, CompletionRequest, EmbeddingRequest]
CODES = {"invalid_json", "invalid_value", "unknown_parameter", "missing_required_parameter", "unsupported_parameter"}

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
_json: st.SearchStrategy[Any] = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_messages = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", ""])},
            optional={
                "content": st.one_of(
                    st.text(max_size=8),
                    _json,
                    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)})),
                ),
                "name": _json,
                "refusal": _json,
            },
        ),
        _json,
    ),
    max_size=3,
)
_sampling = {
    "model": _json,
    "stream": _json,
    "stream_options": _json,
    "temperature": _json,
    "top_p": _json,
    "seed": _json,
    "stop": st.one_of(st.lists(st.text(max_size=4), max_size=6), _json),
    "presence_penalty": _json,
    "frequency_penalty": _json,
    "user": _json,
    "n": _json,
    "logprobs": _json,
    "logit_bias": _json,
    "max_tokens": _json,
    "max_completion_tokens": _json,
    "tools": _json,
    "tool_choice": _json,
    "response_format": _json,
    "metadata": _json,
    "echo": _json,
    "suffix": _json,
    "max-tokens": _json,
    "": _json,
}
_requests = st.one_of(
    st.fixed_dictionaries({"messages": _messages}, optional=_sampling),
    st.fixed_dictionaries(
        {"prompt": st.one_of(st.text(max_size=8), st.lists(st.integers(0, 99)), _json)}, optional=_sampling
    ),
    st.fixed_dictionaries(
        {"input": st.one_of(st.text(max_size=8), st.lists(st.text(max_size=4)), st.lists(st.integers()), _json)},
        optional={"model": _json, "encoding_format": _json, "dimensions": _json, "user": _json, "x": _json},
    ),
    _json,
)


def _check_error(exc: InvalidRequestError, payload: Any) -> None:
    """The error is specific: a message, a known code, and a param that names something the client sent."""
    assert exc.message and exc.code in CODES, (exc.message, exc.code)
    if exc.code in ("unknown_parameter", "missing_required_parameter"):
        assert exc.param or exc.message.endswith("'' (an empty key)"), exc.message
        assert exc.param is not None, exc.message  # (a None here used to fail as a TypeError in endswith)
        assert exc.message.endswith((exc.param, f"'{exc.param}'", "(an empty key)")), exc.message
    if exc.param and isinstance(payload, dict) and exc.code == "unknown_parameter":
        top = exc.param.split(".")[0].split("[")[0]
        assert top in payload or exc.param in payload, (exc.param, list(payload))


def _validate(model: type[BaseModel], payload: Any) -> None:
    try:
        parse_body(model, payload)
    except InvalidRequestError as exc:
        _check_error(exc, payload)


@given(_requests)
@example({"messages": [{"role": "user", "content": "x"}], "max-tokens": 5})
@example({"messages": [{"role": "user", "content": "x", "a[b]": 1}]})
@example({"prompt": "x", "stop": {"str": 1}})
def test_any_json_value_is_a_request_or_a_specific_error(payload: Any) -> None:
    for model in MODELS:
        _validate(model, payload)


@given(st.binary(max_size=200))
@example(b"\xef\xbb\xbf{}")  # a UTF-8 byte order mark
@example(b"\xed\xa0\x80")  # a UTF-16 surrogate encoded as if it were UTF-8 (json decodes it with surrogatepass)
@example(b"\x00{\x00}")  # odd-looking UTF-16
@example(b'{"a":1' + b"0" * 5000 + b"}")  # a number longer than int()'s digit limit
def test_any_bytes_decode_or_are_invalid_json(raw: bytes) -> None:
    try:
        payload = decode_json(raw)
    except InvalidRequestError as exc:
        _check_error(exc, None)
        return
    json.dumps(payload).encode("utf-8")  # whatever decodes can be encoded again: no lone surrogates
    for model in MODELS:
        _validate(model, payload)


@given(_requests, st.data())
def test_lone_surrogates_anywhere_are_refused(payload: Any, data: st.DataObject) -> None:
    text = json.dumps(payload)
    at = data.draw(st.sampled_from([i for i, c in enumerate(text) if c == '"'] or [0]), label="quote")
    surrogate = data.draw(st.sampled_from(["\\ud800", "\\uDBFF", "\\udc00", "\\uDFFF", "\\ud83d"]), label="escape")
    raw = (text[: at + 1] + surrogate + text[at + 1 :]).encode()
    try:
        decoded = decode_json(raw)
    except InvalidRequestError as exc:
        _check_error(exc, None)
    else:  # the escape landed outside a string (invalid JSON is refused above) or completed a pair
        json.dumps(decoded, ensure_ascii=False).encode("utf-8")


@given(st.integers(1, 200_000), st.sampled_from(["[", '{"a":', '{"messages":[{"role":"user","content":']))
@example(100_000, "[")
@example(3_000, '{"a":')
def test_deeply_nested_json_is_refused_or_parsed(depth: int, opening: str) -> None:
    closing = {"[": "]", '{"a":': "}"}.get(opening, "}]}")
    raw = (opening * depth + "1" + closing * depth).encode()
    try:
        payload = decode_json(raw)
    except InvalidRequestError as exc:
        refusal: InvalidRequestError | None = exc
    else:
        refusal = None
    if refusal is not None:
        assert refusal.code == "invalid_json" and "too deeply" in refusal.message, refusal
        return
    for model in MODELS:
        _validate(model, payload)


# --- regressions ---------------------------------------------------------------------------------------------


def test_deep_nesting_is_a_400_not_a_recursion_error() -> None:
    # json.loads raised RecursionError, which the middleware turned into a 500 "internal error".
    with pytest.raises(InvalidRequestError, match="nests JSON arrays or objects too deeply") as caught:
        decode_json(b"[" * 100_000 + b"]" * 100_000)
    assert caught.value.code == "invalid_json"


@pytest.mark.parametrize(
    ("raw", "param", "match"),
    [
        (
            rb'{"messages":[{"role":"user","content":"a\ud800b"}]}',
            "messages[0].content",
            r"Invalid value for 'messages\[0\].content': it holds a lone UTF-16 surrogate \('\\ud800'\)",
        ),
        (rb'{"prompt":"\udfff"}', "prompt", "lone UTF-16 surrogate"),
        (rb'{"input":["ok","x\ud83d"]}', "input[1]", "lone UTF-16 surrogate"),
        (rb'{"\udc00":1}', "\udc00", "lone UTF-16 surrogate"),
    ],
)
def test_lone_surrogate_escapes_are_refused(raw: bytes, param: str, match: str) -> None:
    # Used to validate; the tokenizer then raised TypeError ("TextInputSequence must be str"): a 500.
    with pytest.raises(InvalidRequestError, match=match) as caught:
        decode_json(raw)
    assert (caught.value.param, caught.value.code) == (param, "invalid_value")


def test_encoded_surrogate_bytes_are_refused() -> None:
    # json.loads(bytes) decodes with surrogatepass, so CESU-style bytes made the same lone surrogate as above.
    with pytest.raises(InvalidRequestError, match=r"encoded UTF-16 surrogate \('\\ud800'\) at character 13"):
        decode_json(b'{"prompt": "a\xed\xa0\x80"}')


def test_surrogate_pairs_are_text() -> None:
    assert decode_json(rb'{"prompt":"\ud83d\ude00"}') == {"prompt": "\N{GRINNING FACE}"}


def test_text_already_decoded_is_checked_the_same_way() -> None:
    # For a websocket's text messages, which arrive decoded.
    assert decode_json('{"prompt":"\N{GRINNING FACE}"}') == {"prompt": "\N{GRINNING FACE}"}
    with pytest.raises(InvalidRequestError, match="too deeply"):
        decode_json("[" * 100_000)
    with pytest.raises(InvalidRequestError, match="lone UTF-16 surrogate"):
        decode_json('{"prompt":"\\ud800"}')


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        # A key with "-" or "[" in it was taken for a pydantic union tag and dropped: "Unrecognized request
        # argument supplied: " with param "" (or the parent's name).
        ({"messages": [{"role": "user", "content": "x"}], "max-tokens": 5}, "max-tokens"),
        ({"messages": [{"role": "user", "content": "x", "a[b]": 1}]}, "messages[0].a[b]"),
        ({"messages": [{"role": "user", "content": "x"}], "list[int]": 1}, "list[int]"),
    ],
)
def test_unknown_keys_are_named_whatever_their_spelling(payload: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_body(ChatCompletionRequest, payload)
    assert (caught.value.param, caught.value.code) == (param, "unknown_parameter")
    assert caught.value.message == f"Unrecognized request argument supplied: {param}"


def test_union_tags_are_still_not_params() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_body(CompletionRequest, {"prompt": "x", "stop": 5})
    assert caught.value.param == "stop"


def test_unsupported_value_is_quoted_briefly() -> None:
    # The whole value used to be repr()'d into the message: a 1 MB `tools` came back whole in the 400 (the
    # deprecated `functions` is still refused, so it carries the check now).
    functions = [{"name": "f" * 1_000_000}]
    with pytest.raises(InvalidRequestError, match="'functions' with value .* is not supported") as caught:
        parse_body(ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "functions": functions})
    assert len(caught.value.message) < 400


# --- through real HTTP and the real middleware ------------------------------------------------------------------


async def _chat(request: web.Request) -> web.Response:
    body = parse_body(ChatCompletionRequest, await read_json_body(request))
    return web.json_response({"messages": len(body.messages)})


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b'{"messages":[{"role":"user","content":"hi"}]}', 200, None),
        (b"[" * 50_000 + b"]" * 50_000, 400, "invalid_json"),
        (b'{"messages":[{"role":"user","content":"\\ud800"}]}', 400, "invalid_value"),
        (b'{"messages":[{"role":"user","content":"\xed\xa0\x80"}]}', 400, "invalid_json"),
        (b'{"messages":[{"role":"user","content":"x"}],"n":' + b"9" * 5000 + b"}", 400, "invalid_json"),
        (b'{"messages":[{"role":"user","content":"x"}],"max-tokens":1}', 400, "unknown_parameter"),
        (b"\xff\xfe\xfd", 400, "invalid_json"),
        (b'"just a string"', 400, "invalid_json"),
    ],
)
async def test_nasty_bodies_get_the_error_envelope_over_http(raw: bytes, status: int, code: str | None) -> None:
    app = web.Application(middlewares=[request_context])
    app.router.add_post("/v1/chat/completions", _chat)
    async with TestClient(TestServer(app)) as client:
        response = await client.post("/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"})
        body = await response.json()
    assert response.status == status, body
    if code is not None:
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert (body["error"]["type"], body["error"]["code"]) == ("invalid_request_error", code), body
