"""`thox hw status|pd list|pd request`: the box's hardware through the running agent."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from agent.cli.common import call_cluster, out


def _print_contract(record: dict[str, Any]) -> None:
    selected = record.get("selected") or {}
    measured = record.get("measured") or {}
    out.print(
        f"port {record.get('port')}   controller {record.get('controller')}   state [bold]{record.get('state')}"
        f"[/bold]   peer {record.get('peer_module_id') or '-'}"
    )
    if selected:
        out.print(
            f"  contract  PDO #{selected.get('pdo_index')}  {selected.get('voltage_mV', 0) / 1000:.2f} V  "
            f"{selected.get('current_mA')} mA  ({selected.get('power_mW', 0) / 1000:.1f} W)"
        )
    if measured:
        out.print(f"  measured  {measured.get('bus_mV', 0) / 1000:.3f} V  {measured.get('current_mA')} mA")
    table = Table(show_header=True, box=None, padding=(0, 2))
    for column in ("#", "type", "voltage", "current / power"):
        table.add_column(column)
    for pdo in record.get("source_pdos", []):
        volts = (
            f"{pdo['mV'] / 1000:.2f} V" if "mV" in pdo else f"{pdo['min_mV'] / 1000:.1f}-{pdo['max_mV'] / 1000:.1f} V"
        )
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
    out.print(
        f"thermal  {health.get('temperature_c')} C (hottest)   level [bold]{thermal.get('level')}[/bold]   "
        f"concurrency {actions.get('max_concurrency')}   fan {actions.get('fan_profile')}"
        f"{'   INFERENCE STOPPED' if actions.get('inference_stopped') else ''}"
    )
    zones = "  ".join(
        f"{zone} {'offline' if c is None else f'{c:.1f}'}" for zone, c in thermal.get("zones", {}).items()
    )
    out.print(f"zones    {zones}")
    power = hardware.get("power") or {}
    out.print(
        f"power    contract {power.get('contract_state')} {power.get('contract_mV')} mV   "
        f"bus {power.get('bus_mV')} mV   {power.get('current_mA')} mA"
    )
    dock = hardware.get("dock") or {}
    offer = dock.get("join_offer")
    offer_text = f"   join offer from {offer.get('node_id')} ({offer.get('endpoint')})" if offer else ""
    out.print(f"dock     {'docked' if dock.get('docked') else 'empty'}{offer_text}")
    table = Table(title="drivers", box=None, padding=(0, 2))
    for column in ("source", "available", "polls", "failed", "jitter p99 ms", "last error"):
        table.add_column(column, overflow="fold")
    for name, report in hardware.get("drivers", {}).items():
        table.add_row(
            name,
            "yes" if report.get("available") else "[red]no[/red]",
            str(report.get("polls")),
            str(report.get("failed_polls")),
            str(report.get("poll_jitter_ms", {}).get("p99", "-")),
            report.get("last_error") or "",
        )
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


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    """Register `thox hw ...`."""
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
