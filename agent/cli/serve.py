"""`thox serve`: run the agent in the foreground."""

from __future__ import annotations

import argparse
import asyncio

from agent.cli.common import err, home_of
from agent.settings import SettingsError, load_settings


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
    close_logs = configure_logging(
        settings.log_format, log_file=None if under_journald() else log_file_of(settings.home)
    )
    try:
        asyncio.run(serve(settings, overrides))
    except StartupError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 1
    finally:
        close_logs()
    return 0


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    """Register `thox serve`."""
    serve = sub.add_parser("serve", parents=[common], help="run the agent in the foreground")
    serve.add_argument("--host", help="bind address (sim profile: 127.0.0.1; device: all interfaces)")
    serve.add_argument("--inference-port", type=int, help="OpenAI API port (default 8080; 0 = any free port)")
    serve.add_argument("--cluster-port", type=int, help="cluster API port (default 5381; 0 = any free port)")
    serve.add_argument("--profile", choices=["sim", "device"], help="sim: simulated hardware (default)")
    serve.add_argument("--threads", type=int, help="CPU threads for inference")
    serve.set_defaults(func=cmd_serve)
