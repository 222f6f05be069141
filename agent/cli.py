"""The `thox` command line: thin wrappers that parse, call into the service or its HTTP API, and print."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import aiohttp
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

import agent
from agent import cli_cluster, cli_config, cli_keys, cli_logs, cli_placement
from agent.cli_common import auth_headers, call_cluster, cluster_url, err, home_of, inference_url, out
from agent.settings import SettingsError, load_settings


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    return f"{size} B"


# ------------------------------------------------------------------------------ commands


def cmd_serve(args: argparse.Namespace) -> int:
    """thox serve: run the agent in the foreground."""
    from agent.logs import configure_logging, log_file_of, under_journald
    from agent.service import StartupError, serve

    overrides = {
        "profile": args.profile,
        "api.bind": args.host,
        "api.inference_port": args.inference_port,
        "api.cluster_port": args.cluster_port,
        "engine.threads": args.threads,
    }
    try:
        settings = load_settings(overrides, home=home_of(args))
    except SettingsError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 2
    # Under systemd the journal keeps the lines; otherwise a rotated file in the home does (`thox logs` reads both).
    close_logs = configure_logging(settings.log_format,
                                   log_file=None if under_journald() else log_file_of(settings.home))
    try:
        asyncio.run(serve(settings, overrides))
    except StartupError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 1
    finally:
        close_logs()
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    """thox models list: what is installed in the store."""
    from agent.models import ModelStore, ModelStoreError

    home = home_of(args)
    try:
        models = ModelStore(home / "models").installed()
    except ModelStoreError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 1
    if args.json:
        out.print_json(data=[m.to_json() for m in models])
        return 0
    if not models:
        out.print(f"No models installed in {home / 'models'}. Run `thox models prepare` "
                  "(or `thox serve`, which installs the bundled model on first start).")
        return 0
    table = Table(title=f"Models in {home / 'models'}")
    for column in ("id", "size", "quantization", "sha256", "source"):
        table.add_column(column, overflow="fold")
    for m in models:
        table.add_row(m.id, _human_size(m.size), m.quantization, m.sha256, m.source)
    out.print(table)
    return 0


def cmd_models_prepare(args: argparse.Namespace) -> int:
    """thox models prepare: install bundled models and convert them for the engine, with progress."""
    from agent.models import ModelStore, ModelStoreError
    from engines.base import EngineError
    from engines.convert import ensure_converted
    from engines.convert.bert import ensure_converted_encoder

    try:
        settings = load_settings(home=home_of(args))
        models = ModelStore(settings.models_dir).ensure_bundled()
    except (SettingsError, ModelStoreError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 1
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err) as progress:
        for model in models:
            tasks: dict[str, TaskID] = {}

            def report(
                stage: str, done: int, total: int, model_id: str = model.id, tasks: dict[str, TaskID] = tasks
            ) -> None:
                if stage not in tasks:
                    tasks[stage] = progress.add_task(f"{model_id}: {stage}", total=total)
                progress.update(tasks[stage], completed=done, total=total)

            try:
                if model.format == "gguf":
                    directory = ensure_converted(
                        model.path, settings.model_cache_dir, sha256=model.sha256, progress=report).directory
                else:
                    directory = ensure_converted_encoder(
                        model.path, settings.model_cache_dir, progress=report).directory
            except EngineError as exc:
                err.print(f"[red]error:[/red] {model.id}: {exc}")
                return 1
            progress.console.print(f"{model.id}: ready ({directory})")
    return 0


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
    out.print(f"status   [{colour}]{health.get('status')}[/{colour}]   version {health.get('version')}   "
              f"uptime {health.get('uptime_seconds', 0):.0f}s")
    out.print(f"serving  {inference} (OpenAI API)   {cluster} (cluster API)")
    if config is not None:
        values = config.get("settings", {})
        keys = config.get("api_keys", {})
        out.print(f"access   auth {values.get('api.auth')}   allow {values.get('api.allow')}   limits "
                  f"{values.get('api.rate_limit')}/min inference, {values.get('api.cluster_rate_limit')}/min "
                  f"cluster   api keys {keys.get('count', 0)}")
    out.print(f"engine   {engine.get('state')}   model {engine.get('model')}   pid {engine.get('pid')}   "
              f"restarts {engine.get('restarts')}   streams {engine.get('active_streams')}")
    if engine.get("last_error"):
        out.print(f"         last error: {engine['last_error']}")
    hardware = health.get("hardware") or {}
    thermal = hardware.get("thermal")
    if thermal:
        out.print(f"thermal  {health.get('temperature_c')} C   level {thermal.get('level')}   "
                  f"concurrency {thermal.get('actions', {}).get('max_concurrency')}")
    power, dock = hardware.get("power"), hardware.get("dock")
    if power or dock:
        docked = "docked" if (dock or {}).get("docked") else "nothing docked"
        millivolts = (power or {}).get("contract_mV")
        out.print(f"dock     {docked}   power contract {(power or {}).get('contract_state')}"
                  f"{f' {millivolts / 1000:.1f} V' if millivolts else ''}")
    membership = health.get("cluster")
    if membership:
        role = "leader" if membership.get("is_leader") else "member"
        state = (f"{membership.get('cluster_id')}   node {membership.get('node_id')}   {role}"
                 if membership.get("running")
                 else f"[red]unavailable[/red]: {membership.get('unavailable', 'not running')}")
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


def _print_contract(record: dict[str, Any]) -> None:
    selected = record.get("selected") or {}
    measured = record.get("measured") or {}
    out.print(f"port {record.get('port')}   controller {record.get('controller')}   state [bold]{record.get('state')}"
              f"[/bold]   peer {record.get('peer_module_id') or '-'}")
    if selected:
        out.print(f"  contract  PDO #{selected.get('pdo_index')}  {selected.get('voltage_mV', 0) / 1000:.2f} V  "
                  f"{selected.get('current_mA')} mA  ({selected.get('power_mW', 0) / 1000:.1f} W)")
    if measured:
        out.print(f"  measured  {measured.get('bus_mV', 0) / 1000:.3f} V  {measured.get('current_mA')} mA")
    table = Table(show_header=True, box=None, padding=(0, 2))
    for column in ("#", "type", "voltage", "current / power"):
        table.add_column(column)
    for pdo in record.get("source_pdos", []):
        volts = (f"{pdo['mV'] / 1000:.2f} V" if "mV" in pdo
                 else f"{pdo['min_mV'] / 1000:.1f}-{pdo['max_mV'] / 1000:.1f} V")
        amps = f"{pdo['mA']} mA" if "mA" in pdo else f"{pdo.get('mW')} mW"
        marker = " *" if selected and pdo["index"] == selected.get("pdo_index") else ""
        table.add_row(f"{pdo['index']}{marker}", pdo["type"], volts, amps)
    if record.get("source_pdos"):
        out.print(table)


def cmd_hw_status(args: argparse.Namespace) -> int:
    """thox hw status: temperatures, thermal level, power, dock and every driver's availability."""
    health = call_cluster(args, "GET", "/health")
    if health is None:
        return 1
    hardware = health.get("hardware")
    if args.json:
        out.print_json(data={"temperature_c": health.get("temperature_c"), **(hardware or {})})
        return 0
    if not hardware:
        out.print("this agent reports no hardware")
        return 0
    thermal = hardware.get("thermal") or {}
    actions = thermal.get("actions") or {}
    out.print(f"thermal  {health.get('temperature_c')} C (hottest)   level [bold]{thermal.get('level')}[/bold]   "
              f"concurrency {actions.get('max_concurrency')}   fan {actions.get('fan_profile')}"
              f"{'   INFERENCE STOPPED' if actions.get('inference_stopped') else ''}")
    zones = "  ".join(f"{zone} {'offline' if c is None else f'{c:.1f}'}"
                      for zone, c in thermal.get("zones", {}).items())
    out.print(f"zones    {zones}")
    power = hardware.get("power") or {}
    out.print(f"power    contract {power.get('contract_state')} {power.get('contract_mV')} mV   "
              f"bus {power.get('bus_mV')} mV   {power.get('current_mA')} mA")
    dock = hardware.get("dock") or {}
    offer = dock.get("join_offer")
    offer_text = f"   join offer from {offer.get('node_id')} ({offer.get('endpoint')})" if offer else ""
    out.print(f"dock     {'docked' if dock.get('docked') else 'empty'}{offer_text}")
    table = Table(title="drivers", box=None, padding=(0, 2))
    for column in ("source", "available", "polls", "failed", "jitter p99 ms", "last error"):
        table.add_column(column, overflow="fold")
    for name, report in hardware.get("drivers", {}).items():
        table.add_row(name, "yes" if report.get("available") else "[red]no[/red]",
                      str(report.get("polls")), str(report.get("failed_polls")),
                      str(report.get("poll_jitter_ms", {}).get("p99", "-")), report.get("last_error") or "")
    out.print(table)
    return 0


def cmd_hw_pd_list(args: argparse.Namespace) -> int:
    """thox hw pd list: the power contract on every port."""
    payload = call_cluster(args, "GET", "/power/contract")
    if payload is None:
        return 1
    if args.json:
        out.print_json(data=payload)
    else:
        for record in payload.get("data", []):
            _print_contract(record)
    return 0


def cmd_hw_pd_request(args: argparse.Namespace) -> int:
    """thox hw pd request: negotiate a contract by PDO index or by voltage (and current)."""
    body: dict[str, Any] = {"port": args.port}
    if args.pdo is not None:
        body["pdo_index"] = args.pdo
    if args.volts is not None:
        body["voltage_mv"] = round(args.volts * 1000)
    if args.amps is not None:
        body["current_ma"] = round(args.amps * 1000)
    record = call_cluster(args, "POST", "/power/contract", body)
    if record is None:
        return 1
    if args.json:
        out.print_json(data=record)
    else:
        _print_contract(record)
    return 0


async def _chat(url: str, body: dict[str, Any]) -> int:
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.post(
        f"{url}/chat/completions", json=body, headers=auth_headers()
    ) as response:
        if response.status != 200:
            payload = await response.json(content_type=None)
            err.print(f"[red]error {response.status}:[/red] {payload.get('error', {}).get('message', payload)}")
            return 1
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                err.print(f"\n[red]error:[/red] {event['error'].get('message')}")
                return 1
            for choice in event.get("choices", []):
                sys.stdout.write(choice.get("delta", {}).get("content") or "")
                sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """thox chat PROMPT: stream an answer from the running agent."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": args.prompt}], "stream": True}
    if args.model:
        body["model"] = args.model
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    url = inference_url(home_of(args))
    try:
        return asyncio.run(_chat(url, body))
    except aiohttp.ClientError as exc:
        err.print(f"[red]error:[/red] no agent answers at {url}: {exc}")
        return 1


def cmd_version(args: argparse.Namespace) -> int:
    """thox version."""
    out.print(f"thox {agent.__version__}")
    return 0


# ------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    """The `thox` argument parser."""
    parser = argparse.ArgumentParser(prog="thox", description="Thox edge-AI box agent")
    parser.add_argument("--home", help="agent home (default: $THOX_HOME or ~/.thox)")
    # --home is accepted after the subcommand too (`thox models list --home DIR`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS, help="agent home (default: $THOX_HOME or ~/.thox)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common], help="run the agent in the foreground")
    serve.add_argument("--host", help="bind address (sim profile: 127.0.0.1; device: all interfaces)")
    serve.add_argument("--inference-port", type=int, help="OpenAI API port (default 8080; 0 = any free port)")
    serve.add_argument("--cluster-port", type=int, help="cluster API port (default 5381; 0 = any free port)")
    serve.add_argument("--profile", choices=["sim", "device"], help="sim: simulated hardware (default)")
    serve.add_argument("--threads", type=int, help="CPU threads for inference")
    serve.set_defaults(func=cmd_serve)

    models = sub.add_parser("models", help="the model store").add_subparsers(dest="models_command", required=True)
    listing = models.add_parser("list", parents=[common], help="installed models with size and sha256")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=cmd_models_list)
    prepare = models.add_parser(
        "prepare", parents=[common], help="install bundled models and convert them (shows progress)")
    prepare.set_defaults(func=cmd_models_prepare)
    cli_placement.add_parsers(models, common)

    status = sub.add_parser("status", parents=[common], help="health of the running agent")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    chat = sub.add_parser("chat", parents=[common], help="stream an answer from the running agent")
    chat.add_argument("prompt")
    chat.add_argument("--model", help="model id (default: the agent's default model)")
    chat.add_argument("--max-tokens", type=int, help="longest answer in tokens")
    chat.set_defaults(func=cmd_chat)

    cli_keys.add_parsers(sub, common)
    cli_config.add_parsers(sub, common)
    cli_logs.add_parser(sub, common)
    cli_cluster.add_parsers(sub, common)

    hw = sub.add_parser("hw", help="the box's hardware").add_subparsers(dest="hw_command", required=True)
    hw_status = hw.add_parser("status", parents=[common], help="temperatures, power, dock, driver availability")
    hw_status.add_argument("--json", action="store_true", help="machine-readable output")
    hw_status.set_defaults(func=cmd_hw_status)
    pd = hw.add_parser("pd", help="USB-PD power contracts").add_subparsers(dest="pd_command", required=True)
    pd_list = pd.add_parser("list", parents=[common], help="the contract and the source's offers on every port")
    pd_list.add_argument("--json", action="store_true", help="machine-readable output")
    pd_list.set_defaults(func=cmd_hw_pd_list)
    pd_request = pd.add_parser("request", parents=[common], help="negotiate a contract with the docked module")
    choice = pd_request.add_mutually_exclusive_group(required=True)
    choice.add_argument("--pdo", type=int, help="object position of the offer to take (1 = 5 V)")
    choice.add_argument("--volts", type=float, help="voltage to ask for, e.g. 9 or 15")
    pd_request.add_argument("--amps", type=float, help="current to ask for (default: the most offered)")
    pd_request.add_argument("--port", default="dock", help="port name (default: dock)")
    pd_request.add_argument("--json", action="store_true", help="machine-readable output")
    pd_request.set_defaults(func=cmd_hw_pd_request)

    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `thox` console script."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
