"""The MCP server at /mcp on the inference port: its tools (server.py), the SDK app in aiohttp (asgi_bridge.py)."""
