"""Configuration routes of the cluster API: the settings in force, and applying what changed in the config file."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from aiohttp import web

from agent.errors import UnprocessableError
from agent.live_config import ConfigReloadError, LiveConfig
from agent.security.keys import KeyStore

LIVE_CONFIG_KEY = web.AppKey("live_config", LiveConfig)
KEY_STORE_KEY = web.AppKey("key_store", KeyStore)


async def show_config(request: web.Request) -> web.Response:
    """GET /v1/config: the settings in force, keys changed on disk that wait for a restart, and key counts."""
    live = request.app[LIVE_CONFIG_KEY]
    body: dict[str, Any] = {"settings": live.running_values(), "restart_required": live.restart_required}
    keys = request.app.get(KEY_STORE_KEY)
    if keys is not None:
        scopes = Counter(record.scope for record in await asyncio.to_thread(keys.list))
        body["api_keys"] = {"count": sum(scopes.values()), "by_scope": dict(scopes)}
    return web.json_response(body)


async def reload_config(request: web.Request) -> web.Response:
    """POST /v1/config/reload: 200 with what was applied and what needs a restart; 422 if the file is invalid."""
    try:
        report = await request.app[LIVE_CONFIG_KEY].reload()
    except ConfigReloadError as exc:
        raise UnprocessableError(f"the configuration was not applied: {exc}", code="invalid_config") from exc
    return web.json_response(report.as_json())


def setup_routes(app: web.Application) -> None:
    """Register the configuration routes."""
    app.router.add_get("/v1/config", show_config)
    app.router.add_post("/v1/config/reload", reload_config)
