"""Admits generation requests and steps their sequences on the executor, one token at a time.

Sequences take turns token by token (round robin), so several streams progress together and a cancelled or
finished sequence leaves at the next token boundary and frees its KV cache at once. Executor and sampler calls
run on one worker thread so the host's event loop stays free to read cancel frames while a step computes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from engines.base import ContextOverflowError, EngineError, Executor, SamplingParams, SequenceState
from engines.runtime.sampler import Sampler
from engines.wire import Frame

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate: prompt token ids, sampling settings and the ids that end it."""

    id: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]


@dataclass
class _Sequence:
    request: GenerationRequest
    sampler: Sampler
    state: SequenceState | None = None
    generated: int = 0
    last_token: int | None = None
    cancelled: bool = False


class Scheduler:
    """Runs requests on one executor and reports every outcome through `emit` as wire frames."""

    def __init__(self, executor: Executor, emit: Callable[[Frame], None], *, max_active: int = 4) -> None:
        self._executor = executor
        self._emit = emit
        self._max_active = max_active
        self._waiting: deque[_Sequence] = deque()
        self._active: list[_Sequence] = []
        self._by_id: dict[int, _Sequence] = {}
        self._wakeup = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; problems with it are reported as an error frame, never raised."""
        if request.id in self._by_id:
            self._emit({"op": "error", "id": request.id, "message": "duplicate request id", "code": "bad_request"})
            return
        if not request.prompt:
            self._emit({"op": "error", "id": request.id, "message": "empty prompt", "code": "bad_request"})
            return
        if len(request.prompt) >= self._executor.max_context:
            self._emit({
                "op": "error", "id": request.id, "code": "context_length_exceeded",
                "message": f"prompt of {len(request.prompt)} tokens does not fit the "
                f"{self._executor.max_context}-token context",
            })
            return
        try:
            sampler = Sampler(request.params)
        except (ValueError, EngineError) as exc:
            self._emit({"op": "error", "id": request.id, "message": f"bad sampling parameters: {exc}",
                        "code": "bad_request"})
            return
        seq = _Sequence(request=request, sampler=sampler)
        self._by_id[request.id] = seq
        self._waiting.append(seq)
        self._wakeup.set()

    def cancel(self, request_id: int) -> None:
        """Stop a request at the next token boundary (unknown ids are ignored: it may have just finished)."""
        seq = self._by_id.get(request_id)
        if seq is not None:
            seq.cancelled = True
            self._wakeup.set()

    async def run(self) -> None:
        """Step sequences until cancelled; releases every sequence on the way out."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._admit()
                if not self._active:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                for seq in list(self._active):
                    if seq.cancelled:
                        self._finish(seq, "cancelled")
                        continue
                    try:
                        token = await loop.run_in_executor(self._pool, self._step, seq)
                    except ContextOverflowError:
                        self._finish(seq, "length")
                        continue
                    except Exception as exc:  # an executor fault ends this request, not the host
                        log.exception("step failed for request %s", seq.request.id)
                        self._fail(seq, f"engine step failed: {exc}")
                        continue
                    self._after_step(seq, token)
        finally:
            for seq in list(self._by_id.values()):
                self._release(seq)
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self._max_active:
            seq = self._waiting.popleft()
            if seq.cancelled:
                self._finish(seq, "cancelled")
            else:
                self._active.append(seq)

    def _step(self, seq: _Sequence) -> int:
        # Runs on the worker thread: the only place executor and sampler are touched.
        if seq.state is None:
            seq.state = self._executor.new_sequence()
            logits = self._executor.prefill(seq.state, seq.request.prompt)
        else:
            assert seq.last_token is not None
            logits = self._executor.decode(seq.state, seq.last_token)
        return seq.sampler.sample(logits)

    def _after_step(self, seq: _Sequence, token: int) -> None:
        if token in seq.request.stop_ids:
            self._finish(seq, "stop")
            return
        seq.generated += 1
        seq.last_token = token
        self._emit({"op": "tokens", "id": seq.request.id, "ids": [token]})
        # Prompt plus completion never exceed the context (OpenAI's rule), so the last token fits too.
        if seq.generated >= seq.request.params.max_tokens or (
            len(seq.request.prompt) + seq.generated >= self._executor.max_context
        ):
            self._finish(seq, "length")

    def _finish(self, seq: _Sequence, reason: str) -> None:
        self._release(seq)
        self._emit({
            "op": "done", "id": seq.request.id, "finish_reason": reason,
            "prompt_tokens": len(seq.request.prompt), "completion_tokens": seq.generated,
        })

    def _fail(self, seq: _Sequence, message: str) -> None:
        self._release(seq)
        self._emit({"op": "error", "id": seq.request.id, "message": message, "code": "engine_error"})

    def _release(self, seq: _Sequence) -> None:
        self._by_id.pop(seq.request.id, None)
        if seq in self._active:
            self._active.remove(seq)
        if seq in self._waiting:
            self._waiting.remove(seq)
        if seq.state is not None:
            self._executor.release(seq.state)
            seq.state = None
