"""HTTP routes of the cluster API (port 5381)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

import agent
from agent.cluster.node import ClusterNode
from agent.engine import EngineHost, EngineState
from agent.hardware.manager import HardwareManager
from agent.live_config import LiveConfig
from agent.monitor import EventLoopMonitor


@dataclass(frozen=True)
class HealthSources:
    """What /v1/health reports on."""

    started_monotonic: float
    engines: tuple[EngineHost, ...]
    event_loop: EventLoopMonitor
    hardware: HardwareManager | None = None
    config: LiveConfig | None = None
    cluster: ClusterNode | None = None
    # Engine hosts of the other chat models (placed by the cluster, loaded by requests): they come and go.
    more_engines: Callable[[], Sequence[EngineHost]] = tuple


HEALTH_KEY = web.AppKey("health_sources", HealthSources)


def health_report(sources: HealthSources, process: dict[str, int | None] | None = None) -> dict[str, Any]:
    """The /v1/health body: `status` is "ok" only while every engine is ready and no thermal limit applies."""
    more = sources.more_engines()
    states = {engine.state for engine in (*sources.engines, *more)}
    if states == {EngineState.READY}:
        status = "ok"
    elif states <= {EngineState.STARTING, EngineState.READY}:
        status = "starting"
    else:
        status = "degraded"
    engines = [engine.health() for engine in sources.engines]
    hardware = sources.hardware.report() if sources.hardware is not None else None
    if status == "ok" and hardware and hardware["thermal"] and hardware["thermal"]["level"] not in ("normal", "warm"):
        status = "throttled"
    return {
        "status": status,
        "uptime_seconds": round(time.monotonic() - sources.started_monotonic, 3),
        "version": agent.__version__,
        "engine": engines[0] if len(engines) == 1 else {"state": status, "models": engines},
        **({"more_models": [engine.health() for engine in more]} if more else {}),
        "event_loop": sources.event_loop.report(),
        **({"temperature_c": hardware.pop("temperature_c"), "hardware": hardware} if hardware else {}),
        **({"config": {"restart_required": sources.config.restart_required}} if sources.config else {}),
        **({"cluster": _cluster_part(sources.cluster)} if sources.cluster else {}),
        **({"process": process} if process is not None else {}),
    }


def _process_figures() -> dict[str, int | None]:
    """pid, resident memory and open descriptors of the agent process: blocking /proc reads, run it in a thread."""
    rss_bytes: int | None = None
    open_fds: int | None = None
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    rss_bytes = int(line.split()[1]) * 1024  # the kernel reports kB
                    break
        # Less the descriptor this very listing holds open on /proc/self/fd.
        open_fds = len(os.listdir("/proc/self/fd")) - 1
    except OSError:
        pass  # no procfs (not Linux): health must still answer, with the figures it cannot know left out as null
    return {"pid": os.getpid(), "rss_bytes": rss_bytes, "open_fds": open_fds}


async def _process_part() -> dict[str, int | None]:
    figures = await asyncio.to_thread(_process_figures)
    # Counted here, on the loop thread: all_tasks() only sees the loop it runs on. Includes this request's own task.
    return {**figures, "asyncio_tasks": len(asyncio.all_tasks())}


def _cluster_part(node: ClusterNode) -> dict[str, Any]:
    # Cheap and local on purpose: health must answer even when etcd does not; /v1/cluster has the full view.
    election = node.election
    return {
        "node_id": node.node_id or None,
        "cluster_id": node.cluster_id,
        "running": election is not None,
        "is_leader": election.is_leader if election is not None else False,
        **({"unavailable": node.unavailable_reason} if node.unavailable_reason else {}),
    }


async def health(request: web.Request) -> web.Response:
    """GET /v1/health: always answers, also while the engine is down (that is when it matters)."""
    return web.json_response(health_report(request.app[HEALTH_KEY], await _process_part()))


def setup_routes(app: web.Application) -> None:
    """Register the cluster API routes."""
    app.router.add_get("/v1/health", health)
