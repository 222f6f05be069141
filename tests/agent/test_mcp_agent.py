"""/mcp on a real agent and its real model: the SDK client in both eras, the MCP Inspector CLI, the official
conformance suite's generic scenarios (DNS-rebinding protection included), and the Host/Origin checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mcp import Client

from tests.agent_process import RunningAgent, http_json
from tests.node_tools import run_node

INSPECTOR = "node_modules/@modelcontextprotocol/inspector/clients/launcher/build/index.js"
CONFORMANCE = "node_modules/@modelcontextprotocol/conformance/dist/index.js"
# The suite's generic scenarios; the others need its fixture tools (test_simple_text, ...), which a product has not.
CONFORMANCE_SCENARIOS = ["server-initialize", "ping", "tools-list", "dns-rebinding-protection"]


def mcp_url(agent: RunningAgent) -> str:
    return agent.inference_url.removesuffix("/v1") + "/mcp"


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_tool_runs_on_the_real_model(running_agent: RunningAgent, mode: str) -> None:
    async with Client(mcp_url(running_agent), mode=mode) as client:
        result = await client.call_tool("thox_explain", {"code": "def add(a, b):\n    return a + b", "max_tokens": 24})
    assert not result.is_error, result.content
    structured = result.structured_content
    assert structured is not None and structured["model"] == "smollm2-135m-instruct"
    assert structured["text"].strip() and structured["finish_reason"] in ("stop", "length")
    assert 0 < structured["completion_tokens"] <= 24
    assert json.loads(result.content[0].text) == structured  # type: ignore[union-attr]  # the same JSON as text


@pytest.mark.parametrize("era", ["legacy", "modern"])
def test_the_inspector_cli_lists_and_calls_the_tools(running_agent: RunningAgent, era: str, tmp_path: Path) -> None:
    base = [INSPECTOR, "--cli", mcp_url(running_agent), "--protocol-era", era, "--format", "json"]
    listed = run_node([*base, "--method", "tools/list"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    names = {tool["name"] for tool in json.loads(listed.stdout)["result"]["tools"]}
    assert names == {"thox_complete", "thox_explain", "thox_refactor", "thox_test"}
    call = ["--method", "tools/call", "--tool-name", "thox_complete", "--tool-arg", "code=def square(x):"]
    called = run_node([*base, *call, "--tool-arg", "max_tokens=12"], tmp_path)
    assert called.returncode == 0, called.stderr
    result = json.loads(called.stdout)["result"]
    assert result["isError"] is False and result["structuredContent"]["completion_tokens"] <= 12
    refused = run_node([*base, *call[:-1], "code="], tmp_path)  # code must not be empty
    assert refused.returncode != 0


@pytest.mark.parametrize("scenario", CONFORMANCE_SCENARIOS)
def test_the_conformance_suite_passes_its_generic_scenarios(
    running_agent: RunningAgent, scenario: str, tmp_path: Path
) -> None:
    ran = run_node(
        [CONFORMANCE, "server", "--url", mcp_url(running_agent), "--scenario", scenario, "-o", str(tmp_path)], tmp_path
    )
    report = ran.stdout + ran.stderr
    assert ran.returncode == 0 and "0 failed" in report, report


def test_mcp_refuses_other_hosts_and_origins(running_agent: RunningAgent) -> None:
    discover = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    for headers in ({"Host": "evil.example"}, {"Origin": "http://evil.example"}):
        status, _, body = http_json("POST", mcp_url(running_agent), discover, headers)
        assert status == 403 and body["error"]["code"] == "host_not_allowed", body
