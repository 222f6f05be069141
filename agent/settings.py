"""Typed, frozen settings: defaults < `$THOX_HOME/config.toml` < environment (`THOX_*`) < command line.

Every setting has a dotted key (`api.inference_port`); its environment variable is `THOX_` plus the key in upper
case with dots as underscores (`THOX_API_INFERENCE_PORT`). Unknown keys and bad values are refused with a message
naming the key.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import ThoxError
from agent.hardware.governor import GovernorConfig
from agent.security.policy import AllowList
from engines import executors

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 on JetPack 6
    import tomli as tomllib

Profile = Literal["sim", "device"]


class SettingsError(ThoxError):
    """A setting is unknown or has a bad value; the message names the key and the source."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ApiSettings(_Section):
    """Where and how the two HTTP APIs listen."""

    bind: str | None = Field(None, description="Bind address; default 127.0.0.1 (sim profile) or 0.0.0.0 (device)")
    inference_port: int = Field(8080, ge=0, le=65535, description="OpenAI-compatible API port; 0 picks a free one")
    cluster_port: int = Field(5381, ge=0, le=65535, description="Cluster API port; 0 picks a free one")
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest accepted request body")
    shutdown_grace_seconds: float = Field(10.0, ge=0, description="How long in-flight streams may finish on stop")
    auth: Literal["remote", "always", "off"] = Field(
        "remote",
        description="remote: a key for every client but this device itself; always: a key for every "
        "request; off: no keys (logged as a warning)",
    )
    allow: str = Field(
        "loopback,private",
        description="Client addresses served: loopback, private, public, any, "
        "or CIDR ranges, comma-separated; others get 403",
    )
    allowed_hosts: str = Field(
        "",
        description="Extra host names this device answers to (Host/Origin check), "
        "comma-separated; localhost, thox.local and the hostname are always allowed",
    )
    rate_limit: int = Field(100, ge=1, description="Inference requests per minute per key (per address when keyless)")
    cluster_rate_limit: int = Field(1000, ge=1, description="Cluster API requests per minute per key or address")
    rate_limit_loopback: bool = Field(False, description="Also rate-limit clients on this device itself")

    @field_validator("allow")
    @classmethod
    def _allow_parses(cls, value: str) -> str:
        # Refused here, not at start: `thox config set` must never store a value the agent cannot start with.
        AllowList.parse(value, setting="entry")
        return value


class EngineSettings(_Section):
    """The engine host process and what it runs."""

    executor: str = Field("onnxruntime", description="What runs the chat model (onnxruntime: CPU)")
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, description="CPU threads for inference")
    max_context: int = Field(2048, ge=64, description="Tokens per sequence (prompt plus completion)")
    max_batch: int = Field(16, ge=1, le=256, description="Sequences decoded together in one batched step")
    max_queue: int = Field(64, ge=0, description="Requests waiting for a batch slot; beyond it new ones get 503")
    kv_budget_tokens: int = Field(
        16384, ge=64, description="KV cache bound: live sequences times the longest (prompt + max_tokens)"
    )
    prefix_cache_tokens: int = Field(
        1024, ge=0, description="KV of recent prompts kept for prefix reuse, ~46 KB a token (0 turns it off)"
    )
    start_timeout_seconds: float = Field(600.0, gt=0, description="Longest wait for a (first) model conversion")
    ready_wait_seconds: float = Field(
        15.0, ge=0, description="How long a request waits for a (re)starting engine before it gets a 503"
    )

    @field_validator("executor")
    @classmethod
    def _executor_known(cls, value: str) -> str:
        if value not in executors.names():
            raise ValueError(f"no executor named {value!r}; known: {', '.join(executors.names())}")
        return value


# Driver config strings per profile (drivers/registry.py documents the syntax). The device column is the Thox
# carrier board's wiring; a board wired differently sets its own strings, and "none" leaves a capability out.
_DEVICE_DRIVERS = {
    "thermal": "sysfs:/sys",
    "fan": "hwmon:/sys",
    "power_mode": "nvpmodel",
    "pd": "stusb4500:i2c-7@0x28",
    "power_monitor": "ina226:i2c-7@0x40",
    "dock": "gpio:gpiochip0:17",
    "nfc": "tty:THS2:pn532",
    "serial": "serial:/dev/ttyTHS1",
}


class HardwareSettings(_Section):
    """Which drivers run, how often they are polled, and the thermal governor's thresholds."""

    thermal: str | None = Field(
        None, description="Thermal sources, comma-separated (sim; sysfs:/sys; tmp117:i2c-1@0x48)"
    )
    fan: str | None = Field(None, description="Fan (sim; hwmon:/sys; none)")
    power_mode: str | None = Field(None, description="Power mode control (sim; nvpmodel; none)")
    pd: str | None = Field(
        None, description="USB-PD controller on the dock port (sim; stusb4500:i2c-7@0x28; tps25750:i2c-7@0x21; none)"
    )
    power_monitor: str | None = Field(None, description="Power monitor on the dock port (sim; ina226:i2c-7@0x40)")
    dock: str | None = Field(None, description="Dock switch (sim; gpio:gpiochip0:17; none)")
    nfc: str | None = Field(None, description="NFC reader (sim; usb; tty:THS2:pn532; udp:localhost:54321; none)")
    serial: str | None = Field(None, description="Dock controller link (sim; serial:/dev/ttyTHS1; none)")
    thermal_poll_seconds: float = Field(1.0, gt=0, le=60, description="Thermal poll interval")
    power_poll_seconds: float = Field(1.0, gt=0, le=60, description="Power monitor, PD and fan poll interval")
    serial_poll_seconds: float = Field(5.0, gt=0, le=300, description="Dock controller status poll interval")
    nfc_read_timeout_seconds: float = Field(2.0, gt=0, le=30, description="How long a dock event waits for NFC")
    warm_c: float = Field(70.0, description="Thermal level WARM from here: fan to cool")
    throttle_c: float = Field(80.0, description="THROTTLE from here: half the engine's concurrency, builds paused")
    hot_c: float = Field(88.0, description="HOT from here: one sequence at a time")
    emergency_margin_c: float = Field(
        5.0, gt=0, description="EMERGENCY (inference stopped) this far below the kernel's critical trip"
    )
    hysteresis_c: float = Field(5.0, gt=0, description="A level is left this far below where it was entered")
    min_dwell_seconds: float = Field(10.0, ge=0, description="Shortest stay in a level before stepping down")

    @model_validator(mode="after")
    def _thresholds_consistent(self) -> HardwareSettings:
        self.governor_config()  # ValueError naming the threshold: a config the governor refuses is never stored
        return self

    def governor_config(self) -> GovernorConfig:
        """The thermal governor's configuration from these settings."""
        return GovernorConfig(
            warm_c=self.warm_c,
            throttle_c=self.throttle_c,
            hot_c=self.hot_c,
            emergency_margin_c=self.emergency_margin_c,
            hysteresis_c=self.hysteresis_c,
            min_dwell_s=self.min_dwell_seconds,
        )

    def driver(self, capability: str, profile: Profile) -> str:
        """The config string of one capability after applying the profile's default."""
        value: str | None = getattr(self, capability)
        if value is not None:
            return value
        return "sim" if profile == "sim" else _DEVICE_DRIVERS[capability]


class ClusterSettings(_Section):
    """The MagStack cluster: this box's etcd member, peer API and identity (docs/cluster.md)."""

    enabled: bool = Field(True, description="Run the cluster layer (an etcd member, leader lease, topology)")
    node_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="This box's id in the cluster; default: generated once and kept",
    )
    advertise: str | None = Field(
        None,
        description="Address other boxes reach this one at; default: the bind "
        "address, or the first non-loopback address when binding all interfaces",
    )
    peer_port: int = Field(5382, ge=1, le=65535, description="Peer API (mutual TLS; join endpoint)")
    etcd_peer_port: int = Field(5383, ge=1, le=65535, description="etcd peer traffic (mutual TLS)")
    etcd_client_port: int = Field(
        5384, ge=1, le=65535, description="etcd client port for this box, on 127.0.0.1 (mutual TLS)"
    )
    etcd_client_tls_port: int = Field(
        5385, ge=1, le=65535, description="etcd client port for boxes whose own member cannot serve them (mutual TLS)"
    )
    mdns: bool = Field(
        True,
        description="Advertise thox.local, the OpenAI API and the cluster by mDNS, and find "
        "peers for `thox cluster join` without --server",
    )
    lease_ttl_seconds: int = Field(
        1, ge=1, le=60, description="Leader lease: a dead leader is replaced within it (plus an etcd election)"
    )
    node_ttl_seconds: int = Field(
        3,
        ge=1,
        le=60,
        description="Node liveness lease: a dead box leaves the topology "
        "within it; longer than the leader's so a busy box is not dropped by mistake",
    )
    model_memory_gb: float | None = Field(
        None,
        gt=0,
        description="Memory this box offers to models (placed by the cluster or loaded by requests); default: all "
        "of its RAM",
    )
    remove_after_seconds: float = Field(
        60.0,
        ge=5,
        le=86400,
        description="A member gone this long (no live record) is removed from etcd and a learner takes its vote",
    )


class McpSettings(_Section):
    """The MCP host: the servers the agent runs and calls tools on (docs in README, "MCP servers")."""

    debug: bool = Field(False, description="Log every MCP tool call's arguments and result (topic mcp)")
    filesystem_roots: str = Field(
        "", description="Folders the filesystem server may touch, comma-separated; default <home>/workspace"
    )
    git_repository: str = Field("", description="The repository the git server works on; default <home>/workspace")
    shell_allow: str = Field(
        "ls,cat,head,tail,wc,grep,echo,pwd,date,uname",
        description="Commands the shell server may run (its first word), comma-separated; no shell syntax",
    )
    shell_timeout_seconds: float = Field(10.0, gt=0, le=600, description="A shell command is killed after this")
    shell_max_output_bytes: int = Field(
        65536, ge=1024, le=16 * 1024 * 1024, description="Output kept of a shell command (the rest is cut)"
    )
    call_timeout_seconds: float = Field(60.0, gt=0, le=3600, description="Longest wait for one MCP tool call")
    max_tool_rounds: int = Field(
        4, ge=1, le=16, description="Model -> MCP tool -> model rounds one chat completion may take"
    )


class ModelsSettings(_Section):
    """Which chat models stay loaded (agent/models/residency.py): like Ollama's keep_alive and max loaded models."""

    keep_alive_seconds: float = Field(
        300.0,
        ge=-1,
        description="How long a model a request loaded stays loaded after its last request (-1: until unloaded; "
        "a request's keep_alive overrides it)",
    )
    max_loaded: int = Field(
        3, ge=1, le=32, description="Chat models loaded at once on this box; loading one more unloads the idlest"
    )


# Where scripts/model-registry.sh serves the development registry (make run publishes the bundled models to it).
DEFAULT_REGISTRY_URL = "http://127.0.0.1:5390"


class RegistrySettings(_Section):
    """The OCI registry models are pulled from and pushed to (docs: README, "Models")."""

    url: str = Field(
        DEFAULT_REGISTRY_URL,
        pattern=r"^https?://[^\s/]+(/[^\s]*)?$",
        description="Base URL of the OCI registry (any registry serving OCI manifests); a fleet sets its own",
    )


class Settings(_Section):
    """All agent settings."""

    home: Path = Field(description="Agent home: model store, cache, config, runtime sockets")
    profile: Profile = Field("sim", description="sim: simulated hardware, loopback only; device: real hardware")
    default_model: str | None = Field(
        None, description="Chat model used when a request names none; default: the first installed"
    )
    log_format: Literal["auto", "json", "console"] = Field("auto", description="auto: console on a TTY, else JSON")
    cache_dir: Path | None = Field(None, description="Converted-model cache; default <home>/cache")
    api: ApiSettings = Field(default_factory=ApiSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    hardware: HardwareSettings = Field(default_factory=HardwareSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    mcp: McpSettings = Field(default_factory=McpSettings)
    models: ModelsSettings = Field(default_factory=ModelsSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)

    @property
    def bind_host(self) -> str:
        """The address the APIs bind, after applying the profile's default."""
        if self.api.bind is not None:
            return self.api.bind
        return "127.0.0.1" if self.profile == "sim" else "0.0.0.0"  # noqa: S104 - the device serves its LAN

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def model_cache_dir(self) -> Path:
        return self.cache_dir or self.home / "cache"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def config_file(self) -> Path:
        return self.home / "config.toml"

    @property
    def keys_file(self) -> Path:
        return self.home / "keys.json"

    @property
    def cluster_dir(self) -> Path:
        return self.home / "cluster"

    @property
    def mcp_dir(self) -> Path:
        return self.home / "mcp"

    @property
    def workspace_dir(self) -> Path:
        """Where the filesystem and git MCP servers work unless told otherwise."""
        return self.home / "workspace"


def default_home(env: Mapping[str, str] = os.environ) -> Path:
    """`$THOX_HOME`, else `~/.thox`."""
    return Path(env.get("THOX_HOME") or Path.home() / ".thox").expanduser()


def setting_value(settings: Settings, key: str) -> Any:
    """The value of a dotted key (`api.rate_limit`)."""
    value: Any = settings
    for part in key.split("."):
        value = getattr(value, part)
    return value


def env_var(key: str) -> str:
    """The environment variable that overrides a dotted key: `api.rate_limit` -> `THOX_API_RATE_LIMIT`."""
    return "THOX_" + key.upper().replace(".", "_")


def known_keys() -> dict[str, type[BaseModel] | None]:
    """Every dotted setting key (home excepted: it is where the file lives)."""
    keys: dict[str, type[BaseModel] | None] = {}
    for name, field in Settings.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, _Section):
            for sub in section.model_fields:
                keys[f"{name}.{sub}"] = None
        elif name != "home":
            keys[name] = None
    return keys


def _set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    head, _, tail = key.partition(".")
    if tail:
        target.setdefault(head, {})[tail] = value
    else:
        target[head] = value


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    home: Path | None = None,
    env: Mapping[str, str] = os.environ,
) -> Settings:
    """Merge the layers and validate; raises SettingsError naming the offending key and its source."""
    home = (home or default_home(env)).expanduser().resolve()
    known = known_keys()
    layers: list[tuple[str, dict[str, Any]]] = []
    config_file = home / "config.toml"
    if config_file.is_file():
        try:
            layers.append((str(config_file), _flatten(tomllib.loads(config_file.read_text()))))
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{config_file}: not valid TOML: {exc}") from exc
    env_layer = {key: env[name] for key in known if (name := env_var(key)) in env}
    layers.append(("environment", env_layer))
    layers.append(("command line", {k: v for k, v in (overrides or {}).items() if v is not None}))

    merged: dict[str, Any] = {"home": home}
    for source, layer in layers:
        for key, value in layer.items():
            if key not in known:
                raise SettingsError(f"unknown setting {key!r} in {source}; known: {', '.join(sorted(known))}")
            _set_dotted(merged, key, value)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)
        )
        raise SettingsError(f"invalid settings: {problems}") from exc
