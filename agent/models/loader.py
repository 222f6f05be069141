"""Loading and unloading chat models on this box while it runs: one engine host process per model.

The model the agent starts with (and the embedding model beside it) is served by the engine host the agent starts;
every other chat model gets an engine host of its own, so a fault in one model's process never touches another.
Models come three ways: the cluster places them here (`load`/`unload`), a request names an installed model that is
not loaded (`ensure`, kept `keep_alive` seconds after its last request), or `default_model` changes (`set_default`).
What stays and what makes room is agent/models/residency.py's. A model is served (added to the registry) only once
its engine is ready; on unload it leaves the registry first, so no new request reaches it, then its streams get a
grace period to finish before its host stops.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from agent.engine import EngineHost, EngineHostConfig
from agent.engine.host import EngineState
from agent.errors import AgentError, ModelNotFoundError
from agent.models.registry import CHAT, ChatModel, ModelRegistry
from agent.models.residency import FOREVER, NoRoom, Residency, evictions, kv_bytes_per_token, model_bytes
from agent.models.store import InstalledModel, ModelStore
from agent.settings import Settings
from engines.base import EngineError

log = structlog.get_logger("agent.models.loader")

# How often idle models loaded on demand are checked against their keep_alive.
EXPIRY_CHECK_SECONDS = 0.5

Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


def _store_facts(store: ModelStore) -> dict[str, dict[str, Any]]:
    """Blocking: per installed model its size, whether it chats, and the KV bytes one token takes (chat models)."""
    facts: dict[str, dict[str, Any]] = {}
    for model in store.installed():
        chat = CHAT in model.capabilities
        kv = None
        if chat:
            try:
                kv = kv_bytes_per_token(model)
            except EngineError as exc:
                log.warning("model_unreadable", model=model.id, error=str(exc))
                continue
        facts[model.id] = {"size": model.size, "chat": chat, "kv_bytes_per_token": kv}
    return facts


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 0


class ModelLoadError(AgentError):
    """A model could not be loaded (or removed) here; the message says why, `status`/`code` what the API answers."""

    status = 500
    code = "model_load_failed"


class ModelNotInStoreError(ModelLoadError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class ModelInUseError(ModelLoadError):
    status = 409
    type = "invalid_request_error"
    code = "model_in_use"


class NoRoomError(ModelLoadError):
    """Loading the model would pass the box's bounds and nothing idle can make room."""

    status = 503
    code = "model_capacity"
    retry_after = 5


@dataclass
class _Loaded:
    model: ChatModel
    task: asyncio.Task[None] | None  # None: the agent's own engine host, which the agent stops
    residency: Residency


class ModelLoader:
    """The chat models this box serves, each on its own engine host, and which of them stay loaded."""

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
        self._room = asyncio.Lock()  # one admission at a time: two loads must not both take the last room
        self._sockets = itertools.count(1)
        self.store_facts: dict[str, dict[str, Any]] = {}  # what this box's store holds, for the cluster
        self.keep_alive = settings.models.keep_alive_seconds
        self.max_loaded = settings.models.max_loaded
        self._defaulting: asyncio.Task[None] | None = None
        started = registry.chat(None)
        self._loaded[started.id] = _Loaded(started, None, Residency(started.id, 0, pinned=True))

    # ------------------------------------------------------------------ state

    async def refresh_store_facts(self) -> None:
        """Re-read the store (at start and after a model was copied in): sizes and KV cost of each model."""
        self.store_facts = await asyncio.to_thread(_store_facts, self.store)
        for loaded in self._loaded.values():
            loaded.residency.bytes = self._estimate(loaded.model.id)
            if loaded.task is None:  # the agent's own host serves the embedding models too
                embeddings = [m for m in self.registry.all() if not isinstance(m, ChatModel)]
                loaded.residency.bytes += sum(m.installed.size for m in embeddings)

    def placed(self) -> list[str]:
        """Ids of the models the cluster placed here and that are ready."""
        return sorted(model_id for model_id, loaded in self._loaded.items() if loaded.residency.placed)

    def residency(self, model_id: str) -> Residency | None:
        loaded = self._loaded.get(model_id)
        return loaded.residency if loaded is not None else None

    def budget_bytes(self) -> int:
        offered = self.settings.cluster.model_memory_gb
        return int(offered * 1e9) if offered else _memory_bytes()

    def _estimate(self, model_id: str) -> int:
        return model_bytes(self.store_facts.get(model_id) or {}, self.settings.engine.kv_budget_tokens)

    def engines(self) -> list[EngineHost]:
        """The engine hosts this loader started (not the agent's own)."""
        return [loaded.model.engine for loaded in self._loaded.values() if loaded.task is not None]

    # ------------------------------------------------------------------ loading

    async def load(self, model_id: str, context_length: int | None = None) -> int:
        """The cluster placed an installed chat model here: serve it until `unload`; returns its context length."""
        loaded = await self._ensure_loaded(model_id, context_length)
        loaded.residency.placed = True
        return loaded.model.engine.max_context

    async def ensure(self, model_id: str, keep_alive: float | None = None) -> ChatModel:
        """A request names `model_id`: load it if it is installed and not loaded, and keep it `keep_alive` seconds
        (default `models.keep_alive_seconds`) after this request. ModelNotFoundError names what is installed."""
        if model_id not in self._loaded:
            installed = await asyncio.to_thread(self.store.get, model_id)
            if installed is None or CHAT not in installed.capabilities:
                raise await self._not_found(model_id)
        loaded = await self._ensure_loaded(model_id, None)
        self.touch(model_id, keep_alive)
        return loaded.model

    def touch(self, model_id: str, keep_alive: float | None = None) -> None:
        """A request for a loaded model: its keep_alive counts from now (a request's own value replaces it)."""
        loaded = self._loaded.get(model_id)
        if loaded is not None:
            loaded.residency.last_used = time.monotonic()
            if keep_alive is not None:
                loaded.residency.keep_alive = keep_alive
            elif loaded.residency.evictable and loaded.residency.keep_alive == FOREVER:
                loaded.residency.keep_alive = self.keep_alive

    async def _not_found(self, model_id: str) -> ModelNotFoundError:
        installed = await asyncio.to_thread(self.store.installed)
        chat = sorted(m.id for m in installed if CHAT in m.capabilities)
        return ModelNotFoundError(
            f"The model '{model_id}' does not exist on this box; installed chat models: {', '.join(chat) or 'none'} "
            "(`thox models pull NAME` gets one from the model registry)",
            param="model",
        )

    async def _ensure_loaded(self, model_id: str, context_length: int | None) -> _Loaded:
        async with self._locks.setdefault(model_id, asyncio.Lock()):
            current = self._loaded.get(model_id)
            if current is not None:
                return current
            installed = await asyncio.to_thread(self.store.get, model_id)
            if installed is None:
                raise ModelNotInStoreError(f"{model_id!r} is not in this box's model store")
            if CHAT not in installed.capabilities:
                raise ModelLoadError(f"{model_id!r} is not a chat model; only chat models are loaded on demand")
            async with self._room:
                await self._make_room(model_id)
                return await self._start(installed, context_length)

    async def _make_room(self, model_id: str) -> None:
        if model_id not in self.store_facts:
            await self.refresh_store_facts()
        busy = {m for m, loaded in self._loaded.items() if loaded.model.engine.in_flight}
        try:
            leaving = evictions(
                [loaded.residency for loaded in self._loaded.values()],
                model_id,
                self._estimate(model_id),
                self.budget_bytes(),
                self.max_loaded,
                busy,
            )
        except NoRoom as exc:
            raise NoRoomError(f"{model_id!r} cannot be loaded now: {exc}") from exc
        for victim in leaving:
            log.info("model_evicted", model=victim, for_model=model_id)
            await self._stop(victim)

    async def _start(self, installed: InstalledModel, context_length: int | None) -> _Loaded:
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
        loaded = _Loaded(
            ChatModel(installed, text, engine), task, Residency(installed.id, self._estimate(installed.id))
        )
        self._loaded[installed.id] = loaded
        self.registry.add_chat(loaded.model)
        log.info("model_loaded", model=installed.id, max_context=engine.max_context, pid=engine.pid)
        return loaded

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

    # ------------------------------------------------------------------ unloading

    async def unload(self, model_id: str) -> bool:
        """The cluster withdrew a placement: stop serving the model (unless it is the default, which stays, no
        longer placed). In-flight streams get the shutdown grace to finish. False if it was not placed here."""
        async with self._locks.setdefault(model_id, asyncio.Lock()):
            loaded = self._loaded.get(model_id)
            if loaded is None or not loaded.residency.placed:
                return False
            loaded.residency.placed = False
            if loaded.residency.pinned:
                return True
            await self._stop(model_id)
            return True

    async def _stop(self, model_id: str) -> None:
        loaded = self._loaded.pop(model_id, None)
        if loaded is None or loaded.task is None:
            return
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

    async def expire(self) -> None:
        """Unload the models loaded on demand whose keep_alive has run out while idle."""
        now = time.monotonic()
        for model_id, loaded in list(self._loaded.items()):
            if loaded.model.engine.in_flight:
                loaded.residency.last_used = now  # keep_alive counts from the end of the last request
            elif loaded.residency.expired(now):
                async with self._locks.setdefault(model_id, asyncio.Lock()):
                    if self._loaded.get(model_id) is loaded and not loaded.model.engine.in_flight:
                        log.info("model_expired", model=model_id, keep_alive=loaded.residency.keep_alive)
                        await self._stop(model_id)

    async def run_expiry(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_CHECK_SECONDS)
            await self.expire()

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
        """On the way out: every host this loader started stops (the agent's own is the agent's to stop)."""
        if self._defaulting is not None:
            self._defaulting.cancel()
            await asyncio.gather(self._defaulting, return_exceptions=True)
        for model_id in list(self._loaded):
            await self._stop(model_id)

    # ------------------------------------------------------------------ the default model

    async def set_default(self, model_id: str) -> None:
        """Make `model_id` the model of requests that name none, once it is loaded; the previous default (unless it
        is the one the agent started with) is kept `models.keep_alive_seconds` from now, like a model a request
        loaded."""
        if model_id == self.registry.default_id:
            return
        loaded = await self._ensure_loaded(model_id, None)
        previous = self._loaded.get(self.registry.default_id)
        self.registry.set_default(model_id)
        loaded.residency.pinned = True
        if previous is not None and previous.task is not None:
            previous.residency.pinned = False
            previous.residency.keep_alive = self.keep_alive
            previous.residency.last_used = time.monotonic()
        log.info("default_model_changed", model=model_id)

    def prepare_settings(self, settings: Settings) -> Callable[[], None]:
        """Live config: models.keep_alive_seconds, models.max_loaded and default_model (validated against the store
        as this box last read it; the switch happens once the new default is loaded)."""
        wanted = settings.default_model
        if (
            wanted is not None
            and wanted != self.registry.default_id
            and not self.store_facts.get(wanted, {}).get("chat")
        ):
            chat = sorted(model_id for model_id, facts in self.store_facts.items() if facts.get("chat"))
            raise ValueError(f"default_model {wanted!r} is not an installed chat model; installed: {', '.join(chat)}")

        def commit() -> None:
            self.keep_alive = settings.models.keep_alive_seconds
            self.max_loaded = settings.models.max_loaded
            if wanted is not None and wanted != self.registry.default_id:
                if self._defaulting is not None:
                    self._defaulting.cancel()
                self._defaulting = self._spawn(self._switch_default(wanted), "default-model")

        return commit

    async def _switch_default(self, model_id: str) -> None:
        try:
            await self.set_default(model_id)
        except ModelLoadError as exc:
            log.error("default_model_not_loaded", model=model_id, error=exc.message)
