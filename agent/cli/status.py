"""`thox status`: the running agent's key facts at a glance."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import aiohttp

from agent.cli.common import auth_headers, cluster_url, err, home_of, inference_url, out


async def _status_reports(base: str) -> tuple[Any, Any]:
    """/v1/health (keyless) and /v1/config (admin scope: None when this client may not read it)."""
    async with aiohttp.ClientSession(headers=auth_headers()) as session:
        async with session.get(f"{base}/health") as response:
            health = await response.json(content_type=None)
        async with session.get(f"{base}/config") as response:
            config = await response.json(content_type=None) if response.status == 200 else None
    return health, config


def _status_lines(health: dict[str, Any], config: dict[str, Any] | None, inference: str, cluster: str) -> None:
    engine = health.get("engine", {})
    colour = {"ok": "green", "starting": "yellow"}.get(str(health.get("status")), "red")
    out.print(
        f"status   [{colour}]{health.get('status')}[/{colour}]   version {health.get('version')}   "
        f"uptime {health.get('uptime_seconds', 0):.0f}s"
    )
    out.print(f"serving  {inference} (OpenAI API)   {cluster} (cluster API)")
    if config is not None:
        values = config.get("settings", {})
        keys = config.get("api_keys", {})
        out.print(
            f"access   auth {values.get('api.auth')}   allow {values.get('api.allow')}   limits "
            f"{values.get('api.rate_limit')}/min inference, {values.get('api.cluster_rate_limit')}/min "
            f"cluster   api keys {keys.get('count', 0)}"
        )
    out.print(
        f"engine   {engine.get('state')}   model {engine.get('model')}   pid {engine.get('pid')}   "
        f"restarts {engine.get('restarts')}   streams {engine.get('active_streams')}"
    )
    if engine.get("last_error"):
        out.print(f"         last error: {engine['last_error']}")
    hardware = health.get("hardware") or {}
    thermal = hardware.get("thermal")
    if thermal:
        out.print(
            f"thermal  {health.get('temperature_c')} C   level {thermal.get('level')}   "
            f"concurrency {thermal.get('actions', {}).get('max_concurrency')}"
        )
    power, dock = hardware.get("power"), hardware.get("dock")
    if power or dock:
        docked = "docked" if (dock or {}).get("docked") else "nothing docked"
        millivolts = (power or {}).get("contract_mV")
        out.print(
            f"dock     {docked}   power contract {(power or {}).get('contract_state')}"
            f"{f' {millivolts / 1000:.1f} V' if millivolts else ''}"
        )
    membership = health.get("cluster")
    if membership:
        role = "leader" if membership.get("is_leader") else "member"
        state = (
            f"{membership.get('cluster_id')}   node {membership.get('node_id')}   {role}"
            if membership.get("running")
            else f"[red]unavailable[/red]: {membership.get('unavailable', 'not running')}"
        )
        out.print(f"cluster  {state}   (thox cluster status)")
    pending = (config or health.get("config") or {}).get("restart_required")
    if pending:
        out.print(f"config   [yellow]restart needed[/yellow] for {', '.join(pending)}")


def cmd_status(args: argparse.Namespace) -> int:
    """thox status: the running agent's key facts at a glance; exit status 3 unless it is ok."""
    home = home_of(args)
    base = cluster_url(home)
    try:
        health, config = asyncio.run(_status_reports(base))
    except aiohttp.ClientError as exc:
        err.print(f"[red]error:[/red] no agent answers at {base}: {exc}")
        return 1
    if args.json:
        out.print_json(data={**health, **({"config": config} if config is not None else {})})
    else:
        _status_lines(health, config, inference_url(home), base)
    return 0 if health.get("status") == "ok" else 3


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    """Register `thox status`."""
    status = sub.add_parser("status", parents=[common], help="health of the running agent")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)
