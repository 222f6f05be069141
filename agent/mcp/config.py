"""Which MCP servers the agent hosts and what they may do: built-ins, custom servers, and the policy file.

- Built-ins (off until `thox mcp enable NAME`): `filesystem` (the reference server, on Node 22 installed by
  `make setup`, limited to `mcp.filesystem_roots`), `git` (`mcp-server-git`, confined to `mcp.git_repository`),
  `fetch` (`mcp-server-fetch`, web pages as markdown; it refuses private and loopback addresses) and `shell`
  (ours, agent/mcp/shell_server.py: an allow-list of commands, no shell syntax, a timeout, an output cap).
- Custom servers: `<home>/mcp/servers.json` in Claude Desktop's shape, `{"mcpServers": {NAME: {"command", "args",
  "env", "cwd"} | {"url", "headers"}}}`, loaded at start and whenever the file changes; enabled unless disabled.
- `<home>/mcp/policy.json` (written by `thox mcp enable|disable|permissions set`, atomically): per server
  `enabled`, `read_only`, `allow` and `deny` tool lists. A tool call is refused when the tool is in `deny`;
  else allowed when it is in `allow`; else, with `read_only`, allowed only for read tools (our own list for the
  built-ins; for custom servers, the tools they annotate `readOnlyHint`). Annotations of built-ins are not
  trusted for this: the lists below are.
"""

from __future__ import annotations

import json
import platform
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.atomic import atomic_write_bytes
from agent.errors import ThoxError
from agent.settings import Settings

SERVERS_FILE = "servers.json"
POLICY_FILE = "policy.json"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$"

# Tools of the built-ins that only read (the reference servers' names, checked against their tools/list).
FILESYSTEM_READ_TOOLS = frozenset(
    {
        "read_file",
        "read_text_file",
        "read_media_file",
        "read_multiple_files",
        "list_directory",
        "list_directory_with_sizes",
        "directory_tree",
        "search_files",
        "get_file_info",
        "list_allowed_directories",
    }
)
GIT_READ_TOOLS = frozenset(
    {"git_status", "git_diff_unstaged", "git_diff_staged", "git_diff", "git_log", "git_show", "git_branch"}
)
FETCH_READ_TOOLS = frozenset({"fetch"})
SHELL_READ_TOOLS: frozenset[str] = frozenset()


class McpConfigError(ThoxError):
    """servers.json or policy.json cannot be read or says something impossible; the message names the file."""


@dataclass(frozen=True)
class ServerSpec:
    """How to start (or reach) one server."""

    name: str
    builtin: bool
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # The tools that only read (None: trust the server's readOnlyHint annotations).
    read_tools: frozenset[str] | None = None
    # Why it cannot run on this box (a missing component), or None.
    unavailable: str | None = None

    @property
    def transport(self) -> str:
        return "http" if self.url else "stdio"


@dataclass(frozen=True)
class ServerPolicy:
    """What one server may do."""

    enabled: bool
    read_only: bool = False
    allow: frozenset[str] = frozenset()
    deny: frozenset[str] = frozenset()

    def refusal(self, tool: str, reads_only: bool) -> str | None:
        """None when `tool` may be called, else why not."""
        if tool in self.deny:
            return f"tool {tool!r} is denied (thox mcp permissions set ... --deny)"
        if tool in self.allow:
            return None
        if self.read_only and not reads_only:
            return f"tool {tool!r} can change things and the server is read-only (thox mcp permissions)"
        return None

    def as_json(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "read_only": self.read_only,
            "allow": sorted(self.allow),
            "deny": sorted(self.deny),
        }


# ------------------------------------------------------------------------------------------------ built-ins


def node_modules_dir() -> Path:
    """Where `make setup` installs the Node servers (beside the Python environment the agent runs from)."""
    return Path(sys.prefix) / "mcp-node" / "node_modules"


def _list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def builtin_servers(settings: Settings) -> list[ServerSpec]:
    """The built-in servers with this box's settings."""
    mcp = settings.mcp
    workspace = str(settings.workspace_dir)
    roots = _list(mcp.filesystem_roots) or [workspace]
    arch = {"x86_64": "x64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    node = node_modules_dir() / f"node-linux-{arch}" / "bin" / "node"
    server = node_modules_dir() / "@modelcontextprotocol" / "server-filesystem" / "dist" / "index.js"
    missing = None if node.is_file() and server.is_file() else f"needs Node 22 and the filesystem server in {server}"
    python = sys.executable
    repository = Path(mcp.git_repository or workspace)
    not_a_repo = (
        None if (repository / ".git").exists() else f"{repository} is not a git repository (mcp.git_repository)"
    )
    return [
        ServerSpec(
            "filesystem",
            True,
            str(node),
            (str(server), *roots),
            cwd=workspace,
            read_tools=FILESYSTEM_READ_TOOLS,
            unavailable=missing + " (run make setup)" if missing else None,
        ),
        ServerSpec(
            "git",
            True,
            python,
            ("-m", "mcp_server_git", "--repository", str(repository)),
            cwd=workspace,
            read_tools=GIT_READ_TOOLS,
            unavailable=not_a_repo,
        ),
        ServerSpec("fetch", True, python, ("-m", "mcp_server_fetch"), cwd=workspace, read_tools=FETCH_READ_TOOLS),
        ServerSpec(
            "shell",
            True,
            python,
            (
                "-m",
                "agent.mcp.shell_server",
                "--cwd",
                workspace,
                "--allow",
                ",".join(_list(mcp.shell_allow)),
                "--timeout",
                str(mcp.shell_timeout_seconds),
                "--max-output",
                str(mcp.shell_max_output_bytes),
            ),
            cwd=workspace,
            read_tools=SHELL_READ_TOOLS,
        ),
    ]


# ------------------------------------------------------------------------------------------- servers.json


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    command: str | None = Field(None, min_length=1)
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    url: str | None = Field(None, pattern=r"^https?://")
    headers: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_transport(self) -> _Entry:
        if (self.command is None) == (self.url is None):
            raise ValueError("give either 'command' (a program to start) or 'url' (a Streamable HTTP endpoint)")
        return self


class _ServersFile(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)  # Claude Desktop's file carries other sections

    mcpServers: dict[str, _Entry] = Field(default_factory=dict)  # noqa: N815 - the file's own key


def custom_servers(directory: Path, builtin_names: set[str]) -> list[ServerSpec]:
    """The servers of `<home>/mcp/servers.json` (none when the file does not exist); McpConfigError names the
    file and the entry when it is not valid."""
    path = directory / SERVERS_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise McpConfigError(f"{path}: cannot be read: {exc.strerror}") from exc
    try:
        parsed = _ServersFile.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise McpConfigError(f"{path}: {where}: {first['msg']}") from None
    specs = []
    for name, entry in parsed.mcpServers.items():
        if name in builtin_names:
            raise McpConfigError(f"{path}: server {name!r} has the name of a built-in server; rename it")
        if re.fullmatch(_NAME, name) is None:
            raise McpConfigError(f"{path}: server name {name!r} must be 1-32 letters, digits, '-' or '_'")
        specs.append(
            ServerSpec(
                name,
                False,
                entry.command,
                tuple(entry.args),
                dict(entry.env),
                entry.cwd,
                entry.url,
                dict(entry.headers),
            )
        )
    return specs


# ------------------------------------------------------------------------------------------------ policy


class PolicyFile:
    """`<home>/mcp/policy.json`: every server's ServerPolicy (built-ins off, custom servers on, by default)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / POLICY_FILE

    def load(self) -> dict[str, ServerPolicy]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise McpConfigError(f"{self.path}: cannot be read: {exc}") from exc
        servers = data.get("servers") if isinstance(data, dict) else None
        if not isinstance(servers, dict):
            raise McpConfigError(f'{self.path}: expected {{"servers": {{NAME: {{...}}}}}}')
        policies = {}
        for name, entry in servers.items():
            try:
                policies[name] = ServerPolicy(
                    enabled=bool(entry["enabled"]),
                    read_only=bool(entry.get("read_only", False)),
                    allow=frozenset(str(t) for t in entry.get("allow", [])),
                    deny=frozenset(str(t) for t in entry.get("deny", [])),
                )
            except (KeyError, TypeError, AttributeError) as exc:
                raise McpConfigError(f"{self.path}: server {name!r}: bad entry ({exc})") from exc
        return policies

    def policy(self, spec: ServerSpec, policies: dict[str, ServerPolicy]) -> ServerPolicy:
        return policies.get(spec.name) or ServerPolicy(enabled=not spec.builtin)

    def save(self, policies: dict[str, ServerPolicy]) -> None:
        body = {"servers": {name: p.as_json() for name, p in sorted(policies.items())}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, (json.dumps(body, indent=2) + "\n").encode(), mode=0o600)

    def update(self, spec: ServerSpec, **changes: Any) -> ServerPolicy:
        """Change one server's policy and write the file; the new policy."""
        policies = self.load()
        policy = replace(self.policy(spec, policies), **changes)
        policies[spec.name] = policy
        self.save(policies)
        return policy


def all_servers(settings: Settings) -> list[ServerSpec]:
    """Built-ins, then the custom servers (McpConfigError for a bad servers.json)."""
    builtins = builtin_servers(settings)
    return builtins + custom_servers(settings.mcp_dir, {s.name for s in builtins})
