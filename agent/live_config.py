"""Settings changes applied to a running agent: which keys are safe to change live, and the reload itself.

A reload (SIGHUP, `systemctl reload`, `POST /v1/config/reload`, or `thox config set` telling the agent) reads the
layers again exactly as `thox serve` did (same command-line overrides, same environment), compares the result with
what the agent runs, applies the keys in LIVE_KEYS and reports the others as needing a restart. It is all or
nothing: every applier first prepares (and may refuse) before any of them commits, so a bad value never leaves the
agent half-reconfigured. A file that no longer validates changes nothing and is reported.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent.errors import ThoxError
from agent.settings import Settings, SettingsError, env_var, known_keys, load_settings, setting_value

log = structlog.get_logger("agent.config")

# Keys a running agent applies at once. Everything else is read once at start (ports, bind address, engine shape,
# driver strings, the model the first engine host loads) and needs a restart.
LIVE_KEYS = frozenset(
    {
        "api.auth",
        "api.allow",
        "api.allowed_hosts",
        "api.rate_limit",
        "api.cluster_rate_limit",
        "api.rate_limit_loopback",
        "hardware.warm_c",
        "hardware.throttle_c",
        "hardware.hot_c",
        "hardware.emergency_margin_c",
        "hardware.hysteresis_c",
        "hardware.min_dwell_seconds",
        "mcp.debug",
        "mcp.call_timeout_seconds",
        "mcp.max_tool_rounds",
        "registry.url",
        "default_model",
        "models.keep_alive_seconds",
        "models.max_loaded",
    }
)

# An applier looks at the new settings and either refuses (raises ValueError with a message naming the key) or
# returns the commit that switches the running component over; commits must not fail.
Applier = Callable[[Settings], Callable[[], None]]


class ConfigReloadError(ThoxError):
    """The configuration on disk cannot be applied; the running agent keeps what it has."""


@dataclass(frozen=True)
class ReloadReport:
    """What a reload did."""

    applied: list[str] = field(default_factory=list)  # changed and now in force
    restart_required: list[str] = field(default_factory=list)  # changed on disk; in force after a restart
    pinned: list[str] = field(default_factory=list)  # set by environment or command line: the file cannot change

    def as_json(self) -> dict[str, Any]:
        return {"applied": self.applied, "restart_required": self.restart_required, "pinned": self.pinned}


def _with_values(settings: Settings, source: Settings, keys: list[str]) -> Settings:
    """`settings` with `keys` taken from `source` (both already validated, so the copy needs no validation)."""
    data = settings.model_dump()
    for key in keys:
        head, _, tail = key.partition(".")
        if tail:
            data[head][tail] = setting_value(source, key)
        else:
            data[head] = setting_value(source, key)
    return Settings.model_validate(data)


def setting_value_in(data: Mapping[str, Any], key: str) -> Any:
    head, _, tail = key.partition(".")
    return data[head][tail] if tail else data[head]


class LiveConfig:
    """The settings the agent runs with, and how to bring them up to date with the file."""

    def __init__(
        self, settings: Settings, overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        self.running = settings
        self._overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        self._env = dict(env) if env is not None else None
        self._appliers: list[Applier] = []
        self._pending: list[str] = []
        self._lock = asyncio.Lock()

    @property
    def restart_required(self) -> list[str]:
        """Keys changed on disk since start that only a restart applies."""
        return list(self._pending)

    def running_values(self) -> dict[str, Any]:
        """Every setting the agent runs with, by dotted key, JSON-ready (paths as strings)."""
        data = self.running.model_dump(mode="json")
        return {key: setting_value_in(data, key) for key in sorted(known_keys())}

    def add_applier(self, applier: Applier) -> None:
        self._appliers.append(applier)

    def _load(self) -> tuple[Settings, list[str]]:
        home: Path = self.running.home
        kwargs: dict[str, Any] = {"home": home}
        if self._env is not None:
            kwargs["env"] = self._env
        settings = load_settings(self._overrides, **kwargs)
        env = self._env if self._env is not None else os.environ
        pinned = sorted(key for key in known_keys() if key in self._overrides or env_var(key) in env)
        return settings, pinned

    async def reload(self) -> ReloadReport:
        """Read the settings again and apply what can be applied live; raises ConfigReloadError."""
        async with self._lock:  # two reloads at once would diff against the same old state
            try:
                new, pinned = await asyncio.to_thread(self._load)
            except SettingsError as exc:
                log.error("config_reload_refused", error=str(exc))
                raise ConfigReloadError(str(exc)) from exc
            changed = [
                key for key in sorted(known_keys()) if setting_value(new, key) != setting_value(self.running, key)
            ]
            live = [key for key in changed if key in LIVE_KEYS]
            restart = [key for key in changed if key not in LIVE_KEYS]
            candidate = _with_values(self.running, new, live)
            try:
                commits = [applier(candidate) for applier in self._appliers]
            except ValueError as exc:
                log.error("config_reload_refused", error=str(exc))
                raise ConfigReloadError(str(exc)) from exc
            for commit in commits:
                commit()
            self.running = candidate
            self._pending = restart
            report = ReloadReport(applied=live, restart_required=restart, pinned=pinned)
            log.info("config_reloaded", applied=live, restart_required=restart)
            return report
