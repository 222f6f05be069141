"""Supervises the engine host child process and multiplexes generation streams over its socket.

The engine runs in its own process so that a fault in a native library (ONNX Runtime, TensorRT, CUDA) or a
runaway allocation can never take down the loop that also runs thermal and power control. When the child dies,
every stream in flight ends with `EngineUnavailableError`, `/v1/health` says so, and the child is restarted with
backoff; requests that arrive meanwhile wait briefly for it and then get a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.engine.controls import EngineControls
from agent.errors import (
    EngineFailedError,
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
    ThoxError,
)
from agent.settings import EngineSettings
from engines.base import Done, Failed, GenerationRequest, SamplingParams, Tokens
from engines.wire import (
    Cancel,
    Embed,
    Embeddings,
    Fatal,
    FrameError,
    Limited,
    Progress,
    ProtocolError,
    Ready,
    Stats,
    ToAgent,
    ToHost,
    decode_to_agent,
    encode,
    read_payload,
)

log = structlog.get_logger("agent.engine")

# Linux limits unix socket paths to 107 bytes; deeper homes fall back to a private temp directory.
_MAX_SOCKET_PATH = 100
_BACKOFF_SECONDS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# Stay on the backoff floor when a host lived this long: it crashed once, it is not crash-looping.
_STABLE_AFTER_SECONDS = 60.0


class EngineStartError(ThoxError):
    """The engine host reported that it cannot start (bad model file, out of memory, ...)."""


class EngineState(str, enum.Enum):
    """Lifecycle of the engine host as shown in /v1/health."""

    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    STOPPED = "stopped"


@dataclass(frozen=True)
class EngineHostConfig:
    """Everything needed to start an engine host for one model."""

    model_id: str
    gguf: Path
    sha256: str
    cache_dir: Path
    run_dir: Path
    threads: int
    max_context: int
    max_batch: int
    max_queue: int
    kv_budget_tokens: int
    prefix_cache_tokens: int
    start_timeout: float
    ready_wait: float
    # The embedding model served by the same host, if any.
    encoder_id: str | None = None
    encoder_dir: Path | None = None
    # Each host of one agent needs its own socket (the default model's and one per model placed on the box).
    socket_name: str = "engine.sock"
    executor: str = "onnxruntime"  # engines/executors.py

    @classmethod
    def from_settings(
        cls,
        engine: EngineSettings,
        *,
        model_id: str,
        gguf: Path,
        sha256: str,
        cache_dir: Path,
        run_dir: Path,
        **model_fields: Any,
    ) -> EngineHostConfig:
        """The host for one model with the engine settings every host shares; `model_fields` override them."""
        shared: dict[str, Any] = {
            "executor": engine.executor,
            "threads": engine.threads,
            "max_context": engine.max_context,
            "max_batch": engine.max_batch,
            "max_queue": engine.max_queue,
            "kv_budget_tokens": engine.kv_budget_tokens,
            "prefix_cache_tokens": engine.prefix_cache_tokens,
            "start_timeout": engine.start_timeout_seconds,
            "ready_wait": engine.ready_wait_seconds,
        }
        return cls(
            model_id=model_id,
            gguf=gguf,
            sha256=sha256,
            cache_dir=cache_dir,
            run_dir=run_dir,
            **{**shared, **model_fields},
        )


_Event = Tokens | Done | Embeddings | Exception


class EngineHost:
    """One supervised engine host process and the streams running on it."""

    def __init__(self, config: EngineHostConfig) -> None:
        self.config = config
        self.state = EngineState.STARTING
        self.restarts = 0
        self.last_error: str | None = None
        self.max_context = config.max_context
        self.model_info: dict[str, Any] = {}
        self.encoder_info: dict[str, Any] = {}
        self.stats: dict[str, Any] = {}
        self._pid: int | None = None
        self._ready = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._streams: dict[int, asyncio.Queue[_Event]] = {}
        self._ids = itertools.count(1)
        self._progress_logged: tuple[str, int] = ("", -1)
        self._fallback_socket_dir: Path | None = None
        self._admitted = 0
        # What the thermal governor and model unloading may do to this host (batch limit, stop, build pause).
        self.controls = EngineControls(config.max_batch, self._send, self._stop_streams, lambda: self._pid)
        # Told about each step of start-up progress (stage, percent): systemd status and start timeout.
        self.on_progress: Callable[[str, int], None] | None = None

    # ----------------------------------------------------------------- supervision

    async def run(self) -> None:
        """Keep an engine host running until cancelled; restart it with backoff when it dies."""
        attempt = 0
        try:
            while True:
                started = time.monotonic()
                await self._run_once()
                if time.monotonic() - started > _STABLE_AFTER_SECONDS:
                    attempt = 0
                delay = _BACKOFF_SECONDS[min(attempt, len(_BACKOFF_SECONDS) - 1)]
                attempt += 1
                self.restarts += 1
                log.warning("engine_restart_scheduled", delay_s=delay, restarts=self.restarts, error=self.last_error)
                await asyncio.sleep(delay)
        finally:
            self.state = EngineState.STOPPED
            self._ready.clear()

    async def _run_once(self) -> None:
        socket_path = await asyncio.to_thread(self._socket_path)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "engines.host",
            "--socket",
            str(socket_path),
            "--gguf",
            str(self.config.gguf),
            "--sha256",
            self.config.sha256,
            "--cache-dir",
            str(self.config.cache_dir),
            "--executor",
            self.config.executor,
            "--threads",
            str(self.config.threads),
            "--max-context",
            str(self.config.max_context),
            "--max-batch",
            str(self.config.max_batch),
            "--max-queue",
            str(self.config.max_queue),
            "--kv-budget-tokens",
            str(self.config.kv_budget_tokens),
            "--prefix-cache-tokens",
            str(self.config.prefix_cache_tokens),
            *(["--encoder", str(self.config.encoder_dir)] if self.config.encoder_dir else []),
            stdin=asyncio.subprocess.DEVNULL,
            # Own session: a terminal's Ctrl-C reaches only the agent, which then stops the host in order.
            start_new_session=True,
        )
        self._pid = proc.pid
        log.info("engine_host_started", pid=proc.pid, model=self.config.model_id)
        reader_task: asyncio.Task[None] | None = None
        try:
            reader, writer = await self._connect(socket_path, proc)
            self._writer = writer
            await self._await_ready(reader)
            self.controls.resend()
            reader_task = asyncio.create_task(self._read_frames(reader), name="engine-reader")
            exited = asyncio.create_task(proc.wait(), name="engine-wait")
            await asyncio.wait({reader_task, exited}, return_when=asyncio.FIRST_COMPLETED)
            exited.cancel()
        except (OSError, ProtocolError, EngineStartError) as exc:
            self.last_error = f"engine host failed to start: {exc}"
            log.error("engine_start_failed", error=str(exc))
        except (TimeoutError, asyncio.TimeoutError):
            self.last_error = f"engine host not ready after {self.config.start_timeout:.0f}s"
            log.error("engine_start_failed", error=self.last_error)
        finally:
            self.state = EngineState.RESTARTING
            self._ready.clear()
            if reader_task is not None:
                reader_task.cancel()
            self._fail_streams(
                EngineUnavailableError(
                    "the inference engine stopped while generating; retry the request", code="engine_crashed"
                )
            )
            await self._stop_process(proc)
        if proc.returncode and self.last_error is None:
            self.last_error = f"engine host exited with status {proc.returncode}"
        log.warning("engine_host_exited", pid=proc.pid, returncode=proc.returncode)

    def _socket_path(self) -> Path:
        """Blocking: a fresh socket path in a private directory."""
        path = self.config.run_dir / self.config.socket_name
        if len(str(path)) > _MAX_SOCKET_PATH:
            if self._fallback_socket_dir is None:  # one private directory for all restarts
                self._fallback_socket_dir = Path(tempfile.mkdtemp(prefix="thox-"))
            path = self._fallback_socket_dir / self.config.socket_name
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.unlink(missing_ok=True)
        return path

    async def _connect(
        self, path: Path, proc: asyncio.subprocess.Process
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while True:
            if proc.returncode is not None:
                raise OSError(f"engine host exited with status {proc.returncode} before listening")
            try:
                return await asyncio.open_unix_connection(str(path))
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(0.05)

    async def _await_ready(self, reader: asyncio.StreamReader) -> None:
        """Read start-up messages until Ready; the start timeout does not run while builds are paused."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.start_timeout
        next_message: asyncio.Task[ToAgent | None] | None = None
        try:
            while True:
                if next_message is None:
                    next_message = asyncio.create_task(_read_message(reader))
                waited_from = loop.time()
                done, _ = await asyncio.wait({next_message}, timeout=min(1.0, max(0.0, deadline - waited_from)))
                if self.controls.builds_paused:
                    deadline += loop.time() - waited_from
                if not done:
                    if loop.time() >= deadline:
                        raise asyncio.TimeoutError
                    continue
                message, next_message = next_message.result(), None
                if message is None:
                    raise ProtocolError("engine host closed the connection while starting")
                if isinstance(message, Progress):
                    self._log_progress(message)
                    self.controls.building(message.stage != "load")
                elif isinstance(message, Ready):
                    self.controls.building(False)
                    self.max_context = message.max_context
                    self.encoder_info = dict(message.encoder or {})
                    self.model_info = dict(message.model)
                    self.state = EngineState.READY
                    self.last_error = None
                    self._ready.set()
                    log.info("engine_ready", pid=message.pid, model=self.config.model_id, **self.model_info)
                    return
                elif isinstance(message, Fatal):
                    raise EngineStartError(message.message)
        finally:
            self.controls.building(False)
            if next_message is not None:
                next_message.cancel()

    def _log_progress(self, progress: Progress) -> None:
        stage, done, total = progress.stage, progress.done, max(progress.total, 1)
        percent = done * 100 // total
        last_stage, last_percent = self._progress_logged
        # One line per stage change and per 10%, not per frame.
        if stage != last_stage or percent // 10 != last_percent // 10:
            self._progress_logged = (stage, percent)
            log.info("engine_preparing", stage=stage, percent=percent, done=done, total=total)
            if self.on_progress is not None:
                self.on_progress(stage, percent)

    async def _read_frames(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                try:
                    message = await _read_message(reader)
                except FrameError as exc:
                    # One unreadable frame fails the request it names (if any); the others carry on.
                    log.error("engine_frame_unreadable", error=str(exc))
                    queue = self._streams.get(exc.request_id) if exc.request_id is not None else None
                    if queue is not None:
                        queue.put_nowait(EngineFailedError(f"the engine sent an unreadable answer: {exc}"))
                    continue
                if message is None:
                    return
                self._on_message(message)
        except ProtocolError as exc:
            self.last_error = f"engine protocol error: {exc}"
            log.error("engine_protocol_error", error=str(exc))

    def _on_message(self, message: ToAgent) -> None:
        if isinstance(message, Stats):
            self.stats = dict(message.scheduler)
        elif isinstance(message, Limited):
            self.controls.applied(message.max_batch)
        elif isinstance(message, (Tokens, Done, Embeddings, Failed)):
            queue = self._streams.get(message.id) if message.id is not None else None
            if queue is None:
                if isinstance(message, Failed) and message.id is None:
                    log.error("engine_refused_frame", code=message.code, message=message.message)
                return  # a stream we already abandoned
            queue.put_nowait(self._error_from(message) if isinstance(message, Failed) else message)

    @staticmethod
    def _error_from(failed: Failed) -> Exception:
        if failed.code in ("context_length_exceeded", "bad_request"):
            return InvalidRequestError(failed.message, code=failed.code)
        if failed.code == "overloaded":
            return EngineOverloadedError(f"the engine is at capacity: {failed.message}")
        return EngineFailedError(failed.message)

    async def _stop_process(self, proc: asyncio.subprocess.Process) -> None:
        self.controls.release_build()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()  # the host exits when its client leaves
        if proc.returncode is None:
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), 5.0)
            except (TimeoutError, asyncio.TimeoutError):
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    def _fail_streams(self, error: Exception) -> None:
        for queue in self._streams.values():
            queue.put_nowait(error)
        self._streams.clear()

    # ----------------------------------------------------------------- requests

    @property
    def pid(self) -> int | None:
        return self._pid if self.state is EngineState.READY else None

    async def wait_ready(self) -> None:
        """Wait briefly for a starting engine; EngineUnavailableError if it does not come up in time."""
        if self._ready.is_set():
            return
        try:
            await asyncio.wait_for(self._ready.wait(), self.config.ready_wait)
        except (TimeoutError, asyncio.TimeoutError):
            detail = f" ({self.last_error})" if self.last_error else ""
            raise EngineUnavailableError(f"the inference engine is {self.state.value}{detail}; retry shortly") from None

    @contextlib.asynccontextmanager
    async def admission(self, places: int = 1) -> AsyncGenerator[None, None]:
        """Hold `places` of the engine's places (batch slots plus queue; one per generation, so n for a request
        with n choices) for a request's whole life; 503 if they are not free.

        The agent is the engine host's only client, so counting here is exact, and a streaming handler learns
        it must answer 503 before it commits to a 200.
        """
        if self.controls.suspended is not None:
            raise self.controls.suspended
        await self.wait_ready()
        capacity = self.config.max_batch + self.config.max_queue
        if self._admitted + places > capacity:
            raise EngineOverloadedError(
                f"the engine is at capacity ({capacity} generations running or waiting); retry shortly"
            )
        self._admitted += places
        try:
            yield
        finally:
            self._admitted -= places

    @property
    def in_flight(self) -> int:
        """Requests admitted (decoding or waiting for a slot)."""
        return self._admitted

    @property
    def saturated(self) -> bool:
        """Every decode slot the thermal policy allows is taken: a new request would wait here."""
        return self._admitted >= self.controls.concurrency

    async def _writer_when_ready(self) -> asyncio.StreamWriter:
        await self.wait_ready()
        writer = self._writer
        if writer is None or writer.is_closing():
            raise EngineUnavailableError("the inference engine is restarting; retry shortly")
        return writer

    async def embed(self, inputs: list[list[int]]) -> Embeddings:
        """Embed token sequences with the host's encoder."""
        writer = await self._writer_when_ready()
        request_id = next(self._ids)
        queue: asyncio.Queue[_Event] = asyncio.Queue()
        self._streams[request_id] = queue
        try:
            writer.write(encode(Embed(request_id, inputs)))
            event = await queue.get()
        finally:
            self._streams.pop(request_id, None)
        if isinstance(event, Exception):
            raise event
        if not isinstance(event, Embeddings):
            raise EngineFailedError("the engine answered an embedding request with something else")
        return event

    async def generate(
        self, prompt: list[int], params: SamplingParams, stop_ids: frozenset[int], grammar: str | None = None
    ) -> AsyncGenerator[Tokens | Done, None]:
        """Stream sampled tokens (with their logprobs when `params` asks), then one Done; `grammar` constrains the
        output. Leaving early cancels the generation in the host."""
        writer = await self._writer_when_ready()
        request_id = next(self._ids)
        queue: asyncio.Queue[_Event] = asyncio.Queue()
        self._streams[request_id] = queue
        finished = False
        try:
            writer.write(encode(GenerationRequest(request_id, prompt, params, stop_ids, grammar)))
            while True:
                event = await queue.get()
                if isinstance(event, Exception):
                    finished = True
                    raise event
                if isinstance(event, Done):
                    finished = True
                    yield event
                    return
                if isinstance(event, Embeddings):
                    raise EngineFailedError("the engine answered a generation with embeddings")
                yield event
        finally:
            self._streams.pop(request_id, None)
            if not finished and self._writer is writer and not writer.is_closing():
                writer.write(encode(Cancel(request_id)))

    # ----------------------------------------------------------------- means for the controls

    def _send(self, message: ToHost) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(encode(message))

    def _stop_streams(self, error: EngineUnavailableError) -> None:
        """End every stream in flight with `error`, cancelling its generation in the engine host."""
        for request_id in self._streams:
            self._send(Cancel(request_id))
        self._fail_streams(error)

    def health(self) -> dict[str, Any]:
        """The engine's part of /v1/health."""
        return {
            "state": self.state.value,
            "model": self.config.model_id,
            "embedding_model": self.config.encoder_id,
            "pid": self.pid,
            "restarts": self.restarts,
            "active_streams": len(self._streams),
            "admitted": self._admitted,
            "max_context": self.max_context,
            **self.controls.health(),
            "last_error": self.last_error,
            **({"info": self.model_info} if self.model_info else {}),
            **({"scheduler": self.stats} if self.stats else {}),
        }


async def _read_message(reader: asyncio.StreamReader) -> ToAgent | None:
    """The engine host's next message; None at a clean end of its stream."""
    payload = await read_payload(reader)
    return None if payload is None else decode_to_agent(payload)
