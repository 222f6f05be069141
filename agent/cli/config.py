"""`thox config get|set|unset|list|reload`: the settings file, and telling the running agent what changed.

After a change the CLI asks the running agent (if one serves this home) to reload: it applies what is safe to
change live and names what needs a restart, and the CLI says which of the two happened to the key just changed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from typing import Any

import aiohttp
from rich.table import Table

from agent.cli import keys
from agent.cli.common import cluster_url, endpoints, err, home_of, out, request_json
from agent.config_file import ConfigFile
from agent.models import BUNDLED_MODELS, ModelStore, ModelStoreError
from agent.models.registry import CHAT
from agent.settings import SettingsError, env_var

RESTART_HINT = "`sudo systemctl restart thox-agent`, or stop and start `thox serve`"


def _config(args: argparse.Namespace) -> ConfigFile:
    return ConfigFile(home_of(args))


def _ask_agent_to_reload(args: argparse.Namespace) -> dict[str, Any] | None:
    """POST /v1/config/reload to the agent serving this home; None (with a note printed) when that fails."""
    url = f"{cluster_url(home_of(args))}/config/reload"
    try:
        status, payload = asyncio.run(request_json("POST", url))
    except aiohttp.ClientError as exc:
        err.print(f"note: the agent at {url} did not answer ({exc}); it reads the file when it starts")
        return None
    if status >= 400:
        message = payload.get("error", {}).get("message", payload) if isinstance(payload, dict) else payload
        err.print(f"note: the running agent did not apply the change ({status}: {message})")
        if status in (401, 403):
            err.print("      set THOX_API_KEY to an admin key, or run `sudo systemctl reload thox-agent`")
        return None
    return payload if isinstance(payload, dict) else None


def _tell_agent(args: argparse.Namespace, key: str) -> None:
    if not endpoints(home_of(args)) and "THOX_CLUSTER_URL" not in os.environ:
        return  # no agent runs on this home: it reads the file when it starts
    report = _ask_agent_to_reload(args)
    if report is None:
        return
    if key in report.get("pinned", []):
        err.print(
            f"note: the running agent's environment or command line sets {key} ({env_var(key)}), "
            "which overrides the file"
        )
    elif key in report.get("applied", []):
        out.print("the running agent applied it")
    elif key in report.get("restart_required", []):
        out.print(f"the running agent uses the new value after a restart: {RESTART_HINT}")


def cmd_get(args: argparse.Namespace) -> int:
    """thox config get KEY: the effective value and where it comes from."""
    if args.key == "api.key":
        return keys.config_get_key(args)
    try:
        value, source = _config(args).get(args.key)
    except SettingsError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 2
    out.print(f"{args.key} = {json.dumps(value)}   ({source})", highlight=False)
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    """thox config set KEY VALUE: validated against the schema, written atomically, applied if the agent runs."""
    if args.key == "api.key":  # a secret: it goes into the hashed key store, never into config.toml
        return keys.config_set_key(args, args.value)
    try:
        if args.key == "default_model":
            _check_installed_chat_model(args)
        stored = _config(args).set(args.key, args.value)
    except SettingsError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 2
    out.print(f"{args.key} = {json.dumps(stored)}", highlight=False)
    if env_var(args.key) in os.environ:
        err.print(f"note: {env_var(args.key)} is set and overrides the file")
    _tell_agent(args, args.key)
    return 0


def _check_installed_chat_model(args: argparse.Namespace) -> None:
    """A default_model the store lacks would keep the agent from starting: refused before the file changes."""
    try:
        installed = ModelStore(home_of(args) / "models").installed()
    except ModelStoreError as exc:
        raise SettingsError(str(exc)) from exc
    # The bundled models count: the agent installs them at start.
    chat = sorted(
        {m.id for m in installed if CHAT in m.capabilities} | {b.id for b in BUNDLED_MODELS if CHAT in b.capabilities}
    )
    if args.value not in chat:
        raise SettingsError(
            f"default_model {args.value!r} is not an installed chat model; installed: {', '.join(chat) or 'none'} "
            "(`thox models pull NAME` installs one)"
        )


def cmd_unset(args: argparse.Namespace) -> int:
    """thox config unset KEY: back to the default."""
    try:
        removed = _config(args).unset(args.key)
    except SettingsError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 2
    out.print(f"{args.key} {'removed from' if removed else 'was not set in'} {home_of(args) / 'config.toml'}")
    if removed:
        _tell_agent(args, args.key)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """thox config list: every setting, its effective value and its source."""
    try:
        rows = _config(args).listing()
    except SettingsError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 2
    if args.json:
        out.print_json(data={key: {"value": value, "source": source} for key, value, source in rows})
        return 0
    table = Table(box=None, padding=(0, 2))
    for column in ("key", "value", "source"):
        table.add_column(column, overflow="fold")
    for key, value, source in rows:
        table.add_row(key, json.dumps(value), source)
    out.print(table)
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """thox config reload: the running agent applies the file (after editing it by hand)."""
    report = _ask_agent_to_reload(args)
    if report is None:
        return 1
    if args.json:
        out.print_json(data=report)
        return 0
    out.print(f"applied: {', '.join(report['applied']) or 'nothing changed that applies live'}")
    if report["restart_required"]:
        out.print(f"needs a restart: {', '.join(report['restart_required'])} ({RESTART_HINT})")
    if report["pinned"]:
        out.print(f"set by the agent's environment or command line: {', '.join(report['pinned'])}")
    return 0


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    """Register `thox config ...`."""
    config = sub.add_parser("config", help="settings in <home>/config.toml").add_subparsers(
        dest="config_command", required=True
    )
    get = config.add_parser("get", parents=[common], help="a setting's effective value and its source")
    get.add_argument("key", help="dotted key, e.g. api.inference_port")
    get.set_defaults(func=cmd_get)
    change = config.add_parser("set", parents=[common], help="change a setting (validated; applied live if safe)")
    change.add_argument("key")
    change.add_argument("value")
    change.set_defaults(func=cmd_set)
    unset = config.add_parser("unset", parents=[common], help="back to the default")
    unset.add_argument("key")
    unset.set_defaults(func=cmd_unset)
    listing = config.add_parser("list", parents=[common], help="every setting with value and source")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=cmd_list)
    reload = config.add_parser("reload", parents=[common], help="the running agent applies the file now")
    reload.add_argument("--json", action="store_true", help="machine-readable output")
    reload.set_defaults(func=cmd_reload)
