"""The OpenAI-compatible API: routes (HTTP only), protocol (request models), serving (logic)."""
