"""The agent's side of the engine: it supervises the engine host process and streams tokens from it."""

from agent.engine.host import EngineHost, EngineHostConfig, EngineState

__all__ = ["EngineHost", "EngineHostConfig", "EngineState"]
