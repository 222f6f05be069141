"""`thox api-key ...` and `thox config get|set api.key`: the key store file, changed in place.

The running agent notices the change at its next keyed request (the store is reloaded when the file changes), so
a revoked or regenerated key stops working at once without a restart.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from agent.security.key_rules import KeyStoreError
from agent.security.keys import KeyStore
from agent.settings import default_home

out = Console()
err = Console(stderr=True)

# The name under which `thox config set api.key` keeps the user's own key (one such key at a time).
CONFIG_KEY_NAME = "api.key"


def _store(args: argparse.Namespace) -> KeyStore:
    home = Path(args.home).expanduser() if getattr(args, "home", None) else default_home()
    store = KeyStore(home / "keys.json")
    store.load()
    return store


def _failed(exc: KeyStoreError) -> int:
    err.print(f"[red]error:[/red] {exc}")
    return 2


def cmd_generate(args: argparse.Namespace) -> int:
    """thox api-key generate: a new key, printed once."""
    try:
        record, secret = _store(args).generate(args.name or "", args.scope)
    except KeyStoreError as exc:
        return _failed(exc)
    err.print(f"created {record.id} ({record.scope}); this is the only time the key is shown:")
    print(secret)  # noqa: T201 - plain stdout, so `KEY=$(thox api-key generate)` works
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """thox api-key list: ids, names, scopes and use; never secrets."""
    try:
        records = _store(args).list()
    except KeyStoreError as exc:
        return _failed(exc)
    if args.json:
        out.print_json(data=[r.as_dict() for r in records])
        return 0
    table = Table(box=None, padding=(0, 2))
    for column in ("id", "name", "scope", "created", "last used"):
        table.add_column(column)
    for r in records:
        table.add_row(r.id, r.name, r.scope, r.created, r.last_used or "never")
    out.print(table if records else "no API keys; create one with `thox api-key generate`")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    """thox api-key revoke ID: the key stops working at once."""
    try:
        record = _store(args).revoke(args.id)
    except KeyStoreError as exc:
        return _failed(exc)
    out.print(f"revoked {record.id}")
    return 0


def cmd_regenerate(args: argparse.Namespace) -> int:
    """thox api-key regenerate ID: a new secret for the same id; the old one stops working at once."""
    try:
        record, secret = _store(args).regenerate(args.id)
    except KeyStoreError as exc:
        return _failed(exc)
    err.print(f"regenerated {record.id}; the old key no longer works. The new key, shown once:")
    print(secret)  # noqa: T201
    return 0


def config_set_key(args: argparse.Namespace, value: str) -> int:
    """thox config set api.key VALUE: install the user's own key (admin scope), replacing the previous one."""
    try:
        record = _store(args).install(value, CONFIG_KEY_NAME, "admin", replace=True)
    except KeyStoreError as exc:
        return _failed(exc)
    out.print(f"api.key installed as {record.id} (admin scope)")
    return 0


def config_get_key(args: argparse.Namespace) -> int:
    """thox config get api.key: which key is configured, never the secret."""
    try:
        records = [r for r in _store(args).list() if r.name == CONFIG_KEY_NAME]
    except KeyStoreError as exc:
        return _failed(exc)
    if not records:
        out.print("api.key is not set (see `thox api-key list` for generated keys)")
    else:
        out.print(
            f"api.key = {records[0].id} (created {records[0].created}, last used "
            f"{records[0].last_used or 'never'}); the secret is not shown"
        )
    return 0


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    """Register `thox api-key ...`."""
    keys = sub.add_parser("api-key", help="API keys (Bearer tokens)").add_subparsers(dest="key_command", required=True)
    generate = keys.add_parser("generate", parents=[common], help="create a key and print it once")
    generate.add_argument("--name", help="a label for the key")
    generate.add_argument(
        "--scope",
        choices=["inference", "admin"],
        default="inference",
        help="inference: the OpenAI API; admin: also the cluster API (default inference)",
    )
    generate.set_defaults(func=cmd_generate)
    listing = keys.add_parser("list", parents=[common], help="keys with scope and last use, never secrets")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=cmd_list)
    revoke = keys.add_parser("revoke", parents=[common], help="stop a key working")
    revoke.add_argument("id")
    revoke.set_defaults(func=cmd_revoke)
    regenerate = keys.add_parser("regenerate", parents=[common], help="new secret for a key; the old one stops")
    regenerate.add_argument("id")
    regenerate.set_defaults(func=cmd_regenerate)
