"""What the box's policies may do to one engine host: limit its batch, stop inference, pause a model build.

The thermal governor (agent/hardware/thermal.py) and model unloading (agent/models/loader.py) decide; this object
carries the decisions out and remembers them across engine restarts, through the means its host gives it: a frame
to the engine process, the streams in flight, the process id.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import structlog

from agent.errors import EngineUnavailableError
from engines.wire import Limit, ToHost

log = structlog.get_logger("agent.engine")


class EngineControls:
    """Batch limit, suspension and build pause of one engine host (the `InferenceControl` thermal policy uses)."""

    def __init__(
        self,
        max_batch: int,
        send: Callable[[ToHost], None],
        stop_streams: Callable[[EngineUnavailableError], None],
        pid: Callable[[], int | None],
    ) -> None:
        self.max_batch = max_batch
        self._send = send
        self._stop_streams = stop_streams
        self._pid = pid
        # Sequences decoded per step: asked for, and as the engine host last confirmed.
        self.concurrency = max_batch
        self.concurrency_applied = max_batch
        self._asked_at: float | None = None
        # The refusal every request gets while inference is stopped.
        self.suspended: EngineUnavailableError | None = None
        # Whether model builds (conversion before "ready") may use the CPU, and whether one is stopped now.
        self.builds_paused = False
        self._building = False
        self._build_stopped = False

    # ------------------------------------------------------------------ batch limit

    def set_concurrency(self, limit: int) -> None:
        """Decode at most `limit` sequences at once (the rest wait, keeping their place); applied asynchronously."""
        limit = max(1, min(limit, self.max_batch))
        if limit == self.concurrency:
            return
        self.concurrency = limit
        self._asked_at = time.monotonic()
        self.resend()

    def resend(self) -> None:
        """Tell a (re)started engine host the limit in force."""
        self._send(Limit(self.concurrency))

    def applied(self, limit: int) -> None:
        """The engine host confirmed a limit (its Limited frame)."""
        self.concurrency_applied = limit
        if self._asked_at is not None and limit == self.concurrency:
            latency = time.monotonic() - self._asked_at
            self._asked_at = None
            log.info("engine_concurrency_applied", concurrency=limit, latency_ms=round(latency * 1000, 3))

    # ------------------------------------------------------------------ stopping inference

    def suspend(self, reason: str, *, code: str, retry_after: int = 30) -> None:
        """Stop inference now: running streams end with a clean error, new requests get a 503 until resume()."""
        self.suspended = EngineUnavailableError(f"inference is stopped: {reason}", code=code, retry_after=retry_after)
        self._stop_streams(self.suspended)

    def resume(self) -> None:
        """Accept requests again after suspend()."""
        self.suspended = None

    # ------------------------------------------------------------------ model builds

    def pause_builds(self, paused: bool) -> None:
        """Pause (SIGSTOP) or continue a model build in the engine host; serving is never paused by this."""
        if paused == self.builds_paused:
            return
        self.builds_paused = paused
        self._apply_build_pause()

    def building(self, active: bool) -> None:
        """The engine host is (or is no longer) building a model: a pause asked for applies now."""
        self._building = active
        self._apply_build_pause()

    def release_build(self) -> None:
        """Before the process is stopped: a paused build must run again to see its socket close and exit."""
        pid = self._pid()
        if self._build_stopped and pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._build_stopped = False
        self._building = False

    def _apply_build_pause(self) -> None:
        pid = self._pid()
        if pid is None or (not self._building and not self._build_stopped):
            return
        stop = self.builds_paused and self._building
        if stop == self._build_stopped:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP if stop else signal.SIGCONT)
        self._build_stopped = stop
        log.info("engine_build_paused" if stop else "engine_build_resumed", pid=pid)

    def health(self) -> dict[str, Any]:
        """This part of the engine's /v1/health."""
        return {
            "concurrency": {
                "limit": self.concurrency,
                "applied": self.concurrency_applied,
                "max_batch": self.max_batch,
            },
            "suspended": None if self.suspended is None else str(self.suspended),
            "builds_paused": self.builds_paused,
        }
