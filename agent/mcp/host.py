"""The MCP host: a session with every enabled server, kept alive, and tool calls through the permission policy.

Each enabled server runs in a task of its own (`ServerSession`): start it (stdio) or connect (HTTP), list its
tools, then ping it every few seconds; when it dies or stops answering, it is reported (`mcp_server_crashed`)
and started again after a backoff (1 s, doubling to 30 s; reset once it has run for a minute). The stdio
transport is asynchronous and every call has a timeout, so a server that hangs or floods cannot hold the event
loop. Its stderr goes to `<home>/logs/mcp-NAME.log`.

`McpHost.run` reloads `servers.json` and `policy.json` when they change (`thox mcp enable` takes effect within a
second) and starts or stops sessions to match. Every call is audited in the log under topic `mcp`
(`mcp_tool_call`: caller, server, tool, sha256 of the arguments, result size, duration, allowed or denied);
with `mcp.debug` the arguments and the result themselves are logged too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

import httpx2
import structlog
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, Tool

from agent.errors import AgentError, InvalidRequestError, NotFoundError, PermissionDeniedError
from agent.mcp.config import McpConfigError, PolicyFile, ServerPolicy, ServerSpec, all_servers
from agent.settings import McpSettings, Settings

log = structlog.get_logger("agent.mcp")

HEALTH_PING_SECONDS = 5.0
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0
STABLE_AFTER_SECONDS = 60.0
RELOAD_POLL_SECONDS = 1.0
_DEBUG_PREVIEW = 2000


class McpToolError(AgentError):
    """An MCP server failed a call (crashed, timed out, or cannot be reached): 502 to an HTTP client."""

    status = 502
    type = "server_error"
    code = "mcp_server_error"


@dataclass(frozen=True)
class CallOutcome:
    """One tool call's result as the model and the client see it."""

    server: str
    tool: str
    arguments: dict[str, Any]
    text: str
    is_error: bool
    structured: dict[str, Any] | None = None


def describe(exc: BaseException) -> str:
    """An exception as one line, through the task-group wrappers anyio puts around a server's failure."""
    while isinstance(inner := getattr(exc, "exceptions", None), tuple) and inner:  # an ExceptionGroup (3.10 too)
        exc = inner[0]
    return f"{type(exc).__name__}: {exc}"


def _text_of(result: CallToolResult) -> str:
    parts = []
    for block in result.content:
        text = getattr(block, "text", None)
        parts.append(text if isinstance(text, str) else f"[{block.type} content]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content))
    return "\n".join(parts)


class ServerSession:
    """One server's life: started, listed, pinged, restarted after a crash."""

    def __init__(self, spec: ServerSpec, logs_dir: Path) -> None:
        self.spec = spec
        self._logs_dir = logs_dir
        self.state = "starting"
        self.error: str | None = None
        self.restarts = 0
        self.tools: dict[str, Tool] = {}
        self._client: Client | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._live(), name=f"mcp-{self.spec.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.state = "stopped"

    async def wait_ready(self, timeout: float) -> bool:
        """Whether the server is up (waiting up to `timeout` for a starting one)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)
        return self._client is not None

    async def call(self, tool: str, arguments: dict[str, Any], timeout: float) -> CallToolResult:
        client = self._client
        if client is None:
            raise McpToolError(f"MCP server {self.spec.name!r} is not running ({self.state}: {self.error or '-'})")
        try:
            return await asyncio.wait_for(client.call_tool(tool, arguments), timeout)
        except TimeoutError:
            raise McpToolError(f"MCP server {self.spec.name!r} did not answer {tool!r} within {timeout:g} s") from None
        except Exception as exc:  # the session broke under the call: the next ping restarts it
            raise McpToolError(f"MCP server {self.spec.name!r} failed calling {tool!r}: {describe(exc)}") from exc

    async def _live(self) -> None:
        delay = BACKOFF_FIRST_SECONDS
        while True:
            started = time.monotonic()
            try:
                await self._serve_once()
            except Exception as exc:  # a crash of the server (or its transport) is reported, then retried
                self.error = describe(exc)
            self.state = "crashed"
            self._client, self.tools = None, {}
            self._ready.clear()
            if time.monotonic() - started > STABLE_AFTER_SECONDS:
                delay = BACKOFF_FIRST_SECONDS
            log.warning("mcp_server_crashed", server=self.spec.name, error=self.error, restart_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_SECONDS)
            self.restarts += 1
            self.state = "starting"

    async def _serve_once(self) -> None:
        async with connected(self.spec, self._logs_dir) as client:
            listed = await asyncio.wait_for(client.list_tools(), HEALTH_PING_SECONDS * 2)
            self.tools = {tool.name: tool for tool in listed.tools}
            self._client, self.state, self.error = client, "running", None
            self._ready.set()
            log.info("mcp_server_started", server=self.spec.name, tools=len(self.tools), restarts=self.restarts)
            while True:
                await asyncio.sleep(HEALTH_PING_SECONDS)
                await asyncio.wait_for(client.send_ping(), HEALTH_PING_SECONDS)


@contextlib.asynccontextmanager
async def connected(spec: ServerSpec, logs_dir: Path) -> AsyncIterator[Client]:
    """A client session with the server `spec` describes: its process started (stdio; stderr appended to
    `logs_dir/mcp-NAME.log`) or its URL reached, ended on exit."""
    if spec.url is not None:
        async with (
            httpx2.AsyncClient(headers=spec.headers, timeout=30) as http,
            Client(streamable_http_client(spec.url, http_client=http), mode="auto") as client,
        ):
            yield client
        return
    assert spec.command is not None
    errlog = await asyncio.to_thread(_open_errlog, spec, logs_dir)
    try:
        env = {name: os.environ[name] for name in ("PATH", "LANG", "LC_ALL", "TZ") if name in os.environ}
        env.update(spec.env)
        params = StdioServerParameters(command=spec.command, args=list(spec.args), env=env, cwd=spec.cwd)
        transport: Any = stdio_client(params, errlog=errlog)
        async with Client(transport, mode="legacy") as client:
            yield client
    finally:
        await asyncio.to_thread(errlog.close)


def _open_errlog(spec: ServerSpec, logs_dir: Path) -> TextIO:
    logs_dir.mkdir(parents=True, exist_ok=True)
    if spec.cwd:
        Path(spec.cwd).mkdir(parents=True, exist_ok=True)
    return (logs_dir / f"mcp-{spec.name}.log").open("a", encoding="utf-8")


class McpHost:
    """Every hosted server's session, and the one way to call their tools."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.options: McpSettings = settings.mcp
        self._policy_file = PolicyFile(settings.mcp_dir)
        self.specs: dict[str, ServerSpec] = {}
        self.policies: dict[str, ServerPolicy] = {}
        self.config_error: str | None = None
        self.sessions: dict[str, ServerSession] = {}
        self._stamp: tuple[float | None, float | None] | None = None

    # --------------------------------------------------------------------------------- the subsystem

    async def run(self) -> None:
        """Keep the sessions in line with the files until cancelled, then stop every server."""
        try:
            while True:
                stamp = await asyncio.to_thread(self._files_stamp)
                if stamp != self._stamp:
                    self._stamp = stamp
                    await self._reload()
                await asyncio.sleep(RELOAD_POLL_SECONDS)
        finally:
            sessions, self.sessions = list(self.sessions.values()), {}
            await asyncio.gather(*(session.stop() for session in sessions), return_exceptions=True)

    def _files_stamp(self) -> tuple[float | None, float | None]:
        def mtime(name: str) -> float | None:
            try:
                return (self._settings.mcp_dir / name).stat().st_mtime
            except OSError:
                return None

        return mtime("servers.json"), mtime("policy.json")

    async def _reload(self) -> None:
        try:
            specs = await asyncio.to_thread(all_servers, self._settings)
            policies = await asyncio.to_thread(self._policy_file.load)
        except McpConfigError as exc:
            self.config_error = str(exc)
            log.error("mcp_config_invalid", error=str(exc))
            return
        self.config_error = None
        self.specs = {spec.name: spec for spec in specs}
        self.policies = {spec.name: self._policy_file.policy(spec, policies) for spec in specs}
        wanted = {name for name, spec in self.specs.items() if self.policies[name].enabled and spec.unavailable is None}
        for name in [n for n in self.sessions if n not in wanted or self.sessions[n].spec != self.specs.get(n)]:
            await self.sessions.pop(name).stop()
            log.info("mcp_server_stopped", server=name)
        for name in sorted(wanted - set(self.sessions)):
            session = ServerSession(self.specs[name], self._settings.home / "logs")
            self.sessions[name] = session
            session.start()

    def prepare_settings(self, settings: Settings) -> Any:
        """Live config applier: mcp.debug, mcp.call_timeout_seconds and mcp.max_tool_rounds."""

        def commit() -> None:
            self.options = settings.mcp

        return commit

    # ------------------------------------------------------------------------------------------ views

    def status(self) -> dict[str, Any]:
        """Every known server with its policy and state (for `thox mcp list` and the console)."""
        servers = []
        for name, spec in self.specs.items():
            session = self.sessions.get(name)
            policy = self.policies[name]
            state = "unavailable" if spec.unavailable else (session.state if session else "disabled")
            servers.append(
                {
                    "name": name,
                    "builtin": spec.builtin,
                    "transport": spec.transport,
                    "state": state,
                    "error": spec.unavailable or (session.error if session else None),
                    "restarts": session.restarts if session else 0,
                    "tools": sorted(session.tools) if session else [],
                    **policy.as_json(),
                }
            )
        return {"servers": servers, "config_error": self.config_error}

    def reads_only(self, server: str, tool: str) -> bool:
        spec, session = self.specs[server], self.sessions.get(server)
        if spec.read_tools is not None:
            return tool in spec.read_tools
        described = session.tools.get(tool) if session else None
        return bool(described and described.annotations and described.annotations.read_only_hint)

    async def session(self, server: str) -> ServerSession:
        """The running session of an enabled server (waiting a little for one that is starting)."""
        spec = self.specs.get(server)
        if spec is None:
            raise NotFoundError(f"no MCP server {server!r}; known: {', '.join(sorted(self.specs)) or 'none'}")
        if spec.unavailable:
            raise InvalidRequestError(f"MCP server {server!r} cannot run on this box: {spec.unavailable}")
        session = self.sessions.get(server)
        if session is None:
            raise PermissionDeniedError(f"MCP server {server!r} is disabled; enable it with `thox mcp enable {server}`")
        if not await session.wait_ready(self.options.call_timeout_seconds):
            raise McpToolError(f"MCP server {server!r} is not running ({session.state}: {session.error or '-'})")
        return session

    def max_tool_rounds(self) -> int:
        return self.options.max_tool_rounds

    async def tool_list(self, server: str) -> dict[str, Tool]:
        """The tools of a running server, by name (the AgentErrors of `session` otherwise)."""
        return dict((await self.session(server)).tools)

    # ------------------------------------------------------------------------------------------ calls

    async def call(self, server: str, tool: str, arguments: dict[str, Any], caller: str) -> CallOutcome:
        """Call `tool` on `server` for `caller` if the policy allows it; audited either way."""
        session = await self.session(server)
        digest = hashlib.sha256(json.dumps(arguments, sort_keys=True).encode()).hexdigest()[:16]
        audit: dict[str, Any] = {"caller": caller, "server": server, "tool": tool, "arguments_sha256": digest}
        if self.options.debug:
            audit["arguments"] = json.dumps(arguments)[:_DEBUG_PREVIEW]
        if tool not in session.tools:
            log.info("mcp_tool_call", **audit, decision="denied", reason="unknown tool")
            raise NotFoundError(
                f"MCP server {server!r} has no tool {tool!r}; it has {', '.join(sorted(session.tools))}"
            )
        refusal = self.policies[server].refusal(tool, self.reads_only(server, tool))
        if refusal is not None:
            log.info("mcp_tool_call", **audit, decision="denied", reason=refusal)
            raise PermissionDeniedError(f"MCP server {server!r}: {refusal}", code="mcp_tool_denied")
        started = time.monotonic()
        try:
            result = await session.call(tool, arguments, self.options.call_timeout_seconds)
        except McpToolError as exc:
            log.warning("mcp_tool_call", **audit, decision="allowed", error=exc.message, duration_ms=_ms(started))
            raise
        text = _text_of(result)
        extra = {"result": text[:_DEBUG_PREVIEW]} if self.options.debug else {}
        log.info(
            "mcp_tool_call",
            **audit,
            decision="allowed",
            is_error=result.is_error,
            result_bytes=len(text.encode()),
            duration_ms=_ms(started),
            **extra,
        )
        structured = cast(dict[str, Any] | None, result.structured_content)
        return CallOutcome(server, tool, arguments, text, bool(result.is_error), structured)


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
