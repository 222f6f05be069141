"""Model placement on the cluster API: load, unload and pull models across the stack (agent/cluster/placement.py).

- POST /v1/models/load     {model, options: {context_length}, replicas, nodes, wait, timeout_seconds}
- POST /v1/models/unload   {model}
- POST /v1/models/pull     {model, nodes, stream, timeout_seconds}: progress as NDJSON lines while streaming
- GET  /v1/models/placement           every placed model with its replicas' states
- GET  /v1/models/placement/{model}   one of them
- GET  /v1/models/remote     the model registry's models and tags (size, format, quantization, capabilities, ...)
- GET  /v1/models/pulls      copies in progress (or just finished) on every box of the stack
- DELETE /v1/models/store/{model}     remove a model from this box's store (refused while it is served here)

A pull of a model no box has comes from the model registry (`registry.url`): `name:tag` there, stored as `name`
for the `latest` tag and as `name:tag` otherwise; a model the registry lacks is a 404 naming what it has, a
registry that cannot be reached a 503 naming its URL.

The pull stream (`application/x-ndjson`, one JSON object per line), exactly:
- first `{"status": "started", "model", "nodes": [box ids]}`;
- then, whenever a box's state changes, `{"status": "queued" | "pulling" | "done" | "failed", "model", "node",
  "completed": bytes the box holds, "total": bytes of the model, "progress": completed / total}`, with `"error"`
  on a failed line. Every such line carries all three counts; a `done` line has `completed == total`;
  `completed` never decreases for a box (a resumed copy counts what it already had);
- last `{"status": "success" | "error", "model", "nodes"}`, with `"errors": {box: message}` on an error.
Without `stream`, the answer is that last line alone (a 500 model_pull_failed when a box did not get the model).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from agent.api.body import parse_body, read_json_body
from agent.api.cluster.protocol import ModelLoadBody, ModelPullBody, ModelUnloadBody
from agent.api.cluster.topology import CLUSTER_NODE_KEY
from agent.cluster.placement import PlacementRefused, PlacementSpec
from agent.cluster.views import ClusterUnavailable
from agent.errors import ClusterRequestError, ClusterUnavailableError
from agent.models.oci.artifact import store_id

POLL_SECONDS = 0.25
UNLOAD_WAIT_SECONDS = 30.0


async def _cluster_call(work: Callable[[], Awaitable[Any]]) -> Any:
    try:
        return await work()
    except ClusterUnavailable as exc:
        raise ClusterUnavailableError(str(exc)) from exc
    except PlacementRefused as exc:
        raise ClusterRequestError(exc.message, code=exc.code, status=exc.status) from exc


async def load(request: web.Request) -> web.Response:
    """Place a model; with `wait` (the default) answer once its replicas are ready (200), failed (500), or the
    timeout passed while they are still coming up (202, with their progress)."""
    node = request.app[CLUSTER_NODE_KEY]
    body = parse_body(ModelLoadBody, await read_json_body(request))
    spec = PlacementSpec(
        model=store_id(body.model),
        replicas=body.replicas,
        context_length=body.options.context_length,
        nodes=tuple(body.nodes or ()),
    )
    placed = await _cluster_call(lambda: node.models.load(spec))
    deadline = time.monotonic() + body.timeout_seconds
    while body.wait and placed["status"] == "placing" and time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECONDS)
        placed = await _cluster_call(lambda: node.models.placement(spec.model))
    if placed["status"] == "failed":
        errors = "; ".join(f"{r['node']}: {r.get('error')}" for r in placed["replicas"])
        raise ClusterRequestError(
            f"{spec.model} could not be loaded on any box: {errors}", code="model_load_failed", status=500
        )
    return web.json_response(placed, status=200 if placed["status"] == "ready" else 202)


async def unload(request: web.Request) -> web.Response:
    """Withdraw a placement; answers once no box serves the model as a placed replica (or after 30 s)."""
    node = request.app[CLUSTER_NODE_KEY]
    body = parse_body(ModelUnloadBody, await read_json_body(request))
    await _cluster_call(lambda: node.models.unload(body.model))
    deadline = time.monotonic() + UNLOAD_WAIT_SECONDS
    while time.monotonic() < deadline:
        holding = sorted(n for n, r in node.live_nodes.items() if body.model in (r.get("replicas") or {}))
        if not holding:
            return web.json_response({"model": body.model, "status": "unloaded"})
        await asyncio.sleep(POLL_SECONDS)
    return web.json_response({"model": body.model, "status": "unloading", "nodes": holding}, status=202)


async def placement(request: web.Request) -> web.Response:
    node = request.app[CLUSTER_NODE_KEY]
    model = request.match_info.get("model")
    return web.json_response(await _cluster_call(lambda: node.models.placement(model)))


def model_size(live_nodes: Mapping[str, Mapping[str, Any]], model: str) -> int:
    """The model's size in bytes, as the stores that hold it report it (0 when none does)."""
    for record in live_nodes.values():
        facts = (record.get("store") or {}).get(model)
        if isinstance(facts, dict) and isinstance(facts.get("size"), int):
            return int(facts["size"])
    return 0


def pull_line(
    model: str, node: str, status: str, completed: int, total: int, error: str | None = None
) -> dict[str, Any]:
    """One box's line of the pull stream (the contract in the module docstring)."""
    if status == "done":
        completed = total  # done means every byte is there, however the box's record last counted them
    elif total:
        completed = min(completed, total)
    line: dict[str, Any] = {
        "status": status,
        "model": model,
        "node": node,
        "completed": completed,
        "total": total,
        "progress": round(completed / total, 4) if total else 0.0,
    }
    if error is not None:
        line["error"] = error
    return line


def pull_lines(
    live_nodes: Mapping[str, Mapping[str, Any]],
    model: str,
    targets: list[str],
    since: float,
    earlier: Mapping[str, dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Each target's pull line as its node record shows it (a box that has not picked the request up is queued).

    `earlier` holds the lines sent before: a box's count never goes back (a record read in between may be older)
    and a box that left the cluster fails with what it had.
    """
    total = model_size(live_nodes, model)
    lines: dict[str, dict[str, Any]] = {}
    for target in targets:
        before = earlier.get(target)
        had = int(before["completed"]) if before else 0
        record = live_nodes.get(target)
        if record is None:
            lines[target] = pull_line(model, target, "failed", had, total, f"{target} left the cluster")
            continue
        state = (record.get("pulls") or {}).get(model)
        finished = isinstance(state, dict) and _outcome_of_this_request(state, since)
        if isinstance(state, dict) and (state.get("state") == "pulling" or finished):
            status = str(state.get("state"))
            error = str(state.get("error")) if status == "failed" else None
            lines[target] = pull_line(
                model,
                target,
                status,
                max(had, int(state.get("completed") or 0)),
                int(state.get("total") or total),
                error,
            )
        elif model in (record.get("store") or {}):
            lines[target] = pull_line(model, target, "done", total, total)
        else:
            lines[target] = pull_line(model, target, "queued", had, total)
    return lines


def _outcome_of_this_request(state: Mapping[str, Any], since: float) -> bool:
    """Whether a box's finished pull answers the request made at `since` (not an earlier one's outcome: a retry
    right after a failure must not be told the old failure).

    `requested_at` is the request's own time as this box wrote it (so the same clock as `since`); a box that does
    not report it is judged by when it finished, on its own clock, with a second's allowance.
    """
    requested_at = state.get("requested_at")
    if isinstance(requested_at, (int, float)):
        return requested_at >= since
    return float(state.get("finished") or 0) >= since - 1


async def pull(request: web.Request) -> web.StreamResponse:
    """Copy a model from the leader's store (or any box holding it) into the boxes that need it."""
    node = request.app[CLUSTER_NODE_KEY]
    body = parse_body(ModelPullBody, await read_json_body(request))
    body = body.model_copy(update={"model": store_id(body.model)})
    since = time.time()
    targets = await _cluster_call(lambda: node.models.request_pull(body.model, body.nodes))
    stream: web.StreamResponse | None = None
    if body.stream:
        stream = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"})
        await stream.prepare(request)
        await stream.write(json.dumps({"status": "started", "model": body.model, "nodes": targets}).encode() + b"\n")
    deadline = time.monotonic() + body.timeout_seconds
    sent: dict[str, dict[str, Any]] = {}
    while True:
        lines = pull_lines(node.live_nodes, body.model, targets, since, sent)
        if stream is not None:
            for target, line in lines.items():
                if line != sent.get(target):
                    await stream.write(json.dumps(line).encode() + b"\n")
        sent = lines
        if all(line["status"] in ("done", "failed") for line in lines.values()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(POLL_SECONDS)
    failed = {t: line.get("error", "timed out") for t, line in lines.items() if line["status"] != "done"}
    summary = {
        "status": "success" if not failed else "error",
        "model": body.model,
        "nodes": targets,
        **({"errors": failed} if failed else {}),
    }
    if stream is None:
        if failed:
            raise ClusterRequestError(
                f"{body.model} was not copied to every box: {failed}", code="model_pull_failed", status=500
            )
        return web.json_response(summary)
    await stream.write(json.dumps(summary).encode() + b"\n")
    await stream.write_eof()
    return stream


async def remote(request: web.Request) -> web.Response:
    node = request.app[CLUSTER_NODE_KEY]
    rows = await _cluster_call(node.models.remote_models)
    return web.json_response({"object": "list", "registry": node.remote.url, "data": rows})


async def pulls(request: web.Request) -> web.Response:
    """Every box's copies in progress or just finished (the pull requests and the replicas being brought up)."""
    node = request.app[CLUSTER_NODE_KEY]
    rows = []
    for node_id, record in sorted(node.live_nodes.items()):
        for kind in ("pulls", "replicas"):
            for model, state in sorted((record.get(kind) or {}).items()):
                if kind == "replicas" and state.get("state") != "pulling":
                    continue
                rows.append(
                    {
                        "node": node_id,
                        "model": model,
                        "state": state.get("state"),
                        "completed": int(state.get("completed") or 0),
                        "total": int(state.get("total") or 0),
                        "progress": float(state.get("progress") or 0.0),
                        **({"error": state["error"]} if state.get("error") else {}),
                    }
                )
    return web.json_response({"object": "list", "data": rows})


async def remove(request: web.Request) -> web.Response:
    """Remove a model from this box's store."""
    node = request.app[CLUSTER_NODE_KEY]
    model = store_id(request.match_info["model"])
    loader = node.loader
    if loader is None:  # the model routes are only set up with a loader; a guard for the type checker
        raise ClusterRequestError("this box has no model store", code="model_not_found", status=404)
    await loader.remove(model)  # a ModelLoadError is the client's answer as it stands (404, 409)
    return web.json_response({"model": model, "status": "removed", "node": node.node_id})


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/models/load", load)
    app.router.add_post("/v1/models/unload", unload)
    app.router.add_post("/v1/models/pull", pull)
    app.router.add_get("/v1/models/placement", placement)
    app.router.add_get("/v1/models/placement/{model}", placement)
    app.router.add_get("/v1/models/remote", remote)
    app.router.add_get("/v1/models/pulls", pulls)
    app.router.add_delete("/v1/models/store/{model}", remove)
