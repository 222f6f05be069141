"""`thox models list|prepare` (this box's store) and `load|unload|pull|placement` (across the stack, through the
local cluster API)."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import aiohttp
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from agent.cli.common import auth_headers, call_cluster, cluster_url, err, home_of, out
from agent.settings import SettingsError, load_settings


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    return f"{size} B"


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
        out.print(
            f"No models installed in {home / 'models'}. Run `thox models prepare` "
            "(or `thox serve`, which installs the bundled model on first start)."
        )
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
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
    ) as progress:
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
                        model.path, settings.model_cache_dir, sha256=model.sha256, progress=report
                    ).directory
                else:
                    directory = ensure_converted_encoder(
                        model.path, settings.model_cache_dir, progress=report
                    ).directory
            except EngineError as exc:
                err.print(f"[red]error:[/red] {model.id}: {exc}")
                return 1
            progress.console.print(f"{model.id}: ready ({directory})")
    return 0


def _replica_cell(replica: dict[str, Any]) -> str:
    state = replica["state"]
    if state == "pulling" and "progress" in replica:
        return f"{replica['node']}: pulling {replica['progress'] * 100:.0f}%"
    if state == "failed":
        return f"{replica['node']}: failed ({replica.get('error')})"
    return f"{replica['node']}: {state}"


def _print_placements(placements: list[dict[str, Any]]) -> None:
    table = Table(box=None, padding=(0, 2))
    for column in ("model", "status", "ready", "context", "replicas"):
        table.add_column(column)
    for placed in placements:
        table.add_row(
            placed["model"],
            placed["status"],
            f"{placed['replicas_ready']}/{placed['replicas_wanted']}",
            str(placed.get("context_length") or "default"),
            "; ".join(_replica_cell(r) for r in placed["replicas"]) or "-",
        )
    out.print(table)


def cmd_load(args: argparse.Namespace) -> int:
    """thox models load MODEL [--replicas N] [--context-length N] [--node ID]...: serve a model across the stack."""
    body: dict[str, Any] = {
        "model": args.model,
        "replicas": args.replicas,
        "timeout_seconds": args.timeout,
        "options": {"context_length": args.context_length} if args.context_length else {},
    }
    if args.node:
        body["nodes"] = args.node
    answer = call_cluster(args, "POST", "/models/load", body, timeout=args.timeout + 30)
    if answer is None:
        return 1
    if args.json:
        out.print_json(data=answer)
    else:
        _print_placements([answer])
    return 0 if answer["status"] == "ready" else 3


def cmd_unload(args: argparse.Namespace) -> int:
    """thox models unload MODEL: no box serves it as a placed replica any more."""
    answer = call_cluster(args, "POST", "/models/unload", {"model": args.model}, timeout=60)
    if answer is None:
        return 1
    out.print(f"{answer['model']}: {answer['status']}")
    return 0


def cmd_placement(args: argparse.Namespace) -> int:
    """thox models placement: every placed model and where its replicas stand."""
    answer = call_cluster(args, "GET", "/models/placement")
    if answer is None:
        return 1
    if args.json:
        out.print_json(data=answer)
    elif not answer["data"]:
        out.print("no model is placed; each box serves its default model")
    else:
        _print_placements(answer["data"])
    return 0


async def _pull(url: str, body: dict[str, Any]) -> int:
    timeout = aiohttp.ClientTimeout(total=None, sock_read=body["timeout_seconds"] + 30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url, json=body, headers=auth_headers()) as response,
    ):
        if response.status >= 400:
            payload = await response.json(content_type=None)
            err.print(f"[red]error {response.status}:[/red] {payload.get('error', {}).get('message', payload)}")
            return 1
        final: dict[str, Any] = {}
        async for raw in response.content:
            if not raw.strip():
                continue
            line = json.loads(raw)
            status = line["status"]
            if status == "pulling" and "total" in line:
                out.print(
                    f"{line['node']}: {line['completed'] / 1e6:.1f} / {line['total'] / 1e6:.1f} MB "
                    f"({line['progress'] * 100:.0f}%)",
                    highlight=False,
                )
            elif status in ("done", "failed", "queued", "started"):
                detail = f" ({line['error']})" if line.get("error") else ""
                out.print(
                    f"{line.get('node') or ', '.join(line.get('nodes', [])) or 'no box needs it'}: {status}{detail}",
                    highlight=False,
                )
            final = line
        ok = final.get("status") == "success"
        out.print(f"{body['model']}: {'copied' if ok else 'not copied everywhere'}")
        return 0 if ok else 1


def cmd_pull(args: argparse.Namespace) -> int:
    """thox models pull MODEL [--node ID]...: copy a model into the stores of the boxes that lack it."""
    body: dict[str, Any] = {"model": args.model, "stream": True, "timeout_seconds": args.timeout}
    if args.node:
        body["nodes"] = args.node
    url = f"{cluster_url(home_of(args))}/models/pull"
    try:
        return asyncio.run(_pull(url, body))
    except aiohttp.ClientError as exc:
        err.print(f"[red]error:[/red] no agent answers at {url}: {exc}")
        return 1


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    """Register `thox models ...`."""
    models = sub.add_parser("models", help="the model store").add_subparsers(dest="models_command", required=True)
    listing = models.add_parser("list", parents=[common], help="installed models with size and sha256")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=cmd_models_list)
    prepare = models.add_parser(
        "prepare", parents=[common], help="install bundled models and convert them (shows progress)"
    )
    prepare.set_defaults(func=cmd_models_prepare)
    load = models.add_parser("load", parents=[common], help="serve a model on boxes of the stack")
    load.add_argument("model")
    load.add_argument("--replicas", type=int, default=1, help="how many boxes serve it (default 1)")
    load.add_argument("--context-length", type=int, help="longest context per request (default: the engine's)")
    load.add_argument("--node", action="append", help="only on this box (repeat for several)")
    load.add_argument("--timeout", type=float, default=300, help="seconds to wait for the replicas (default 300)")
    load.add_argument("--json", action="store_true", help="machine-readable output")
    load.set_defaults(func=cmd_load)
    unload = models.add_parser("unload", parents=[common], help="stop serving a placed model")
    unload.add_argument("model")
    unload.set_defaults(func=cmd_unload)
    pull = models.add_parser("pull", parents=[common], help="copy a model to the boxes that lack it")
    pull.add_argument("model")
    pull.add_argument("--node", action="append", help="only to this box (repeat for several)")
    pull.add_argument("--timeout", type=float, default=1800, help="seconds to wait (default 1800)")
    pull.set_defaults(func=cmd_pull)
    placement = models.add_parser("placement", parents=[common], help="where placed models run")
    placement.add_argument("--json", action="store_true", help="machine-readable output")
    placement.set_defaults(func=cmd_placement)
