"""Loaded models, resolved by request: chat models (text pipeline) and embedding models (tokenizer).

Both kinds run in the same engine host; the registry maps a request's `model` (or its absence) to the model
that can do what the endpoint asks, and says precisely what is available when it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from agent.engine import EngineHost
from agent.errors import InvalidRequestError, ModelNotFoundError
from agent.models.store import InstalledModel
from engines.text import TextPipeline

CHAT = "chat.completions"
EMBEDDINGS = "embeddings"


class EmbeddingTokenizer(Protocol):
    """What the embeddings endpoint needs from an embedding model's tokenizer."""

    @property
    def max_tokens(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def wrap(self, ids: list[int]) -> list[int]:
        """Add the model's special tokens around raw token ids."""
        ...


@dataclass(frozen=True)
class ChatModel:
    """A generative model: chat and text completions."""

    installed: InstalledModel
    text: TextPipeline
    engine: EngineHost

    @property
    def id(self) -> str:
        return self.installed.id


@dataclass(frozen=True)
class EmbeddingModel:
    """A sentence-embedding model."""

    installed: InstalledModel
    tokenizer: EmbeddingTokenizer
    engine: EngineHost

    @property
    def id(self) -> str:
        return self.installed.id


class ModelRegistry:
    """Maps request model names to loaded models; an omitted name means the default of that kind."""

    def __init__(self, chat: list[ChatModel], embeddings: list[EmbeddingModel], default_chat: str) -> None:
        self._chat = {m.id: m for m in chat}
        self._embeddings = {m.id: m for m in embeddings}
        if default_chat not in self._chat:
            raise ValueError(f"default model {default_chat!r} is not loaded")
        self.default_id = default_chat

    def add_chat(self, model: ChatModel) -> None:
        """Serve another chat model from now on."""
        self._chat[model.id] = model

    def set_default(self, model_id: str) -> None:
        """Requests that name no model go to this loaded chat model from now on."""
        if model_id not in self._chat:
            raise ValueError(f"{model_id!r} is not a loaded chat model")
        self.default_id = model_id

    def serves(self, model_id: str) -> bool:
        return model_id in self._chat or model_id in self._embeddings

    def remove_chat(self, model_id: str) -> ChatModel | None:
        """Stop serving a chat model (new requests no longer find it); the default stays."""
        if model_id == self.default_id:
            return None
        return self._chat.pop(model_id, None)

    def engines(self) -> list[EngineHost]:
        """Every engine host serving a model here, each once."""
        found: dict[int, EngineHost] = {}
        models: list[ChatModel | EmbeddingModel] = [*self._chat.values(), *self._embeddings.values()]
        for model in models:
            found.setdefault(id(model.engine), model.engine)
        return list(found.values())

    def all(self) -> list[ChatModel | EmbeddingModel]:
        """Loaded models, the default first."""
        chat = sorted(self._chat.values(), key=lambda m: m.id != self.default_id)
        return [*chat, *self._embeddings.values()]

    def get(self, requested: str) -> ChatModel | EmbeddingModel:
        """Any loaded model by id; ModelNotFoundError names what is available."""
        model = self._chat.get(requested) or self._embeddings.get(requested)
        if model is None:
            available = ", ".join(sorted([*self._chat, *self._embeddings]))
            raise ModelNotFoundError(
                f"The model '{requested}' does not exist or is not loaded; available: {available}", param="model"
            )
        return model

    def chat(self, requested: str | None) -> ChatModel:
        """The chat model a request names, or the default one."""
        if not requested:
            return self._chat[self.default_id]
        model = self.get(requested)
        if not isinstance(model, ChatModel):
            raise InvalidRequestError(
                f"The model '{requested}' is an embedding model; use it with /v1/embeddings. Chat models: "
                f"{', '.join(sorted(self._chat))}",
                param="model",
                code="model_not_supported",
            )
        return model

    def embedding(self, requested: str | None) -> EmbeddingModel:
        """The embedding model a request names, or the first one loaded."""
        if not self._embeddings:
            raise InvalidRequestError("no embedding model is installed", param="model", code="model_not_found")
        if not requested:
            return next(iter(self._embeddings.values()))
        model = self.get(requested)
        if not isinstance(model, EmbeddingModel):
            raise InvalidRequestError(
                f"The model '{requested}' cannot make embeddings; embedding models: "
                f"{', '.join(sorted(self._embeddings))}",
                param="model",
                code="model_not_supported",
            )
        return model
