"""Cluster views of the cluster API: the stack's topology, its health and resources, and its nodes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from agent.cluster.node import ClusterNode, ClusterUnavailable
from agent.errors import ClusterUnavailableError

CLUSTER_NODE_KEY = web.AppKey("cluster_node", ClusterNode)


async def _answer(view: Callable[[], Awaitable[Any]]) -> web.Response:
    try:
        return web.json_response(await view())
    except ClusterUnavailable as exc:
        raise ClusterUnavailableError(str(exc)) from exc


async def topology(request: web.Request) -> web.Response:
    """GET /v1/topology: cluster id, node count, the leader (only while its lease is current) and the nodes."""
    return await _answer(request.app[CLUSTER_NODE_KEY].topology)


async def cluster(request: web.Request) -> web.Response:
    """GET /v1/cluster: healthy / degraded / no_quorum, pooled RAM and TOPS, the active model."""
    return await _answer(request.app[CLUSTER_NODE_KEY].summary)


async def nodes(request: web.Request) -> web.Response:
    """GET /v1/nodes: every member with role, address, RAM, temperature, load, models and when last seen."""
    node = request.app[CLUSTER_NODE_KEY]

    async def listing() -> dict[str, Any]:
        return {"object": "list", "data": await node.nodes()}

    return await _answer(listing)


def setup_routes(app: web.Application) -> None:
    """Register the cluster views."""
    app.router.add_get("/v1/topology", topology)
    app.router.add_get("/v1/cluster", cluster)
    app.router.add_get("/v1/nodes", nodes)
