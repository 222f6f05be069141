"""`thox config`: read and change `<home>/config.toml` through the same typed schema the agent starts with.

A value is accepted only if the whole file, with the change, still loads as valid settings, so the file on disk
is always one the agent can start from; the message of a refusal names the key and what is wrong. Writes are
atomic (temp file, fsync, rename): a power cut leaves the old file or the new one, never a mix.
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from agent.atomic import atomic_write_bytes
from agent.settings import Settings, SettingsError, env_var, known_keys, load_settings, setting_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 on JetPack 6
    import tomli as tomllib


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from exc


def _plain(value: Any) -> Any:
    """A TOML-storable form of a validated setting."""
    if isinstance(value, Path):
        return str(value)
    return value


def _check_key(key: str) -> None:
    if key not in known_keys():
        raise SettingsError(f"unknown setting {key!r}; known: {', '.join(sorted(known_keys()))}")


class ConfigFile:
    """The TOML settings file of one agent home."""

    def __init__(self, home: Path, env: Mapping[str, str] = os.environ) -> None:
        self.home = home
        self.path = home / "config.toml"
        self._env = env

    def effective(self) -> Settings:
        """The settings an agent started now would run with (file, then environment)."""
        return load_settings(home=self.home, env=self._env)

    def get(self, key: str) -> tuple[Any, str]:
        """(effective value, where it comes from: "file", "environment" or "default")."""
        _check_key(key)
        return self._describe(key, self.effective(), _read(self.path))

    def _describe(self, key: str, settings: Settings, data: dict[str, Any]) -> tuple[Any, str]:
        value = _plain(setting_value(settings, key))
        if env_var(key) in self._env:
            return value, "environment"
        head, _, tail = key.partition(".")
        in_file = tail in data.get(head, {}) if tail else head in data
        return value, "file" if in_file else "default"

    def set(self, key: str, raw: str) -> Any:
        """Store `key = raw` (converted to the setting's type); returns the stored value."""
        _check_key(key)
        data = _read(self.path)
        candidate = _with(data, key, raw)
        validated = self._validate(candidate)
        stored = _plain(setting_value(validated, key))
        self._write(_with(data, key, stored))
        return stored

    def unset(self, key: str) -> bool:
        """Remove `key` from the file (back to its default); False when it was not set there."""
        _check_key(key)
        data = _read(self.path)
        head, _, tail = key.partition(".")
        section = data.get(head) if tail else None
        if tail and isinstance(section, dict) and tail in section:
            del section[tail]
            if not section:
                del data[head]
        elif not tail and head in data:
            del data[head]
        else:
            return False
        self._write(data)
        return True

    def listing(self) -> list[tuple[str, Any, str]]:
        """Every setting as (key, effective value, source)."""
        settings, data = self.effective(), _read(self.path)  # read and validated once, not once per key
        return [(key, *self._describe(key, settings, data)) for key in sorted(known_keys())]

    def _validate(self, data: dict[str, Any]) -> Settings:
        # Validate exactly as `thox serve` will: through load_settings, on a private copy of the file.
        with tempfile.TemporaryDirectory(prefix="thox-config-") as scratch:
            (Path(scratch) / "config.toml").write_bytes(tomli_w.dumps(data).encode())
            settings = load_settings(home=Path(scratch), env={})
        return settings

    def _write(self, data: dict[str, Any]) -> None:
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        # One writer at a time; under the lock no other write is in flight, so any temp file left beside the
        # config is from a writer that was killed (power cut, kill -9) and is swept instead of piling up.
        with (self.home / ".config.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for stale in self.home.glob(f".{self.path.name}.*.tmp"):
                stale.unlink(missing_ok=True)
            atomic_write_bytes(self.path, tomli_w.dumps(data).encode(), mode=0o600)


def _with(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    copy = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    head, _, tail = key.partition(".")
    if tail:
        section = copy.setdefault(head, {})
        if not isinstance(section, dict):
            raise SettingsError(f"{head!r} in the config file is a value, not a section")
        section[tail] = value
    else:
        copy[head] = value
    return copy
