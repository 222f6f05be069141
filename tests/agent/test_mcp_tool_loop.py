"""Chat completions that use the box's MCP servers: the agent runs the tool loop on the real model and the real
filesystem server, within its permissions, and the response shows the calls made."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.agent_process import RunningAgent, http_json, start_agent

SECRET = "The secret word is pineapple.\n"
FILESYSTEM = {
    "type": "mcp",
    "server_label": "filesystem",
    "allowed_tools": ["read_text_file"],
    "require_approval": "never",
}


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    home = tmp_path_factory.mktemp("mcp-loop-home")
    (home / "workspace").mkdir()
    (home / "workspace" / "notes.txt").write_text(SECRET)
    (home / "mcp").mkdir()
    policy = {"servers": {"filesystem": {"enabled": True, "read_only": True, "allow": [], "deny": []}}}
    (home / "mcp" / "policy.json").write_text(json.dumps(policy))
    running = start_agent(home)
    yield running
    assert running.stop() == 0


def ask(agent: RunningAgent, content: str, **extra: Any) -> tuple[int, dict[str, Any]]:
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 120, **extra}
    status, _, answer = http_json("POST", f"{agent.inference_url}/chat/completions", body)
    return status, answer


def test_the_model_reads_a_file_through_the_filesystem_server_and_answers_from_it(agent: RunningAgent) -> None:
    # A path relative to the workspace (the server's working folder), spelled out as the arguments: the bundled
    # 135M model copies that reliably, where it invents extra arguments when left to itself.
    question = 'Read notes.txt ({"path": "notes.txt"}) and tell me the secret word.'
    status, answer = ask(agent, question, tools=[FILESYSTEM], tool_choice="required")
    assert status == 200, answer
    (call,) = answer["mcp_calls"][:1]
    assert call["type"] == "mcp_call" and call["server_label"] == "filesystem" and call["name"] == "read_text_file"
    assert json.loads(call["arguments"]) == {"path": "notes.txt"}
    assert call["error"] is None and call["output"] == SECRET
    message = answer["choices"][0]["message"]
    assert answer["choices"][0]["finish_reason"] in ("stop", "length") and "tool_calls" not in message
    assert "pineapple" in message["content"].lower()
    assert answer["usage"]["prompt_tokens"] > 2 * len(SECRET) // 4  # two rounds, the second with the file in it


def test_the_sdk_sees_the_answer_and_the_calls(agent: RunningAgent) -> None:
    client = openai.OpenAI(base_url=agent.inference_url, api_key="unused", max_retries=0)
    completion = client.chat.completions.create(  # type: ignore[call-overload]
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": 'What does notes.txt say? ({"path": "notes.txt"})'}],
        tools=[FILESYSTEM],
        tool_choice="required",
        temperature=0,
        max_tokens=120,
    )
    assert completion.choices[0].message.content
    assert (completion.model_extra or {})["mcp_calls"][0]["name"] == "read_text_file"


def test_permissions_hold_inside_the_loop(agent: RunningAgent) -> None:
    # The server is read-only: a write the model is made to attempt is refused, and it hears why.
    write = {**FILESYSTEM, "allowed_tools": ["write_file"]}
    target = agent.home / "workspace" / "notes.txt"
    question = 'Write hello to notes.txt ({"path": "notes.txt", "content": "hello"}).'
    status, answer = ask(agent, question, tools=[write], tool_choice="required")
    assert status == 200, answer
    assert answer["mcp_calls"], answer
    call = answer["mcp_calls"][0]
    assert call["name"] == "write_file" and "read-only" in call["error"]
    assert target.read_text() == SECRET
    logs = [line for line in agent.log_lines() if line.get("event") == "mcp_tool_call"]
    assert any(line["decision"] == "denied" and line["tool"] == "write_file" for line in logs)
    assert all(line["caller"].startswith("address:") for line in logs)  # loopback needs no key: the address


@pytest.mark.parametrize(
    ("tools", "extra", "param"),
    [
        ([{**FILESYSTEM, "allowed_tools": ["format_disk"]}], {}, "tools[0].allowed_tools"),
        ([FILESYSTEM], {"stream": True}, "stream"),
        ([FILESYSTEM], {"n": 2}, "n"),
        ([{**FILESYSTEM, "require_approval": "always"}], {}, "tools[0].require_approval"),
    ],
)
def test_bad_mcp_tool_requests_are_400s(
    agent: RunningAgent, tools: list[dict[str, Any]], extra: dict[str, Any], param: str
) -> None:
    status, answer = ask(agent, "Hi", tools=tools, **extra)
    assert status == 400 and answer["error"]["param"] == param, answer


def test_a_disabled_server_is_refused_by_name(agent: RunningAgent) -> None:
    status, answer = ask(agent, "Hi", tools=[{**FILESYSTEM, "server_label": "shell", "allowed_tools": None}])
    assert status == 403 and "thox mcp enable shell" in answer["error"]["message"], answer
