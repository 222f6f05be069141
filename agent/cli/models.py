"""`thox models list|prepare|push|rm` (this box's store; `push` publishes to the model registry), `list --remote`,
`pull`, `status` (the registry and copies into boxes' stores) and `load|unload|placement` (across the stack), the
stack-wide ones through the local cluster API."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
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
    """thox models list [--remote]: what is installed in the store, or what the model registry offers."""
    from agent.models import ModelStore, ModelStoreError

    if args.remote:
        return _list_remote(args)
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


def _list_remote(args: argparse.Namespace) -> int:
    answer = call_cluster(args, "GET", "/models/remote", timeout=120)
    if answer is None:
        return 1
    if args.json:
        out.print_json(data=answer)
        return 0
    if not answer["data"]:
        out.print(f"The model registry at {answer['registry']} holds no models (publish some with `thox models push`).")
        return 0
    table = Table(title=f"Models in the registry at {answer['registry']}")
    for column in ("model", "size", "format", "family", "parameters", "quantization", "context", "capabilities"):
        table.add_column(column, overflow="fold")
    for row in answer["data"]:
        if "error" in row:
            table.add_row(row["model"], "-", f"[red]{row['error']}[/red]", "", "", "", "", "")
            continue
        table.add_row(
            row["model"],
            _human_size(row["size"]),
            row.get("format") or "-",
            row.get("family") or "-",
            row.get("parameters") or "-",
            row.get("quantization") or "-",
            str(row.get("context_length") or "-"),
            ", ".join(row.get("capabilities") or []),
        )
    out.print(table)
    return 0


def cmd_models_push(args: argparse.Namespace) -> int:
    """thox models push MODEL... [--as NAME[:TAG]] [--all] [--registry URL]: publish store models to a registry."""
    from agent.models import ModelStore, ModelStoreError
    from agent.models.oci.artifact import ArtifactError, Reference
    from agent.models.oci.client import OciRegistry, RegistryError
    from agent.models.oci.push import push

    try:
        settings = load_settings(home=home_of(args))
        installed = ModelStore(settings.models_dir).installed()
    except (SettingsError, ModelStoreError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 1
    chosen = installed if args.all else [m for m in installed if m.id in args.model]
    unknown = sorted(set(args.model) - {m.id for m in installed})
    if unknown or not chosen:
        have = ", ".join(m.id for m in installed) or "none"
        err.print(f"[red]error:[/red] not in the store: {', '.join(unknown) or 'no model named'}; installed: {have}")
        return 1
    if args.as_ and len(chosen) != 1:
        err.print("[red]error:[/red] --as names one model; push one model at a time with it")
        return 1
    registry = OciRegistry(args.registry or settings.registry.url)

    async def publish() -> int:
        async with registry.session() as session:
            for model in chosen:
                reference = Reference.parse(args.as_ or model.id)
                with _transfer_bar(f"{model.id} -> {reference}") as (update, _):
                    digest = await push(registry, session, model, reference, update)
                out.print(f"{reference}: pushed to {registry.url} ({digest})", highlight=False)
        return 0

    try:
        return asyncio.run(publish())
    except (ArtifactError, RegistryError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 1


def cmd_models_rm(args: argparse.Namespace) -> int:
    """thox models rm MODEL: delete a model from this box's store (not while it is served here)."""
    answer = call_cluster(args, "DELETE", f"/models/store/{args.model}")
    if answer is None:
        return 1
    out.print(f"{answer['model']}: removed from {answer['node']}'s store")
    return 0


def cmd_models_status(args: argparse.Namespace) -> int:
    """thox models status: copies into boxes' stores in progress (or just finished) across the stack."""
    answer = call_cluster(args, "GET", "/models/pulls")
    if answer is None:
        return 1
    if args.json:
        out.print_json(data=answer)
    elif not answer["data"]:
        out.print("no pull is in progress on any box")
    else:
        table = Table(title="Model pulls")
        for column in ("node", "model", "state", "progress", "detail"):
            table.add_column(column, overflow="fold")
        for row in answer["data"]:
            done = f"{_human_size(row['completed'])} / {_human_size(row['total'])}" if row["total"] else "-"
            table.add_row(
                row["node"], row["model"], row["state"], f"{row['progress'] * 100:.0f}%", row.get("error") or done
            )
        out.print(table)
    return 0


@contextlib.contextmanager
def _transfer_bar(label: str) -> Iterator[tuple[Callable[[int, int], None], Callable[[str], None]]]:
    """Bytes, rate and time left: a bar on a terminal, a line every few percent otherwise (logs, CI)."""
    if err.is_terminal:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
        ) as progress:
            task = progress.add_task(label, total=None)

            def update(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            yield update, lambda text: progress.console.print(text, highlight=False)
        return
    started = time.monotonic()
    shown = [-1]

    def line(done: int, total: int) -> None:
        percent = int(done * 100 / total) if total else 100
        if percent < shown[0] + 5 and done != total:
            return
        shown[0] = percent
        seconds = max(time.monotonic() - started, 1e-3)
        rate = done / seconds
        eta = f"{(total - done) / rate:.0f} s" if rate and total >= done else "-"
        err.print(
            f"{label}: {done / 1e6:.1f} / {total / 1e6:.1f} MB ({percent}%), {rate / 1e6:.1f} MB/s, ETA {eta}",
            highlight=False,
        )

    yield line, lambda text: err.print(text, highlight=False)


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
        with contextlib.ExitStack() as bars:
            updates: dict[str, tuple[Callable[[int, int], None], Callable[[str], None]]] = {}
            async for raw in response.content:
                if not raw.strip():
                    continue
                line = json.loads(raw)
                final = line
                node = line.get("node")
                if node is None:
                    if line["status"] == "started":
                        out.print(f"{body['model']}: pulling into {', '.join(line['nodes']) or 'no box (all have it)'}")
                    continue
                if node not in updates:
                    updates[node] = bars.enter_context(_transfer_bar(f"{node}: {body['model']}"))
                update, say = updates[node]
                if line["total"]:
                    update(line["completed"], line["total"])
                if line["status"] in ("done", "failed"):
                    detail = f" ({line['error']})" if line.get("error") else ""
                    say(f"{node}: {line['status']}{detail}")
        ok = final.get("status") == "success"
        out.print(f"{body['model']}: {'pulled' if ok else 'not pulled everywhere'}")
        return 0 if ok else 1


def cmd_pull(args: argparse.Namespace) -> int:
    """thox models pull NAME[:TAG] [--node ID]...: copy a model into the stores of the boxes that lack it (from a
    box that has it, else from the model registry), with a progress bar per box."""
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
    listing.add_argument("--remote", action="store_true", help="the model registry's models and tags instead")
    listing.set_defaults(func=cmd_models_list)
    push = models.add_parser("push", parents=[common], help="publish models of this box's store to the registry")
    push.add_argument("model", nargs="*", default=[], help="store ids (see `thox models list`)")
    push.add_argument("--all", action="store_true", help="every model of the store")
    push.add_argument("--as", dest="as_", metavar="NAME[:TAG]", help="the name (and tag) in the registry")
    push.add_argument("--registry", help="registry base URL (default: the registry.url setting)")
    push.set_defaults(func=cmd_models_push)
    rm = models.add_parser("rm", parents=[common], help="delete a model from this box's store")
    rm.add_argument("model")
    rm.set_defaults(func=cmd_models_rm)
    status = models.add_parser("status", parents=[common], help="pulls in progress on the boxes of the stack")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_models_status)
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
    pull = models.add_parser(
        "pull", parents=[common], help="copy a model (NAME[:TAG]) to the boxes that lack it, from a box or the registry"
    )
    pull.add_argument("model")
    pull.add_argument("--node", action="append", help="only to this box (repeat for several)")
    pull.add_argument("--timeout", type=float, default=1800, help="seconds to wait (default 1800)")
    pull.set_defaults(func=cmd_pull)
    placement = models.add_parser("placement", parents=[common], help="where placed models run")
    placement.add_argument("--json", action="store_true", help="machine-readable output")
    placement.set_defaults(func=cmd_placement)
