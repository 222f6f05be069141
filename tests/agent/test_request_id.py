"""X-Request-ID: accepted when sane, generated otherwise, echoed everywhere and present in the logs."""

from __future__ import annotations

import time
from typing import Any

import openai

from tests.agent_process import RunningAgent, http_json
from tests.waiting import eventually


def test_client_request_id_is_echoed_and_logged(running_agent: RunningAgent) -> None:
    request_id = f"test-{time.monotonic_ns()}"
    status, headers, body = http_json(
        "POST",
        f"{running_agent.inference_url}/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        {"X-Request-ID": request_id},
    )
    assert status == 200, body
    assert headers["x-request-id"] == request_id

    def logged() -> list[dict[str, Any]]:
        lines = [line for line in running_agent.log_lines() if line.get("request_id") == request_id]
        assert any(line["event"] == "chat_completion" for line in lines), lines
        return lines

    eventually(logged, "the request's chat_completion line in the log")


def test_request_id_is_generated_on_every_response(running_agent: RunningAgent) -> None:
    _, ok_headers, _ = http_json("GET", f"{running_agent.inference_url}/models")
    _, error_headers, _ = http_json("GET", f"{running_agent.inference_url}/missing")
    _, health_headers, _ = http_json("GET", f"{running_agent.cluster_url}/health")
    ids = {ok_headers["x-request-id"], error_headers["x-request-id"], health_headers["x-request-id"]}
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)


def test_streaming_response_carries_the_request_id(client: openai.OpenAI) -> None:
    with client.chat.completions.with_streaming_response.create(
        messages=[{"role": "user", "content": "Hi"}],
        model="smollm2-135m-instruct",
        max_tokens=2,
        stream=True,
        extra_headers={"X-Request-ID": "stream-id-1"},
    ) as response:
        assert response.headers["x-request-id"] == "stream-id-1"
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "data: [DONE]" in response.read().decode()


def test_invalid_request_id_is_refused(running_agent: RunningAgent) -> None:
    status, headers, body = http_json(
        "GET", f"{running_agent.inference_url}/models", headers={"X-Request-ID": "bad id with spaces"}
    )
    assert status == 400
    assert body["error"]["param"] == "X-Request-ID"
    assert headers["x-request-id"] != "bad id with spaces"
