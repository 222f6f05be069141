"""The OpenAI-compatible API against OpenAI's own OpenAPI spec (normalised: tests/contract/openai_spec.py).

schemathesis generates requests for the five operations we serve from the spec (valid ones and broken ones) and
checks every response: no 5xx, every status documented, every content type documented, every body (and every SSE
event of a streamed answer) valid against the spec's schema, a 405 with an Allow header for other methods, and a
401 when the API key is left out or wrong. The streaming tests check each `data:` chunk of a whole stream, which
schemathesis does not (it reads at most 20 events of a stream).

The agent is the real `thox serve` with the bundled models, set to want a key from every client (api.auth "always"),
so the spec's bearer security is really enforced. A 64-token context bounds what any generated request can cost
the CPU (about 2 s of generation at most), so the whole run stays well within a minute on two cores.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.agent_process import RunningAgent, http_json, start_agent
from tests.contract.openai_spec import normalised_spec, validate_event
from tests.contract.sse import streamed_chunks

ST = Path(sys.executable).with_name("st")

# Every check about the server's own behaviour and its contract. Left out on purpose: negative_data_rejection and
# positive_data_acceptance, which judge how strictly requests are validated, where the product deliberately differs
# from the spec: `model` may be omitted (the loaded default answers), null counts as omitted for optional
# parameters, and some spec-valid values it does not implement (`max_tokens: 0`, a null `prompt`, `stream_options`
# without `stream`) get a 400 naming them. Those rules have their own tests in tests/agent.
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "unsupported_method",
    "allow_header_conformance",
    "ignored_auth",
)
# Test cases per operation and phase: about 700 requests in all, some 30 s on two cores.
MAX_EXAMPLES = 30
RUN_TIMEOUT_S = 240
# Log events that mean the server failed a request: a 500, or an error event inside a 200 stream.
CRASH_EVENTS = {"request_crashed", "stream_crashed", "stream_failed"}


@dataclass(frozen=True)
class Contract:
    agent: RunningAgent
    key: str
    chat_models: list[str]
    embedding_models: list[str]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture(scope="module")
def contract(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Contract]:
    agent = start_agent(
        tmp_path_factory.mktemp("contract-home"), env={"THOX_ENGINE_MAX_CONTEXT": "64", "THOX_API_AUTH": "always"}
    )
    try:
        key = subprocess.run(
            [sys.executable, "-m", "agent.cli", "api-key", "generate", "--name", "contract", "--home", str(agent.home)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
        status, _, body = http_json("GET", f"{agent.inference_url}/models", headers={"Authorization": f"Bearer {key}"})
        assert status == 200, body
        chat = [m["id"] for m in body["data"] if "chat.completions" in m.get("capabilities", [])]
        embedding = [m["id"] for m in body["data"] if "embeddings" in m.get("capabilities", [])]
        assert chat and embedding, body
        yield Contract(agent, key, chat, embedding)
    finally:
        assert agent.stop() == 0


def test_schemathesis_finds_no_server_error_and_no_contract_violation(contract: Contract, tmp_path: Path) -> None:
    spec_path = tmp_path / "openai-normalised.json"
    spec_path.write_text(json.dumps(normalised_spec(contract.chat_models, contract.embedding_models)))
    command = [
        str(ST),
        "run",
        str(spec_path),
        "--url",
        contract.agent.inference_url,
        "--checks",
        ",".join(CHECKS),
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--workers",
        "2",
        "--request-timeout",
        "60",
        "--generation-database",
        "none",
        "--no-color",
        "--output-sanitize",
        "false",
    ]
    # The key goes in last and is masked in the report; the seed schemathesis prints reproduces a failing run.
    secret = ["--header", f"Authorization: Bearer {contract.key}"]
    started = time.monotonic()
    result = subprocess.run(
        command + secret, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )
    elapsed = time.monotonic() - started
    report = (
        f"$ {shlex.join(command)} --header 'Authorization: Bearer <key>'\n"
        f"(exit {result.returncode} after {elapsed:.0f} s)\n{result.stdout}\n{result.stderr}"
    )
    assert result.returncode == 0, report

    log = contract.agent.log_lines()
    events = [line.get("event") for line in log]
    crashes = [event for event in events if event in CRASH_EVENTS]
    assert not crashes, f"the agent logged {crashes}:\n{report}"
    # The run reached the models, not only the validation paths (the examples phase alone sends a valid request to
    # each operation), and the ignored_auth check's requests without a key or with a wrong one got their 401.
    served = {kind: events.count(kind) for kind in ("chat_completion", "completion", "embeddings")}
    assert all(served.values()), f"no request reached the engine for some operation: {served}\n{report}"
    assert any(line.get("event") == "request_failed" and line.get("status") == 401 for line in log), report


# ------------------------------------------------------------------------------------------- streamed chunks


def test_streamed_chat_chunks_match_the_spec(contract: Contract) -> None:
    chunks = streamed_chunks(
        f"{contract.agent.inference_url}/chat/completions",
        {
            "model": contract.chat_models[0],
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        contract.auth,
    )
    for chunk in chunks:
        validate_event(chunk, "CreateChatCompletionStreamResponse")
    *content, usage = chunks
    # include_usage: every chunk carries `usage: null`, and one last chunk has no choices and the counts.
    assert usage["choices"] == [] and 0 < usage["usage"]["completion_tokens"] <= 8, usage
    assert all(chunk["usage"] is None for chunk in content), content
    finishes = [choice["finish_reason"] for chunk in content for choice in chunk["choices"]]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1]), finishes
    assert content[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({chunk["id"] for chunk in chunks}) == 1
    # The logprobs entries were validated with their chunks (ChatCompletionTokenLogprob).
    assert any(choice["logprobs"] for chunk in content for choice in chunk["choices"]), content


def test_streamed_completion_chunks_match_the_spec(contract: Contract) -> None:
    chunks = streamed_chunks(
        f"{contract.agent.inference_url}/completions",
        {
            "model": contract.chat_models[0],
            "prompt": "Once upon a time",
            "max_tokens": 8,
            "temperature": 0,
            "logprobs": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        contract.auth,
    )
    for chunk in chunks:
        # Streamed completions are CreateCompletionResponse objects, with a null finish_reason until the last.
        validate_event(chunk, "CreateCompletionStreamResponse")
    *content, usage = chunks
    assert usage["choices"] == [] and 0 < usage["usage"]["completion_tokens"] <= 8, usage
    finishes = [choice["finish_reason"] for chunk in content for choice in chunk["choices"]]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1]), finishes
    assert any(choice["logprobs"] for chunk in content for choice in chunk["choices"]), content
    # The chunk that carries the finish reason, and the usage chunk, are whole CreateCompletionResponse objects too.
    for chunk in (content[-1], usage):
        validate_event(chunk, "CreateCompletionResponse")
