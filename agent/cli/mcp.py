"""`thox mcp list|enable|disable|test|permissions`: the MCP servers this box hosts and what they may do.

`enable`, `disable` and `permissions set` write `<home>/mcp/policy.json`; a running agent applies it within a
second. `list` shows the running agent's view (state, tools) when an agent serves this home, else the files'.
`test` starts the server from this command, lists its tools and says how long that took.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from rich.table import Table

from agent.cli.common import call_cluster, endpoints, err, home_of, out
from agent.mcp.config import McpConfigError, PolicyFile, ServerSpec, all_servers
from agent.mcp.host import connected, describe
from agent.settings import Settings, SettingsError, load_settings


def _setup(args: argparse.Namespace) -> tuple[Settings, dict[str, ServerSpec], PolicyFile] | None:
    try:
        settings = load_settings(home=home_of(args))
        specs = {spec.name: spec for spec in all_servers(settings)}
    except (SettingsError, McpConfigError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        return None
    return settings, specs, PolicyFile(settings.mcp_dir)


def _spec(args: argparse.Namespace, specs: dict[str, ServerSpec]) -> ServerSpec | None:
    spec = specs.get(args.name)
    if spec is None:
        err.print(f"[red]error:[/red] no MCP server {args.name!r}; known: {', '.join(specs)}")
    return spec


def _rows(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """The servers as the running agent sees them, else as the files describe them."""
    setup = _setup(args)
    if setup is None:
        return None
    _, specs, policies = setup
    if endpoints(home_of(args)):
        running = call_cluster(args, "GET", "/mcp/servers")
        if running is not None:
            rows: list[dict[str, Any]] = running["servers"]
            return rows
    loaded = policies.load()
    return [
        {
            "name": spec.name,
            "builtin": spec.builtin,
            "transport": spec.transport,
            "state": "unavailable" if spec.unavailable else "agent not running",
            "error": spec.unavailable,
            "tools": [],
            **policies.policy(spec, loaded).as_json(),
        }
        for spec in specs.values()
    ]


def cmd_list(args: argparse.Namespace) -> int:
    """thox mcp list."""
    rows = _rows(args)
    if rows is None:
        return 2
    if args.json:
        out.print_json(data=rows)
        return 0
    table = Table(box=None, padding=(0, 2))
    for column in ("server", "kind", "enabled", "state", "tools", "permissions"):
        table.add_column(column)
    for row in rows:
        permissions = "read-only" if row["read_only"] else "read-write"
        if row["allow"] or row["deny"]:
            permissions += f" (allow {','.join(row['allow']) or '-'}; deny {','.join(row['deny']) or '-'})"
        state = row["state"] + (f": {row['error']}" if row.get("error") else "")
        kind = f"built-in, {row['transport']}" if row["builtin"] else f"custom, {row['transport']}"
        table.add_row(row["name"], kind, "yes" if row["enabled"] else "no", state, str(len(row["tools"])), permissions)
    out.print(table)
    return 0


def _set_enabled(args: argparse.Namespace, enabled: bool) -> int:
    setup = _setup(args)
    if setup is None:
        return 2
    _, specs, policies = setup
    spec = _spec(args, specs)
    if spec is None:
        return 2
    if enabled and spec.unavailable:
        err.print(f"[red]error:[/red] {spec.name} cannot run on this box: {spec.unavailable}")
        return 2
    policies.update(spec, enabled=enabled)
    out.print(f"{spec.name} {'enabled' if enabled else 'disabled'}; a running agent applies it within a second")
    return 0


def cmd_enable(args: argparse.Namespace) -> int:
    """thox mcp enable NAME."""
    return _set_enabled(args, True)


def cmd_disable(args: argparse.Namespace) -> int:
    """thox mcp disable NAME."""
    return _set_enabled(args, False)


async def _probe(spec: ServerSpec, settings: Settings) -> tuple[float, float, list[str]]:
    started = time.monotonic()
    async with connected(spec, settings.home / "logs") as client:
        connected_at = time.monotonic()
        tools = (await asyncio.wait_for(client.list_tools(), 30)).tools
    return connected_at - started, time.monotonic() - connected_at, [tool.name for tool in tools]


def cmd_test(args: argparse.Namespace) -> int:
    """thox mcp test NAME: start it, list its tools, time both."""
    setup = _setup(args)
    if setup is None:
        return 2
    settings, specs, _ = setup
    spec = _spec(args, specs)
    if spec is None:
        return 2
    if spec.unavailable:
        err.print(f"[red]error:[/red] {spec.name} cannot run on this box: {spec.unavailable}")
        return 1
    try:
        connect_s, list_s, tools = asyncio.run(asyncio.wait_for(_probe(spec, settings), 60))
    except Exception as exc:  # any failure to start or talk is the answer this command gives
        err.print(f"[red]{spec.name}: failed:[/red] {describe(exc)}")
        err.print(f"its stderr is in {settings.home / 'logs' / f'mcp-{spec.name}.log'}")
        return 1
    out.print(f"{spec.name}: ok; connected in {connect_s * 1000:.0f} ms, tools/list in {list_s * 1000:.0f} ms")
    out.print(f"{len(tools)} tools: {', '.join(tools)}")
    return 0


def cmd_permissions_list(args: argparse.Namespace) -> int:
    """thox mcp permissions list."""
    rows = _rows(args)
    if rows is None:
        return 2
    table = Table(box=None, padding=(0, 2))
    for column in ("server", "enabled", "mode", "allow", "deny"):
        table.add_column(column)
    for row in rows:
        mode = "read-only" if row["read_only"] else "read-write"
        table.add_row(
            row["name"], "yes" if row["enabled"] else "no", mode, ",".join(row["allow"]), ",".join(row["deny"])
        )
    out.print(table)
    return 0


def cmd_permissions_set(args: argparse.Namespace) -> int:
    """thox mcp permissions set NAME [--read-only|--read-write] [--allow TOOL]... [--deny TOOL]... [--reset]."""
    setup = _setup(args)
    if setup is None:
        return 2
    _, specs, policies = setup
    spec = _spec(args, specs)
    if spec is None:
        return 2
    current = policies.policy(spec, policies.load())
    allow, deny = (frozenset(), frozenset()) if args.reset else (current.allow, current.deny)
    allow = (allow | set(args.allow)) - set(args.deny)
    deny = (deny | set(args.deny)) - set(args.allow)
    read_only = current.read_only if args.read_only is None else args.read_only
    policy = policies.update(spec, read_only=read_only, allow=frozenset(allow), deny=frozenset(deny))
    mode = "read-only" if policy.read_only else "read-write"
    out.print(
        f"{spec.name}: {mode}; allow: {', '.join(sorted(policy.allow)) or '-'}; "
        f"deny: {', '.join(sorted(policy.deny)) or '-'}"
    )
    return 0


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    """Register `thox mcp ...`."""
    mcp = sub.add_parser("mcp", help="MCP servers this box hosts").add_subparsers(dest="mcp_command", required=True)
    listing = mcp.add_parser("list", parents=[common], help="built-in and custom servers, state and permissions")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=cmd_list)
    for name, func, text in (
        ("enable", cmd_enable, "start a server (built-ins are off until enabled)"),
        ("disable", cmd_disable, "stop a server"),
        ("test", cmd_test, "start a server here, list its tools, time it"),
    ):
        command = mcp.add_parser(name, parents=[common], help=text)
        command.add_argument("name")
        command.set_defaults(func=func)
    permissions = mcp.add_parser("permissions", help="what each server's tools may do").add_subparsers(
        dest="permissions_command", required=True
    )
    plist = permissions.add_parser("list", parents=[common], help="every server's permissions")
    plist.set_defaults(func=cmd_permissions_list)
    pset = permissions.add_parser("set", parents=[common], help="change one server's permissions")
    pset.add_argument("name")
    mode = pset.add_mutually_exclusive_group()
    mode.add_argument("--read-only", dest="read_only", action="store_true", default=None, help="only read tools")
    mode.add_argument("--read-write", dest="read_only", action="store_false", help="every tool")
    pset.add_argument("--allow", action="append", default=[], metavar="TOOL", help="always allow this tool")
    pset.add_argument("--deny", action="append", default=[], metavar="TOOL", help="never allow this tool")
    pset.add_argument("--reset", action="store_true", help="clear the allow and deny lists first")
    pset.set_defaults(func=cmd_permissions_set)
