"""Loaded models: an installed model plus its text pipeline and its engine host, resolved by request."""

from __future__ import annotations

from dataclasses import dataclass

from agent.engine import EngineHost
from agent.errors import ModelNotFoundError
from agent.models.store import InstalledModel
from engines.text import TextPipeline


@dataclass(frozen=True)
class LoadedModel:
    """A model that can serve requests right now (or as soon as its engine host is ready)."""

    installed: InstalledModel
    text: TextPipeline
    engine: EngineHost

    @property
    def id(self) -> str:
        return self.installed.id


class ModelRegistry:
    """Maps request model names to loaded models; an omitted name means the default model."""

    def __init__(self, models: list[LoadedModel], default_id: str) -> None:
        self._models = {m.id: m for m in models}
        if default_id not in self._models:
            raise ValueError(f"default model {default_id!r} is not loaded")
        self.default_id = default_id

    def all(self) -> list[LoadedModel]:
        """Loaded models, default first."""
        return sorted(self._models.values(), key=lambda m: m.id != self.default_id)

    def resolve(self, requested: str | None) -> LoadedModel:
        """The model a request names (or the default); ModelNotFoundError names what is available."""
        if requested is None or requested == "":
            return self._models[self.default_id]
        model = self._models.get(requested)
        if model is None:
            available = ", ".join(sorted(self._models))
            raise ModelNotFoundError(
                f"The model '{requested}' does not exist or is not loaded; available: {available}", param="model")
        return model
