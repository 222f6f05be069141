"""MCP host routes of the cluster API (admin): the hosted servers, their state and permissions."""

from __future__ import annotations

from aiohttp import web

from agent.mcp.host import McpHost

MCP_HOST_KEY = web.AppKey("mcp_host", McpHost)


async def list_servers(request: web.Request) -> web.Response:
    """GET /v1/mcp/servers: every built-in and custom server, enabled or not, with state, tools and policy."""
    return web.json_response(request.app[MCP_HOST_KEY].status())


def setup_routes(app: web.Application) -> None:
    """Register the MCP host routes."""
    app.router.add_get("/v1/mcp/servers", list_servers)
