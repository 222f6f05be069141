"""Cluster views of the cluster API: the stack's topology, its health and resources, and its nodes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from agent.api.body import parse_body, read_json_body
from agent.api.cluster.protocol import JoinRequestBody, TokenRequestBody
from agent.cluster.join import JoinRefused
from agent.cluster.node import ClusterNode
from agent.cluster.tokens import TokenError
from agent.cluster.views import ClusterUnavailable
from agent.errors import ClusterRequestError, ClusterUnavailableError

CLUSTER_NODE_KEY = web.AppKey("cluster_node", ClusterNode)


async def _answer(view: Callable[[], Awaitable[Any]]) -> web.Response:
    try:
        return web.json_response(await view())
    except ClusterUnavailable as exc:
        raise ClusterUnavailableError(str(exc)) from exc


async def topology(request: web.Request) -> web.Response:
    """GET /v1/topology: cluster id, node count, the leader (only while its lease is current) and the nodes."""
    return await _answer(request.app[CLUSTER_NODE_KEY].views.topology)


async def cluster(request: web.Request) -> web.Response:
    """GET /v1/cluster: healthy / degraded / no_quorum, pooled RAM and TOPS, the active model."""
    return await _answer(request.app[CLUSTER_NODE_KEY].views.summary)


async def nodes(request: web.Request) -> web.Response:
    """GET /v1/nodes: every member with role, address, RAM, temperature, load, models and when last seen."""
    node = request.app[CLUSTER_NODE_KEY]

    async def listing() -> dict[str, Any]:
        return {"object": "list", "data": await node.views.nodes()}

    return await _answer(listing)


async def create_token(request: web.Request) -> web.Response:
    """POST /v1/cluster/tokens: a one-time join token ({"ttl_seconds"} optional) and the server to use it with."""
    body = parse_body(TokenRequestBody, await read_json_body(request) if request.can_read_body else {})
    return await _answer(lambda: request.app[CLUSTER_NODE_KEY].issue_token(body.ttl_seconds))


async def join_cluster(request: web.Request) -> web.Response:
    """POST /v1/cluster/join {"token", "server"}: this box leaves its own cluster and joins the token's."""
    body = parse_body(JoinRequestBody, await read_json_body(request))
    try:
        return await _answer(lambda: request.app[CLUSTER_NODE_KEY].join(body.token, body.server))
    except TokenError as exc:
        raise ClusterRequestError(exc.message, code=exc.code, status=403 if exc.code == "ca_mismatch" else 400) from exc
    except JoinRefused as exc:
        raise ClusterRequestError(exc.message, code=exc.code, status=exc.status) from exc


def setup_routes(app: web.Application) -> None:
    """Register the cluster views and the join routes."""
    app.router.add_get("/v1/topology", topology)
    app.router.add_get("/v1/cluster", cluster)
    app.router.add_get("/v1/nodes", nodes)
    app.router.add_post("/v1/cluster/tokens", create_token)
    app.router.add_post("/v1/cluster/join", join_cluster)
