"""Builds the two aiohttp applications; every dependency is injected through typed AppKeys."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Middleware

import agent.api.cluster.config
import agent.api.cluster.mcp
import agent.api.cluster.models
import agent.api.cluster.power
import agent.api.cluster.routes
import agent.api.cluster.sim
import agent.api.cluster.topology
import agent.api.openai.routes
from agent.api.cluster.config import KEY_STORE_KEY, LIVE_CONFIG_KEY
from agent.api.cluster.mcp import MCP_HOST_KEY
from agent.api.cluster.power import HARDWARE_KEY
from agent.api.cluster.routes import HEALTH_KEY, HealthSources
from agent.api.cluster.topology import CLUSTER_NODE_KEY
from agent.api.mcp.asgi_bridge import asgi_handler
from agent.api.mcp.server import MCP_PATH, McpEndpoint
from agent.api.middleware import request_context
from agent.api.openai.routes import MAX_MESSAGE_BYTES_KEY, MCP_TOOL_HOST_KEY, RELAY_KEY, SERVING_KEY
from agent.api.openai.serving import OpenAIServing
from agent.api.routing import Routing
from agent.api.security import SecurityPolicy, add_rate_headers, security_middleware
from agent.hardware.manager import HardwareManager
from agent.mcp.host import McpHost


def _middlewares(security: SecurityPolicy | None) -> list[Middleware]:
    # The request context (ids, error envelope) wraps everything, security refusals included.
    return [request_context] if security is None else [request_context, security_middleware(security)]


def build_inference_app(
    serving: OpenAIServing,
    *,
    max_request_bytes: int,
    security: SecurityPolicy | None = None,
    routing: Routing | None = None,
    mcp: McpEndpoint | None = None,
    mcp_host: McpHost | None = None,
) -> web.Application:
    """The OpenAI-compatible API (port 8080) and, with `mcp`, the MCP endpoint (/mcp) behind the same middleware;
    `routing` sends requests for models served elsewhere there."""
    middlewares = [*_middlewares(security), *([routing.middleware()] if routing is not None else [])]
    app = web.Application(middlewares=middlewares, client_max_size=max_request_bytes)
    app.on_response_prepare.append(add_rate_headers)
    app[SERVING_KEY] = serving
    app[MAX_MESSAGE_BYTES_KEY] = max_request_bytes
    if routing is not None:
        app[RELAY_KEY] = routing.relay
    if mcp_host is not None:
        app[MCP_TOOL_HOST_KEY] = mcp_host
    agent.api.openai.routes.setup_routes(app)
    if mcp is not None:
        app.router.add_route("*", MCP_PATH, asgi_handler(mcp.app))
        app.on_startup.append(mcp.start)
        app.on_shutdown.append(mcp.stop)
    return app


def build_cluster_app(
    health: HealthSources,
    hardware: HardwareManager | None,
    *,
    max_request_bytes: int,
    security: SecurityPolicy | None = None,
    mcp_host: McpHost | None = None,
) -> web.Application:
    """The cluster API (port 5381); the sim control routes exist only when the hardware is simulated."""
    app = web.Application(middlewares=_middlewares(security), client_max_size=max_request_bytes)
    app.on_response_prepare.append(add_rate_headers)
    app[HEALTH_KEY] = health
    agent.api.cluster.routes.setup_routes(app)
    if health.config is not None:
        app[LIVE_CONFIG_KEY] = health.config
        if security is not None:
            app[KEY_STORE_KEY] = security.keys
        agent.api.cluster.config.setup_routes(app)
    if health.cluster is not None:
        app[CLUSTER_NODE_KEY] = health.cluster
        agent.api.cluster.topology.setup_routes(app)
        if health.cluster.loader is not None:
            agent.api.cluster.models.setup_routes(app)
    if hardware is not None:
        app[HARDWARE_KEY] = hardware
        agent.api.cluster.power.setup_routes(app)
    if hardware is not None and hardware.simulated:
        agent.api.cluster.sim.setup_routes(app)
    if mcp_host is not None:
        app[MCP_HOST_KEY] = mcp_host
        agent.api.cluster.mcp.setup_routes(app)
    return app
