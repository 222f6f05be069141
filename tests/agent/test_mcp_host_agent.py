"""The MCP host inside a real agent, driven by the `thox mcp` commands as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.agent_process import RunningAgent, start_agent
from tests.waiting import eventually


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    running = start_agent(tmp_path_factory.mktemp("mcp-host-home"))
    yield running
    assert running.stop() == 0


def thox(agent: RunningAgent, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args, "--home", str(agent.home)],
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


def servers(agent: RunningAgent) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in json.loads(thox(agent, "mcp", "list", "--json").stdout)}


def test_enable_list_permissions_and_disable_through_the_cli(agent: RunningAgent) -> None:
    listed = servers(agent)
    assert {"filesystem", "git", "fetch", "shell"} <= set(listed)
    assert listed["shell"]["enabled"] is False and listed["shell"]["state"] == "disabled"

    assert "shell enabled" in thox(agent, "mcp", "enable", "shell").stdout
    eventually(lambda: servers(agent)["shell"]["state"] == "running", "the shell server running", 30)
    assert servers(agent)["shell"]["tools"] == ["run_command"]

    thox(agent, "mcp", "permissions", "set", "shell", "--deny", "run_command")
    shown = thox(agent, "mcp", "permissions", "list").stdout
    assert "run_command" in shown.split("shell", 1)[1].splitlines()[0]
    assert servers(agent)["shell"]["deny"] == ["run_command"]

    thox(agent, "mcp", "disable", "shell")
    eventually(lambda: servers(agent)["shell"]["state"] == "disabled", "the shell server stopped", 30)
    logs = thox(agent, "logs", "--filter", "mcp").stdout
    assert "mcp_server_started" in logs and "mcp_server_stopped" in logs


def test_cli_errors_are_clear(agent: RunningAgent) -> None:
    unknown = thox(agent, "mcp", "enable", "nope", check=False)
    assert unknown.returncode == 2 and "no MCP server 'nope'" in unknown.stderr
    tested = thox(agent, "mcp", "test", "shell")
    assert "shell: ok" in tested.stdout and "run_command" in tested.stdout


def test_a_custom_http_server_is_reached_by_url_with_its_headers(agent: RunningAgent) -> None:
    # The agent's own /mcp as a custom Streamable HTTP server of its host: the url/headers shape of servers.json.
    url = agent.inference_url.removesuffix("/v1") + "/mcp"
    entry = {"url": url, "headers": {"User-Agent": "thox-mcp-host-test"}}
    (agent.home / "mcp").mkdir(exist_ok=True)
    (agent.home / "mcp" / "servers.json").write_text(json.dumps({"mcpServers": {"self": entry}}))
    eventually(lambda: servers(agent)["self"]["state"] == "running", "the HTTP server connected", 30)
    row = servers(agent)["self"]
    assert row["transport"] == "http" and row["builtin"] is False and row["enabled"] is True
    assert row["tools"] == ["thox_complete", "thox_explain", "thox_refactor", "thox_test"]
