"""`thox cluster token|join|status`: grow the stack by hand and see it at a glance (via the local cluster API)."""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from rich.table import Table

from agent.cli.common import call_cluster, out


def cmd_token(args: argparse.Namespace) -> int:
    """thox cluster token: a one-time join token for this box's cluster, and the command that uses it."""
    answer = call_cluster(args, "POST", "/cluster/tokens", {"ttl_seconds": args.ttl})
    if answer is None:
        return 1
    if args.json:
        out.print_json(data=answer)
        return 0
    expires = datetime.datetime.fromtimestamp(answer["expires_at"]).strftime("%Y-%m-%d %H:%M")
    out.print(answer["token"], highlight=False)
    out.print(
        f"on the box that should join (valid once, until {expires}):\n"
        f"  thox cluster join {answer['token']} --server {answer['server']}",
        highlight=False,
    )
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    """thox cluster join TOKEN [--server HOST[:PORT]]: this box joins the token's cluster."""
    body = {"token": args.token, **({"server": args.server} if args.server else {})}
    answer = call_cluster(args, "POST", "/cluster/join", body)
    if answer is None:
        return 1
    out.print(f"joined cluster {answer['cluster_id']} as a {answer['role']}; members: {', '.join(answer['members'])}")
    return 0


def _age(node: dict[str, Any]) -> str:
    ago = node.get("last_seen_seconds_ago")
    return "-" if ago is None else f"{ago:.1f}s"


def cmd_status(args: argparse.Namespace) -> int:
    """thox cluster status: the topology at a glance."""
    summary = call_cluster(args, "GET", "/cluster")
    topology = call_cluster(args, "GET", "/topology") if summary is not None else None
    if summary is None or topology is None:
        return 1
    if args.json:
        out.print_json(data={"cluster": summary, "topology": topology})
        return 0
    voters = summary.get("voters", {})
    colour = {"healthy": "green", "degraded": "yellow"}.get(summary["status"], "red")
    out.print(
        f"cluster  {summary.get('cluster_id')}   [{colour}]{summary['status']}[/{colour}]   leader "
        f"{summary.get('leader') or '-'}   nodes {summary.get('node_count')}/{summary.get('member_count')}   "
        f"voters {voters.get('alive')}/{voters.get('expected')}   RAM {summary.get('total_ram_gb')} GB"
    )
    table = Table(box=None, padding=(0, 2))
    for column in ("node", "role", "address", "RAM GB", "temp C", "streams", "models", "last seen"):
        table.add_column(column)
    for node in topology["nodes"]:
        name = node["id"] + (" *" if node["id"] == topology.get("leader") else "")
        table.add_row(
            name,
            node["role"] if node["alive"] else f"{node['role']} (gone)",
            str(node.get("address", "-")),
            str(node.get("ram_gb", "-")),
            str(node.get("temperature_c", "-")),
            str((node.get("load") or {}).get("active_streams", "-")),
            ", ".join(node.get("models", [])),
            _age(node),
        )
    out.print(table)
    return 0 if summary["status"] == "healthy" else 3


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    """Register `thox cluster ...`."""
    cluster = sub.add_parser("cluster", help="the MagStack cluster").add_subparsers(
        dest="cluster_command", required=True
    )
    token = cluster.add_parser("token", parents=[common], help="make a one-time join token")
    token.add_argument("--ttl", type=float, default=3600, help="seconds the token stays valid (default 3600)")
    token.add_argument("--json", action="store_true", help="machine-readable output")
    token.set_defaults(func=cmd_token)
    join = cluster.add_parser("join", parents=[common], help="join the cluster a token names")
    join.add_argument("token", help="the token from `thox cluster token` on a member")
    join.add_argument(
        "--server", help="a member's peer address, HOST[:PORT] (printed with the token); default: found by mDNS"
    )
    join.set_defaults(func=cmd_join)
    status = cluster.add_parser("status", parents=[common], help="the topology at a glance")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)
