"""The MCP host: the servers the agent runs (config.py), their sessions and tool calls (host.py), our shell server."""
