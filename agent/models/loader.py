"""Loading and unloading chat models on this box while it runs: one engine host process per placed model.

The default model (and the embedding model beside it) is served by the engine host the agent starts with; a model
the cluster places here gets an engine host of its own, so a fault in one model's process never touches another.
A model is served (added to the registry) only once its engine is ready, and on unload it leaves the registry
first, so no new request reaches it, then its streams get a grace period to finish before its host stops.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from agent.engine import EngineHost, EngineHostConfig
from agent.engine.host import EngineState
from agent.errors import ThoxError
from agent.models.registry import CHAT, ChatModel, ModelRegistry
from agent.models.store import InstalledModel, ModelStore
from agent.settings import Settings
from engines.base import EngineError
from engines.convert.gguf_model import GgufModel

log = structlog.get_logger("agent.models.loader")

# The CPU engine keeps keys and values in float32 (engines/onnxruntime/executor.py kv_bytes_per_token).
_KV_BYTES_PER_VALUE = 4

Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


def _store_facts(store: ModelStore) -> dict[str, dict[str, Any]]:
    """Blocking: per installed model its size, whether it chats, and the KV bytes one token takes (chat models)."""
    facts: dict[str, dict[str, Any]] = {}
    for model in store.installed():
        chat = CHAT in model.capabilities
        kv = None
        if chat and model.path.is_file():
            try:
                config = GgufModel(model.path).config
                kv = config.n_layers * 2 * config.n_kv_heads * config.head_dim * _KV_BYTES_PER_VALUE
            except EngineError as exc:
                log.warning("model_unreadable", model=model.id, error=str(exc))
                continue
        facts[model.id] = {"size": model.size, "chat": chat, "kv_bytes_per_token": kv}
    return facts


class ModelLoadError(ThoxError):
    """A model could not be loaded (or removed) here; the message says why, `status`/`code` what the API answers."""

    status = 500
    code = "model_load_failed"


class ModelNotInStoreError(ModelLoadError):
    status = 404
    code = "model_not_found"


class ModelInUseError(ModelLoadError):
    status = 409
    code = "model_in_use"


@dataclass(frozen=True)
class _Loaded:
    model: ChatModel
    task: asyncio.Task[None]


class ModelLoader:
    """The models this box serves beyond its default one, each on its own engine host."""

    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        registry: ModelRegistry,
        spawn: Spawn,
        attach: Callable[[EngineHost], None],
        detach: Callable[[EngineHost], None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self._spawn = spawn
        self._attach = attach
        self._detach = detach
        self._loaded: dict[str, _Loaded] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._sockets = itertools.count(1)
        self.store_facts: dict[str, dict[str, Any]] = {}  # what this box's store holds, for the cluster

    async def refresh_store_facts(self) -> None:
        """Re-read the store (at start and after a model was copied in): sizes and KV cost of each model."""
        self.store_facts = await asyncio.to_thread(_store_facts, self.store)

    def loaded(self) -> list[str]:
        """Ids of the models placed and ready here (not the default)."""
        return sorted(self._loaded)

    async def load(self, model_id: str, context_length: int | None = None) -> int:
        """Serve an installed chat model here (no-op when already served); returns its context length."""
        async with self._locks.setdefault(model_id, asyncio.Lock()):
            if model_id == self.registry.default_id:
                return self.registry.chat(model_id).engine.max_context
            current = self._loaded.get(model_id)
            if current is not None:
                return current.model.engine.max_context
            installed = await asyncio.to_thread(self.store.get, model_id)
            if installed is None:
                raise ModelLoadError(f"{model_id!r} is not in this box's model store")
            if CHAT not in installed.capabilities:
                raise ModelLoadError(f"{model_id!r} is not a chat model; only chat models are placed on boxes")
            return await self._start(installed, context_length)

    async def _start(self, installed: InstalledModel, context_length: int | None) -> int:
        try:
            text = await asyncio.to_thread(installed.text_pipeline)
        except EngineError as exc:
            raise ModelLoadError(f"{installed.id!r} cannot be used: {exc}") from exc
        engine = EngineHost(
            EngineHostConfig.from_settings(
                self.settings.engine,
                model_id=installed.id,
                gguf=installed.path,
                sha256=installed.sha256,
                cache_dir=self.settings.model_cache_dir,
                run_dir=self.settings.run_dir,
                max_context=context_length or self.settings.engine.max_context,
                socket_name=f"engine-{next(self._sockets)}.sock",
            )
        )
        self._attach(engine)
        task = self._spawn(engine.run(), f"engine:{installed.id}")
        try:
            await self._until_ready(engine, task)
        except BaseException:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self._detach(engine)
            raise
        self._loaded[installed.id] = _Loaded(ChatModel(installed, text, engine), task)
        self.registry.add_chat(self._loaded[installed.id].model)
        log.info("model_loaded", model=installed.id, max_context=engine.max_context, pid=engine.pid)
        return engine.max_context

    async def _until_ready(self, engine: EngineHost, task: asyncio.Task[None]) -> None:
        """Wait for the first start (a conversion included); a host that fails to start is not retried here."""
        limit = self.settings.engine.start_timeout_seconds + 30
        deadline = time.monotonic() + limit
        while engine.state is not EngineState.READY:
            if task.done() or engine.last_error is not None:
                raise ModelLoadError(engine.last_error or "the engine host stopped while starting")
            if time.monotonic() > deadline:
                raise ModelLoadError(f"the engine host was not ready after {limit:.0f} s")
            await asyncio.sleep(0.1)

    async def unload(self, model_id: str) -> bool:
        """Stop serving a placed model; in-flight streams get the shutdown grace to finish. False if not loaded."""
        async with self._locks.setdefault(model_id, asyncio.Lock()):
            loaded = self._loaded.pop(model_id, None)
            if loaded is None:
                return False
            self.registry.remove_chat(model_id)
            engine = loaded.model.engine
            deadline = time.monotonic() + self.settings.api.shutdown_grace_seconds
            # Polled: the engine host has no event for "every stream finished", and this runs once per unload.
            while engine.health()["active_streams"] and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            engine.controls.suspend(f"{model_id} was unloaded from this box", code="model_unloaded")
            loaded.task.cancel()
            await asyncio.gather(loaded.task, return_exceptions=True)
            self._detach(engine)
            log.info("model_unloaded", model=model_id)
            return True

    async def remove(self, model_id: str) -> InstalledModel:
        """Delete a model from the store; refused while this box serves it (ModelInUseError)."""
        async with self._locks.setdefault(model_id, asyncio.Lock()):
            if model_id == self.registry.default_id or any(m.id == model_id for m in self.registry.all()):
                raise ModelInUseError(
                    f"{model_id!r} is served on this box; unload it (or set another default_model) before removing it"
                )
            removed = await asyncio.to_thread(self.store.remove, model_id)
            if removed is None:
                raise ModelNotInStoreError(f"{model_id!r} is not in this box's model store")
            await self.refresh_store_facts()
            log.info("model_removed", model=model_id, bytes=removed.size)
            return removed

    async def stop(self) -> None:
        """On the way out: every placed model's host stops (the default one is the agent's to stop)."""
        for model_id in list(self._loaded):
            await self.unload(model_id)

    def engines(self) -> list[EngineHost]:
        return [loaded.model.engine for loaded in self._loaded.values()]
