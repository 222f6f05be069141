"""Regressions for the defects schemathesis found against the official spec, one focused test each."""

from __future__ import annotations

from typing import Any

import pytest

from tests.agent_process import RunningAgent, http_json
from tests.contract.sse import streamed_chunks

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/chat/completions", "POST"),
        ("TRACE", "/completions", "POST"),
        ("DELETE", "/models", "GET, HEAD"),
        ("PUT", "/models/smollm2-135m-instruct", "GET, HEAD"),
    ],
)
def test_405_lists_the_allowed_methods(running_agent: RunningAgent, method: str, path: str, allow: str) -> None:
    # RFC 9110 15.5.6: a 405 must carry Allow; the envelope used to replace aiohttp's response without it.
    status, headers, body = http_json(method, f"{running_agent.inference_url}{path}")
    assert status == 405, body
    assert headers.get("allow") == allow, headers
    assert body["error"]["code"] == "method_not_allowed"


def test_405_on_the_cluster_api_lists_the_allowed_methods(running_agent: RunningAgent) -> None:
    status, headers, _ = http_json("POST", f"{running_agent.cluster_url}/health")
    assert status == 405
    assert "GET" in headers.get("allow", "").split(", "), headers


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        ("/chat/completions", {"messages": QUESTION}),
        ("/completions", {"prompt": "The capital of France is"}),
    ],
)
def test_stream_null_means_not_streaming(running_agent: RunningAgent, path: str, extra: dict[str, Any]) -> None:
    # The spec declares `stream` nullable (default false); null was refused with a 400.
    status, headers, body = http_json(
        "POST", f"{running_agent.inference_url}{path}", {"model": MODEL, "max_tokens": 3, "stream": None, **extra}
    )
    assert status == 200, body
    assert headers["content-type"].startswith("application/json")
    assert body["object"] in ("chat.completion", "text_completion")


def test_top_p_zero_is_greedy(running_agent: RunningAgent) -> None:
    # The spec allows top_p 0 (its minimum); the sampler refused it, as a 400 or, when streaming, as an error event
    # after the 200. The nucleus of top_p -> 0 is the single most likely token, so the answer is the greedy one.
    url = f"{running_agent.inference_url}/chat/completions"
    answers = []
    for sampling in ({"top_p": 0, "temperature": 1.5, "seed": 1}, {"temperature": 0}):
        status, _, body = http_json("POST", url, {"model": MODEL, "messages": QUESTION, "max_tokens": 12, **sampling})
        assert status == 200, body
        answers.append(body["choices"][0]["message"]["content"])
    assert answers[0] == answers[1]
    chunks = streamed_chunks(url, {"model": MODEL, "messages": QUESTION, "max_tokens": 12, "top_p": 0, "stream": True})
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == answers[1]


def test_a_message_name_is_accepted(running_agent: RunningAgent) -> None:
    # OpenAI's spec allows `name` on system, user and assistant messages; it was refused as an unknown parameter.
    messages = [
        {"role": "system", "content": "Answer briefly.", "name": "rules"},
        {"role": "user", "content": "What is the capital of France?", "name": "alice"},
    ]
    status, _, body = http_json(
        "POST",
        f"{running_agent.inference_url}/chat/completions",
        {"model": MODEL, "messages": messages, "max_tokens": 3},
    )
    assert status == 200, body
