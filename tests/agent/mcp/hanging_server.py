"""A misbehaving MCP server for the host's tests (stdio): `stall` never answers, `ok` answers at once."""

from __future__ import annotations

import asyncio

from mcp.server import MCPServer

server = MCPServer("stalling")


@server.tool(description="Never returns.")
async def stall() -> str:
    await asyncio.Event().wait()
    return "unreachable"


@server.tool(description="Returns at once.")
async def ok() -> str:
    return "fine"


if __name__ == "__main__":
    asyncio.run(server.run_stdio_async())
