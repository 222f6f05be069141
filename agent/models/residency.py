"""Which chat models stay loaded on a box, in the manner of Ollama's `keep_alive`.

A model loaded because a request named it stays loaded `keep_alive` seconds after its last request (the request's
own `keep_alive`, else `models.keep_alive_seconds`; negative: until unloaded; 0: unloaded once idle). Loading one
more model past the box's bounds, `models.max_loaded` chat models and the memory it offers to models
(`cluster.model_memory_gb`, default all of its RAM), first unloads the least recently used idle ones. The default
model, the model the agent started with and models the cluster placed here are never unloaded to make room.

Memory is the estimate the cluster's placement uses too: a model's weights plus a KV cache filled to the engine's
budget, so a box never takes on demand what the placement believes it cannot hold.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.errors import ThoxError
from engines.convert.gguf_model import GgufModel

if TYPE_CHECKING:
    from agent.models.store import InstalledModel

FOREVER = -1.0
# The CPU engine keeps keys and values in float32 (engines/onnxruntime/executor.py kv_bytes_per_token).
_KV_BYTES_PER_VALUE = 4

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+)ms)?$")


def parse_keep_alive(value: float | str) -> float:
    """Seconds from a number or a duration such as "5m", "1h30m", "45s", "500ms" (negative: forever).

    ValueError with a message naming the accepted forms otherwise."""
    if isinstance(value, bool):
        # ValueError, not TypeError: pydantic turns it into the request's 400 naming keep_alive.
        raise ValueError("keep_alive must be a number of seconds or a duration such as '5m'")  # noqa: TRY004
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("keep_alive must be a finite number of seconds")
        return FOREVER if value < 0 else float(value)
    text = value.strip()
    try:
        return parse_keep_alive(float(text))
    except ValueError:
        pass
    negative = text.startswith("-")
    match = _DURATION.match(text.removeprefix("-"))
    if not text.removeprefix("-") or match is None:
        raise ValueError(
            f"keep_alive {value!r} is not a duration; use seconds (300), a duration ('5m', '1h30m', '45s') or a "
            "negative value to keep the model loaded"
        )
    hours, minutes, seconds, millis = (float(part or 0) for part in match.groups())
    total = hours * 3600 + minutes * 60 + seconds + millis / 1000
    return FOREVER if negative else total


def kv_bytes_per_token(model: InstalledModel) -> int | None:
    """Blocking: the KV cache bytes one token of a GGUF chat model takes in the CPU engine (None: not a GGUF).
    EngineError when the file cannot be read."""
    if model.format != "gguf" or not model.path.is_file():
        return None
    config = GgufModel(model.path).config
    return config.n_layers * 2 * config.n_kv_heads * config.head_dim * _KV_BYTES_PER_VALUE


def model_bytes(facts: Mapping[str, Any], kv_budget_tokens: int) -> int:
    """Estimated memory of a model in an engine: its weights plus a KV cache filled to the engine's budget."""
    kv = int(facts.get("kv_bytes_per_token") or 0) * kv_budget_tokens
    return int(facts.get("size") or 0) + kv


@dataclass
class Residency:
    """One chat model loaded here, and why it stays."""

    model_id: str
    bytes: int
    pinned: bool = False  # the default model, or the one the agent started with
    placed: bool = False  # the cluster placed it here: it stays until the placement goes
    keep_alive: float = FOREVER
    last_used: float = field(default_factory=time.monotonic)

    @property
    def evictable(self) -> bool:
        return not (self.pinned or self.placed)

    def expired(self, now: float) -> bool:
        """Loaded on demand and idle for longer than its keep_alive."""
        return self.evictable and self.keep_alive >= 0 and now - self.last_used >= self.keep_alive

    def expires_in(self, now: float) -> float | None:
        """Seconds until it is unloaded when idle; None when it stays."""
        if not self.evictable or self.keep_alive < 0:
            return None
        return max(0.0, self.keep_alive - (now - self.last_used))


class NoRoom(ThoxError):  # noqa: N818 - a verdict, not a failure of the code
    """The model cannot be loaded beside the ones that must stay; the message says which and why."""


def evictions(
    loaded: Iterable[Residency], model_id: str, needed: int, budget: int, max_loaded: int, busy: set[str]
) -> list[str]:
    """The models to unload, least recently used first, so that `model_id` (needing `needed` bytes) fits; NoRoom
    when even unloading every idle, evictable model would not make room."""
    resident = [r for r in loaded if r.model_id != model_id]
    used = sum(r.bytes for r in resident)
    count = len(resident)
    chosen: list[str] = []
    candidates = sorted((r for r in resident if r.evictable and r.model_id not in busy), key=lambda r: r.last_used)
    for victim in candidates:
        if count + 1 <= max_loaded and used + needed <= budget:
            break
        chosen.append(victim.model_id)
        count -= 1
        used -= victim.bytes
    if count + 1 > max_loaded:
        raise NoRoom(
            f"{count} chat models must stay loaded here (models.max_loaded is {max_loaded}): "
            f"{_staying(resident, chosen)}; unload one or raise models.max_loaded"
        )
    if used + needed > budget:
        raise NoRoom(
            f"{model_id!r} needs about {needed / 1e9:.2f} GB (weights plus KV cache) and {used / 1e9:.2f} GB of the "
            f"{budget / 1e9:.2f} GB this box offers to models is taken by models that must stay: "
            f"{_staying(resident, chosen)}"
        )
    return chosen


def _staying(resident: list[Residency], leaving: list[str]) -> str:
    def why(r: Residency) -> str:
        return "the default or the first model" if r.pinned else "placed by the cluster" if r.placed else "busy"

    return ", ".join(f"{r.model_id} ({why(r)})" for r in resident if r.model_id not in leaving) or "none"
