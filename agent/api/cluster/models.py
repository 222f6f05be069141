"""Model placement on the cluster API: load, unload and pull models across the stack (agent/cluster/placement.py).

- POST /v1/models/load     {model, options: {context_length}, replicas, nodes, wait, timeout_seconds}
- POST /v1/models/unload   {model}
- POST /v1/models/pull     {model, nodes, stream, timeout_seconds}: progress as NDJSON lines while streaming
- GET  /v1/models/placement           every placed model with its replicas' states
- GET  /v1/models/placement/{model}   one of them
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from agent.api.body import parse_body, read_json_body
from agent.api.cluster.protocol import ModelLoadBody, ModelPullBody, ModelUnloadBody
from agent.api.cluster.topology import CLUSTER_NODE_KEY
from agent.cluster.node import ClusterNode, ClusterUnavailable
from agent.cluster.placement import PlacementRefused, PlacementSpec
from agent.errors import ClusterRequestError, ClusterUnavailableError

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
    spec = PlacementSpec(model=body.model, replicas=body.replicas, context_length=body.options.context_length,
                         nodes=tuple(body.nodes or ()))
    placed = await _cluster_call(lambda: node.load_model(spec))
    deadline = time.monotonic() + body.timeout_seconds
    while body.wait and placed["status"] == "placing" and time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECONDS)
        placed = await _cluster_call(lambda: node.model_placement(body.model))
    if placed["status"] == "failed":
        errors = "; ".join(f"{r['node']}: {r.get('error')}" for r in placed["replicas"])
        raise ClusterRequestError(f"{body.model} could not be loaded on any box: {errors}", code="model_load_failed",
                                  status=500)
    return web.json_response(placed, status=200 if placed["status"] == "ready" else 202)


async def unload(request: web.Request) -> web.Response:
    """Withdraw a placement; answers once no box serves the model as a placed replica (or after 30 s)."""
    node = request.app[CLUSTER_NODE_KEY]
    body = parse_body(ModelUnloadBody, await read_json_body(request))
    await _cluster_call(lambda: node.unload_model(body.model))
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
    return web.json_response(await _cluster_call(lambda: node.model_placement(model)))


def _pull_states(node: ClusterNode, model: str, targets: list[str], since: float) -> dict[str, dict[str, Any]]:
    """Each target's pull as its node record shows it; a box that has not picked the request up yet is queued."""
    states: dict[str, dict[str, Any]] = {}
    for target in targets:
        record = node.live_nodes.get(target)
        if record is None:
            states[target] = {"state": "failed", "error": f"{target} left the cluster"}
            continue
        state = (record.get("pulls") or {}).get(model)
        finished = isinstance(state, dict) and float(state.get("finished") or 0) >= since - 1
        if isinstance(state, dict) and (state.get("state") == "pulling" or finished):
            states[target] = state
        elif model in (record.get("store") or {}):
            states[target] = {"state": "done", "progress": 1.0}
        else:
            states[target] = {"state": "queued", "progress": 0.0}
    return states


async def pull(request: web.Request) -> web.StreamResponse:
    """Copy a model from the leader's store (or any box holding it) into the boxes that need it."""
    node = request.app[CLUSTER_NODE_KEY]
    body = parse_body(ModelPullBody, await read_json_body(request))
    since = time.time()
    targets = await _cluster_call(lambda: node.request_pull(body.model, body.nodes))
    stream: web.StreamResponse | None = None
    if body.stream:
        stream = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"})
        await stream.prepare(request)
        await stream.write(json.dumps({"status": "started", "model": body.model, "nodes": targets}).encode() + b"\n")
    deadline = time.monotonic() + body.timeout_seconds
    last: dict[str, dict[str, Any]] = {}
    while True:
        states = _pull_states(node, body.model, targets, since)
        if stream is not None:
            for target, state in states.items():
                if state != last.get(target):
                    line = {"status": state["state"], "model": body.model, "node": target,
                            **{k: v for k, v in state.items() if k not in ("state", "finished")}}
                    await stream.write(json.dumps(line).encode() + b"\n")
        last = states
        if all(s["state"] in ("done", "failed") for s in states.values()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(POLL_SECONDS)
    failed = {t: s.get("error", "timed out") for t, s in states.items() if s["state"] != "done"}
    summary = {"status": "success" if not failed else "error", "model": body.model, "nodes": targets,
               **({"errors": failed} if failed else {})}
    if stream is None:
        if failed:
            raise ClusterRequestError(f"{body.model} was not copied to every box: {failed}", code="model_pull_failed",
                                      status=500)
        return web.json_response(summary)
    await stream.write(json.dumps(summary).encode() + b"\n")
    await stream.write_eof()
    return stream


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/models/load", load)
    app.router.add_post("/v1/models/unload", unload)
    app.router.add_post("/v1/models/pull", pull)
    app.router.add_get("/v1/models/placement", placement)
    app.router.add_get("/v1/models/placement/{model}", placement)
