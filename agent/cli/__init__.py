"""The `thox` command line: thin wrappers that parse, call into the service or its HTTP API, and print.

One module per command group; each registers its subcommands with `add_parsers(sub, common)`.
"""

from __future__ import annotations

import argparse

import agent
from agent.cli import chat, cluster, config, hw, keys, logs, mcp, models, serve, status
from agent.cli.common import out

_GROUPS = (serve, models, status, chat, keys, config, logs, cluster, hw, mcp)


def cmd_version(args: argparse.Namespace) -> int:
    """thox version."""
    out.print(f"thox {agent.__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `thox` argument parser."""
    parser = argparse.ArgumentParser(prog="thox", description="Thox edge-AI box agent")
    parser.add_argument("--home", help="agent home (default: $THOX_HOME or ~/.thox)")
    # --home is accepted after the subcommand too (`thox models list --home DIR`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS, help="agent home (default: $THOX_HOME or ~/.thox)")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in _GROUPS:
        group.add_parsers(sub, common)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `thox` console script."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code
