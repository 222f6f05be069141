"""Every failure leaves as the OpenAI error envelope with the right status, type, param and code."""

from __future__ import annotations

import json
import socket
import urllib.parse
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.agent_process import RunningAgent, http_json
from tests.waiting import eventually

QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]


def assert_envelope(body: Any, *, type_: str, param: str | None, code: str | None) -> None:
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"], error
    assert (error["type"], error["param"], error["code"]) == (type_, param, code), error


def chat(
    agent: RunningAgent, body: bytes | dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    return http_json("POST", f"{agent.inference_url}/chat/completions", body, headers)


def test_unknown_route(running_agent: RunningAgent) -> None:
    status, _, body = http_json("GET", f"{running_agent.inference_url}/nope")
    assert status == 404
    assert_envelope(body, type_="not_found_error", param=None, code="unknown_route")
    status, _, body = http_json("GET", f"{running_agent.cluster_url}/nope")
    assert status == 404
    assert_envelope(body, type_="not_found_error", param=None, code="unknown_route")


def test_wrong_method(running_agent: RunningAgent) -> None:
    status, headers, body = http_json("GET", f"{running_agent.inference_url}/chat/completions")
    assert status == 405
    assert_envelope(body, type_="invalid_request_error", param=None, code="method_not_allowed")
    assert "POST" in body["error"]["message"]


def test_malformed_json(running_agent: RunningAgent) -> None:
    status, _, body = chat(running_agent, b'{"messages": [')
    assert status == 400
    assert_envelope(body, type_="invalid_request_error", param=None, code="invalid_json")
    status, _, body = chat(running_agent, b"\x00\xff")
    assert status == 400
    status, _, body = chat(running_agent, b"[1, 2]")
    assert status == 400
    assert_envelope(body, type_="invalid_request_error", param=None, code="invalid_json")


def test_wrong_content_type(running_agent: RunningAgent) -> None:
    status, _, body = chat(running_agent, b"messages=hi", {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400
    assert_envelope(body, type_="invalid_request_error", param=None, code="invalid_content_type")


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({}, "messages", "missing_required_parameter"),
        ({"messages": []}, "messages", "invalid_value"),
        ({"messages": QUESTION, "temperature": 5}, "temperature", "invalid_value"),
        ({"messages": QUESTION, "top_p": -1}, "top_p", "invalid_value"),
        ({"messages": QUESTION, "max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "invalid_value"),
        ({"messages": QUESTION, "frobnicate": True}, "frobnicate", "unknown_parameter"),
        ({"messages": QUESTION, "n": 0}, "n", "invalid_value"),
        ({"messages": QUESTION, "top_logprobs": 2}, "top_logprobs", "invalid_value"),
        ({"messages": QUESTION, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
        ({"messages": QUESTION, "modalities": ["text", "audio"]}, "modalities", "unsupported_parameter"),
        (
            {
                "messages": QUESTION,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}},
            },
            "response_format.json_schema.schema",
            "unsupported_parameter",
        ),
        ({"messages": QUESTION, "functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        (
            {"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "has space"}}]},
            "tools[0].function.name",
            "invalid_value",
        ),
        ({"messages": QUESTION, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
                    }
                ]
            },
            "messages[0].content[0].type",
            "unsupported_parameter",
        ),
    ],
)
def test_schema_violations_name_the_parameter(
    running_agent: RunningAgent, body: dict[str, Any], param: str, code: str
) -> None:
    status, _, reply = chat(running_agent, body)
    assert status == 400, reply
    assert_envelope(reply, type_="invalid_request_error", param=param, code=code)


def test_text_content_parts_are_accepted(running_agent: RunningAgent) -> None:
    status, _, body = chat(
        running_agent,
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is the capital "},
                        {"type": "text", "text": "of France?"},
                    ],
                }
            ],
            "temperature": 0,
            "max_tokens": 30,
        },
    )
    assert status == 200, body
    assert "Paris" in body["choices"][0]["message"]["content"]


def test_oversized_body(running_agent: RunningAgent) -> None:
    huge = {"messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    status, _, body = chat(running_agent, huge)
    assert status == 413
    assert_envelope(body, type_="invalid_request_error", param=None, code="request_too_large")


def test_prompt_longer_than_the_context(running_agent: RunningAgent) -> None:
    status, _, body = chat(running_agent, {"messages": [{"role": "user", "content": "hello " * 3000}]})
    assert status == 400
    assert_envelope(body, type_="invalid_request_error", param="messages", code="context_length_exceeded")
    status, _, body = chat(running_agent, {"messages": QUESTION, "max_tokens": 100000})
    assert status == 400
    assert_envelope(body, type_="invalid_request_error", param="max_tokens", code="context_length_exceeded")


def test_completions_errors(running_agent: RunningAgent) -> None:
    url = f"{running_agent.inference_url}/completions"
    status, _, body = http_json("POST", url, {"prompt": ["a", "b"]})
    assert status == 400
    assert_envelope(body, type_="invalid_request_error", param="prompt", code="unsupported_parameter")
    status, _, body = http_json("POST", url, {"prompt": [999999]})
    assert status == 400
    assert_envelope(body, type_="invalid_request_error", param="prompt", code="invalid_value")
    status, _, body = http_json("POST", url, {"prompt": "x", "echo": True})
    assert status == 400
    assert_envelope(body, type_="invalid_request_error", param="echo", code="unsupported_parameter")


def test_sdk_sees_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(messages=QUESTION, model="smollm2-135m-instruct", modalities=["audio"])
    assert info.value.code == "unsupported_parameter"
    assert info.value.param == "modalities"
    assert info.value.request_id  # X-Request-ID reaches the SDK


def raw_exchange(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client library would send a NUL in a header) and read the whole answer."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize("api", ["inference_url", "cluster_url"])
def test_a_request_the_http_parser_refuses_gets_the_envelope_and_one_warning(
    running_agent: RunningAgent, api: str
) -> None:
    status, headers, body = raw_exchange(
        getattr(running_agent, api), b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Bad: a\x00b\r\n\r\n"
    )
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert_envelope(json.loads(body), type_="invalid_request_error", param=None, code="bad_http_request")
    request_id = headers["x-request-id"]

    def logged() -> list[dict[str, Any]]:
        return [line for line in running_agent.log_lines() if line.get("request_id") == request_id]

    [line] = eventually(logged, "the refusal logged")
    assert line["event"] == "http_request_unparsable" and line["level"] == "warning"
    assert not [line for line in running_agent.log_lines() if line.get("logger") == "aiohttp.server"]
