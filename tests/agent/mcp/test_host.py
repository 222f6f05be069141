"""The MCP host with real servers (the filesystem reference server on Node 22, mcp-server-git, our shell server):
permissions, path confinement, the shell's allow-list, custom servers, audits, and restart after a crash."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.errors import NotFoundError, PermissionDeniedError
from agent.mcp.config import PolicyFile, ServerPolicy, all_servers
from agent.mcp.host import McpHost, McpToolError
from agent.settings import Settings, load_settings
from tests.waiting import until

pytestmark = pytest.mark.allow_blocking("the tests write the policy and files the servers read, from the test itself")


def settings_for(home: Path, **mcp: str) -> Settings:
    env = {f"THOX_MCP_{key.upper()}": value for key, value in mcp.items()}
    return load_settings(home=home, env=env)


def enable(settings: Settings, name: str, **policy: Any) -> None:
    files = PolicyFile(settings.mcp_dir)
    policies = files.load()
    policies[name] = ServerPolicy(enabled=True, **policy)
    files.save(policies)


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[McpHost, Settings]]:
    settings = settings_for(tmp_path / "home")
    settings.workspace_dir.mkdir(parents=True)
    (settings.workspace_dir / "notes.txt").write_text("The secret word is pineapple.\n")
    host = McpHost(settings)
    task = asyncio.create_task(host.run())
    try:
        yield host, settings
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def running_server(host: McpHost, name: str) -> None:
    await until(lambda: name in host.sessions and host.sessions[name].state == "running", f"{name} running", 30)


def test_built_ins_are_listed_and_off_by_default(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    specs = {spec.name: spec for spec in all_servers(settings)}
    assert set(specs) == {"filesystem", "git", "fetch", "shell"}
    files = PolicyFile(settings.mcp_dir)
    assert not any(files.policy(spec, files.load()).enabled for spec in specs.values())
    assert specs["filesystem"].unavailable is None, "make setup installs Node 22 and the filesystem server"


async def test_the_filesystem_server_reads_inside_its_root_only_and_read_only_refuses_writes(
    running: tuple[McpHost, Settings],
) -> None:
    host, settings = running
    enable(settings, "filesystem")
    await running_server(host, "filesystem")
    notes = str(settings.workspace_dir / "notes.txt")
    read = await host.call("filesystem", "read_text_file", {"path": notes}, caller="test")
    assert not read.is_error and "pineapple" in read.text
    outside = await host.call("filesystem", "read_text_file", {"path": "/etc/hostname"}, caller="test")
    escape = await host.call("filesystem", "read_text_file", {"path": f"{settings.workspace_dir}/../x"}, caller="test")
    assert outside.is_error and escape.is_error  # the server confines every path to the configured roots
    written = await host.call(
        "filesystem", "write_file", {"path": f"{settings.workspace_dir}/new.txt", "content": "hi"}, caller="test"
    )
    assert not written.is_error and (settings.workspace_dir / "new.txt").read_text() == "hi"

    enable(settings, "filesystem", read_only=True)
    await until(lambda: host.policies["filesystem"].read_only, "the policy reloaded", 10)
    with capture_logs() as logs, pytest.raises(PermissionDeniedError, match="read-only"):
        await host.call("filesystem", "write_file", {"path": notes, "content": "gone"}, caller="key:abc")
    assert (settings.workspace_dir / "notes.txt").read_text().startswith("The secret word")
    (audit,) = [line for line in logs if line["event"] == "mcp_tool_call"]
    assert audit["decision"] == "denied" and audit["caller"] == "key:abc" and audit["tool"] == "write_file"
    assert "arguments" not in audit and len(audit["arguments_sha256"]) == 16  # digests, not contents
    assert not (await host.call("filesystem", "list_directory", {"path": str(settings.workspace_dir)}, "t")).is_error


async def test_the_shell_is_off_until_enabled_and_runs_only_allowed_commands_without_a_shell(
    running: tuple[McpHost, Settings],
) -> None:
    host, settings = running
    await until(lambda: "shell" in host.specs, "the servers loaded", 10)
    with pytest.raises(PermissionDeniedError, match="disabled"):
        await host.call("shell", "run_command", {"argv": ["echo", "hi"]}, caller="test")
    enable(settings, "shell")
    await running_server(host, "shell")
    echoed = await host.call("shell", "run_command", {"argv": ["echo", "$(id)", ";", "ls"]}, caller="test")
    assert echoed.structured is not None and echoed.structured["stdout"] == "$(id) ; ls\n"  # no shell expanded it
    for argv in (["rm", "-rf", "notes.txt"], ["/bin/echo", "x"], ["sh", "-c", "id"]):
        refused = await host.call("shell", "run_command", {"argv": argv}, caller="test")
        assert refused.is_error and "not allowed" in refused.text
    assert (settings.workspace_dir / "notes.txt").exists()
    with pytest.raises(NotFoundError, match="no tool"):
        await host.call("shell", "format_disk", {}, caller="test")


async def test_a_custom_server_from_servers_json_is_loaded_and_a_bad_file_is_reported(
    running: tuple[McpHost, Settings],
) -> None:
    host, settings = running
    settings.mcp_dir.mkdir(parents=True, exist_ok=True)
    custom = {
        "command": sys.executable,
        "args": ["-m", "agent.mcp.shell_server", "--cwd", str(settings.workspace_dir), "--allow", "cat"],
    }
    (settings.mcp_dir / "servers.json").write_text(json.dumps({"mcpServers": {"reader": custom}}))
    await running_server(host, "reader")  # custom servers are on unless disabled
    result = await host.call("reader", "run_command", {"argv": ["cat", "notes.txt"]}, caller="test")
    assert "pineapple" in result.text
    (settings.mcp_dir / "servers.json").write_text(json.dumps({"mcpServers": {"bad": {"args": []}}}))
    await until(lambda: host.config_error is not None, "the bad file reported", 10)
    assert "servers.json" in (host.config_error or "") and "command" in (host.config_error or "")


def _children_running(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and marker in cmdline:
            found.append(int(entry.name))
    return found


async def test_a_crashed_server_is_reported_and_restarted(running: tuple[McpHost, Settings]) -> None:
    host, settings = running
    enable(settings, "shell")
    await running_server(host, "shell")
    (pid,) = _children_running("agent.mcp.shell_server")
    with capture_logs() as logs:
        os.kill(pid, signal.SIGKILL)
        await until(lambda: host.sessions["shell"].restarts == 1, "a restart", 30)
        await running_server(host, "shell")
    assert any(line["event"] == "mcp_server_crashed" for line in logs)
    assert not (await host.call("shell", "run_command", {"argv": ["pwd"]}, caller="test")).is_error


async def test_the_git_server_is_confined_to_its_repository(running: tuple[McpHost, Settings]) -> None:
    host, settings = running
    await asyncio.to_thread(subprocess.run, ["git", "init", "-q", str(settings.workspace_dir)], check=True)
    enable(settings, "git")
    await running_server(host, "git")
    status = await host.call("git", "git_status", {"repo_path": str(settings.workspace_dir)}, caller="test")
    assert not status.is_error and "notes.txt" in status.text
    elsewhere = await host.call("git", "git_status", {"repo_path": "/"}, caller="test")
    assert elsewhere.is_error


async def test_a_server_that_never_answers_times_out_without_holding_anything_else(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "home", call_timeout_seconds="1")
    settings.mcp_dir.mkdir(parents=True)
    stalling = {"command": sys.executable, "args": [str(Path(__file__).with_name("hanging_server.py"))]}
    (settings.mcp_dir / "servers.json").write_text(json.dumps({"mcpServers": {"stalling": stalling}}))
    host = McpHost(settings)
    task = asyncio.create_task(host.run())
    try:
        await running_server(host, "stalling")
        stuck = asyncio.ensure_future(host.call("stalling", "stall", {}, caller="test"))
        # While one call hangs, the loop and the same server's other calls carry on.
        assert (await host.call("stalling", "ok", {}, caller="test")).text == "fine"
        with pytest.raises(McpToolError, match="did not answer 'stall' within 1 s"):
            await stuck
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_mcp_debug_logs_the_arguments_and_the_result(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "home", debug="true")
    settings.workspace_dir.mkdir(parents=True)
    enable(settings, "shell")
    host = McpHost(settings)
    task = asyncio.create_task(host.run())
    try:
        await running_server(host, "shell")
        with capture_logs() as logs:
            await host.call("shell", "run_command", {"argv": ["echo", "visible"]}, caller="test")
        (audit,) = [line for line in logs if line["event"] == "mcp_tool_call"]
        assert "visible" in audit["arguments"] and "visible" in audit["result"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
