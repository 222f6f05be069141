"""Keys, scopes, rate limits and Host checks through a real agent (api.auth = always, loopback rate-limited)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx2
import openai
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from openai.types.chat import ChatCompletionMessageParam

from tests.agent_process import RunningAgent, http_json, start_agent

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]
CHAT = {"messages": MESSAGES, "max_tokens": 2}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    agent = start_agent(
        tmp_path_factory.mktemp("guarded"),
        env={"THOX_API_AUTH": "always", "THOX_API_RATE_LIMIT_LOOPBACK": "true", "THOX_API_RATE_LIMIT": "4"},
    )
    yield agent
    assert agent.stop() == 0


def thox(agent: RunningAgent, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", *args, "--home", str(agent.home)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_and_scopes(guarded: RunningAgent) -> None:
    inference_key = thox(guarded, "api-key", "generate", "--name", "editor")
    admin_key = thox(guarded, "api-key", "generate", "--name", "ops", "--scope", "admin")

    status, headers, body = http_json("POST", f"{guarded.inference_url}/chat/completions", CHAT)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert body["error"]["code"] == "missing_api_key" and headers["www-authenticate"].startswith("Bearer")
    status, _, body = http_json("POST", f"{guarded.inference_url}/chat/completions", CHAT, bearer("thox_x_wrong"))
    assert status == 401 and body["error"]["code"] == "invalid_api_key"

    client = openai.OpenAI(base_url=guarded.inference_url, api_key=inference_key, max_retries=0)
    assert client.chat.completions.create(model="", messages=MESSAGES, max_tokens=2).choices

    status, _, body = http_json("GET", f"{guarded.cluster_url}/power/contract", headers=bearer(inference_key))
    assert status == 403 and body["error"]["type"] == "permission_error"
    assert body["error"]["code"] == "insufficient_scope"
    assert http_json("GET", f"{guarded.cluster_url}/power/contract", headers=bearer(admin_key))[0] == 200
    assert http_json("GET", f"{guarded.cluster_url}/health")[0] == 200  # health needs no key

    # Regenerating while the agent runs: the old secret stops working on the very next request.
    key_id = "key_" + inference_key.split("_")[1]
    new_key = thox(guarded, "api-key", "regenerate", key_id)
    assert http_json("GET", f"{guarded.inference_url}/models", headers=bearer(inference_key))[0] == 401
    assert http_json("GET", f"{guarded.inference_url}/models", headers=bearer(new_key))[0] == 200
    listed = thox(guarded, "api-key", "list", "--json")
    assert new_key not in listed and inference_key not in listed and key_id in listed
    thox(guarded, "api-key", "revoke", key_id)
    assert http_json("GET", f"{guarded.inference_url}/models", headers=bearer(new_key))[0] == 401


def test_rate_limit_answers_429_with_headers_and_the_sdk_waits(guarded: RunningAgent) -> None:
    key = thox(guarded, "api-key", "generate", "--name", "burst")
    statuses = []
    for _ in range(5):
        status, headers, body = http_json("GET", f"{guarded.inference_url}/models", headers=bearer(key))
        statuses.append(status)
    assert statuses == [200, 200, 200, 200, 429]
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert headers["x-ratelimit-limit-requests"] == "4" and headers["x-ratelimit-remaining-requests"] == "0"
    assert int(headers["retry-after"]) >= 1 and headers["x-ratelimit-reset-requests"]
    # The OpenAI SDK honours Retry-After and succeeds once a token has refilled (4/min: one every 15 s).
    patient = openai.OpenAI(base_url=guarded.inference_url, api_key=key, max_retries=3, timeout=120)
    assert patient.models.list().data


def test_foreign_host_and_origin_are_refused(guarded: RunningAgent) -> None:
    key = thox(guarded, "api-key", "generate", "--name", "hosts")
    for headers in ({"Host": "evil.example"}, {"Host": "127.0.0.1.evil.example"}, {"Origin": "http://evil.example"}):
        status, _, body = http_json("GET", f"{guarded.cluster_url}/health", headers={**bearer(key), **headers})
        assert status == 403 and body["error"]["code"] == "host_not_allowed", headers
    assert http_json("GET", f"{guarded.cluster_url}/health", headers={"Host": "thox.local:5381"})[0] == 200


async def test_mcp_needs_a_key_like_the_api(guarded: RunningAgent) -> None:
    url = guarded.inference_url.removesuffix("/v1") + "/mcp"
    request = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    status, headers, body = http_json("POST", url, request)
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    assert headers["www-authenticate"].startswith("Bearer")
    key = thox(guarded, "api-key", "generate", "--name", "mcp-client")
    async with (
        httpx2.AsyncClient(headers=bearer(key)) as http,
        Client(streamable_http_client(url, http_client=http), mode="2026-07-28") as client,
    ):
        assert len((await client.list_tools()).tools) == 4
