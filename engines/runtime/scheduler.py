"""Continuous batching: requests join the running batch at token boundaries and leave the moment they finish.

Every step decodes one token for every live sequence in a single batched executor call; between steps, waiting
requests are admitted (prefilled, reusing a cached KV prefix when their prompt starts like recent work) as long
as the batch size and the KV budget allow. Each sequence keeps its own sampler (seed, temperature, penalties)
and stop conditions, so a request's output does not depend on what it is batched with. Executor and sampler
calls run on one worker thread, which keeps the host's event loop free to take cancel frames mid-step.

A request with a grammar (engines/runtime/grammar.py) samples only tokens the grammar allows. The masks of a step
are computed on a second thread while the executor runs the forward pass (both release the GIL): a mask depends
only on the tokens already chosen, the logits only need it once they exist.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from engines.base import (
    ContextOverflowError,
    Done,
    EngineError,
    Executor,
    Failed,
    GenerationEvent,
    GenerationRequest,
    Logits,
    SequenceState,
    Tokens,
)
from engines.runtime.grammar import Constraint, GrammarError, Grammars, MaskBatch
from engines.runtime.prefix_cache import PrefixCache
from engines.runtime.sampler import Sampler

log = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass(frozen=True)
class SchedulerLimits:
    """How much work the scheduler takes on at once."""

    max_batch: int = 16
    # Requests waiting for a place in the batch; beyond this, new ones are refused as "overloaded".
    max_queue: int = 64
    # Bound on the KV pool: live sequences times the longest reservation (prompt + max_tokens) among them.
    kv_budget_tokens: int = 16384
    # Tokens of KV kept after requests finish, for prefix reuse (0 turns reuse off).
    prefix_cache_tokens: int = 1024


@dataclass
class _Sequence:
    request: GenerationRequest
    sampler: Sampler
    reserved: int
    constraint: Constraint | None = None
    state: SequenceState | None = None
    generated_ids: list[int] = field(default_factory=list)
    cancelled: bool = False

    @property
    def generated(self) -> int:
        return len(self.generated_ids)

    @property
    def last_token(self) -> int | None:
        return self.generated_ids[-1] if self.generated_ids else None


class Scheduler:
    """Runs requests on one executor and reports every outcome through `emit` as typed events."""

    def __init__(
        self,
        executor: Executor,
        emit: Callable[[GenerationEvent], None],
        limits: SchedulerLimits | None = None,
        masks: tuple[Grammars, MaskBatch] | None = None,
    ) -> None:
        self._executor = executor
        # Grammars and the mask computer; None: the host has no vocabulary for them, and grammars are refused.
        self._grammars: Grammars | None = masks[0] if masks else None
        self._masks: MaskBatch | None = masks[1] if masks else None
        self._mask_pool: ThreadPoolExecutor | None = None
        self._emit = emit
        self.limits = limits or SchedulerLimits()
        self._max_batch = min(self.limits.max_batch, executor.max_batch)
        # Sequences decoded per step; the agent's thermal governor lowers it below max_batch when hot. Live
        # sequences beyond it keep their KV and resume when it rises again.
        self._concurrency = self._max_batch
        self._last_batch = 0
        self._waiting: deque[_Sequence] = deque()
        self._live: list[_Sequence] = []
        self._by_id: dict[int, _Sequence] = {}
        self._wakeup = asyncio.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight: asyncio.Future[Any] | None = None
        self.prefix_cache = PrefixCache(self.limits.prefix_cache_tokens)

    # ------------------------------------------------------------------ intake

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; problems with it are reported as a Failed event, never raised."""
        problem = self._refusal(request)
        if problem is not None:
            code, message = problem
            self._emit(Failed(request.id, code, message))
            return
        try:
            sampler = Sampler(request.params)
        except (ValueError, EngineError) as exc:
            self._emit(Failed(request.id, "bad_request", f"bad sampling parameters: {exc}"))
            return
        if request.grammar is not None and self._grammars is None:
            self._emit(Failed(request.id, "bad_request", "this engine host cannot constrain output to a grammar"))
            return
        reserved = min(len(request.prompt) + request.params.max_tokens, self._executor.max_context)
        seq = _Sequence(request=request, sampler=sampler, reserved=reserved)
        self._by_id[request.id] = seq
        self._waiting.append(seq)
        self._wakeup.set()

    def _refusal(self, request: GenerationRequest) -> tuple[str, str] | None:
        if request.id in self._by_id:
            return "bad_request", "duplicate request id"
        if not request.prompt:
            return "bad_request", "empty prompt"
        if len(request.prompt) >= self._executor.max_context:
            return (
                "context_length_exceeded",
                f"prompt of {len(request.prompt)} tokens does not fit the {self._executor.max_context}-token context",
            )
        # A cancelled sequence still holds its slot until the next token boundary, but it no longer counts:
        # the agent counts it gone as soon as its client leaves, and the two counts must agree.
        taken = sum(1 for seq in self._by_id.values() if not seq.cancelled)
        if taken >= self._max_batch + self.limits.max_queue:
            return "overloaded", f"{taken} requests are running or waiting; retry shortly"
        return None

    def cancel(self, request_id: int) -> None:
        """Stop a request at the next token boundary (unknown ids are ignored: it may have just finished)."""
        seq = self._by_id.get(request_id)
        if seq is not None:
            seq.cancelled = True
            self._wakeup.set()

    def set_concurrency(self, limit: int) -> int:
        """Decode at most `limit` sequences per step (at least 1, at most max_batch); returns the limit applied."""
        self._concurrency = max(1, min(limit, self._max_batch))
        self._wakeup.set()
        return self._concurrency

    def stats(self) -> dict[str, Any]:
        """Counters for health reports."""
        return {
            "live": len(self._live),
            "waiting": len(self._waiting),
            "decoding": self._last_batch,
            "concurrency": self._concurrency,
            "prefix_hits": self.prefix_cache.hits,
            "prefix_tokens_reused": self.prefix_cache.reused_tokens,
            "prefix_cache_tokens": self.prefix_cache.tokens_held,
        }

    # -------------------------------------------------------------------- loop

    async def run(self) -> None:
        """Admit and step sequences until cancelled; releases every sequence on the way out."""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self._mask_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-mask")
        try:
            while True:
                self._drop_cancelled()
                await self._admit()
                if not self._live:
                    if not self._waiting:
                        self._wakeup.clear()
                        await self._wakeup.wait()
                    continue
                await self._decode_step()
        finally:
            # Executor calls never overlap: if a step is still computing, the executor's close() frees it all.
            if self._in_flight is None or self._in_flight.done():
                for seq in list(self._by_id.values()):
                    self._release(seq)
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            self._mask_pool.shutdown(wait=False, cancel_futures=True)
            self._mask_pool = None

    async def call(self, fn: Callable[[], _T]) -> _T:
        """Run other model work (embeddings) on the engine thread, between decode steps."""
        if self._pool is None:
            raise EngineError("the scheduler is not running")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def _in_worker(self, fn: Callable[[], _T]) -> _T:
        assert self._pool is not None, "only called from run()"
        future = asyncio.get_running_loop().run_in_executor(self._pool, fn)
        self._in_flight = future
        return await future

    def _drop_cancelled(self) -> None:
        for seq in [s for s in (*self._live, *self._waiting) if s.cancelled]:
            self._finish(seq, "cancelled")

    def _fits(self, seq: _Sequence) -> bool:
        if not self._live:
            return True  # one request always runs, whatever its size
        if len(self._live) >= self._concurrency:
            return False
        longest = max(seq.reserved, *(s.reserved for s in self._live))
        return (len(self._live) + 1) * longest <= self.limits.kv_budget_tokens

    async def _admit(self) -> None:
        while self._waiting and self._fits(self._waiting[0]):
            seq = self._waiting.popleft()
            if seq.cancelled:
                self._finish(seq, "cancelled")
                continue
            self._live.append(seq)
            try:
                token = await self._in_worker(lambda seq=seq: self._prefill(seq))  # type: ignore[misc]
            except ContextOverflowError:
                self._finish(seq, "length")
                continue
            except GrammarError as exc:
                # No constraint yet: the grammar did not compile (the client's fault); else a fault while masking.
                compiled = seq.constraint is not None
                self._fail(seq, f"constrained decoding failed: {exc}", "engine_error" if compiled else "bad_request")
                continue
            except Exception as exc:  # an executor fault ends this request, not the host
                log.exception("prefill failed for request %s", seq.request.id)
                self._fail(seq, f"engine prefill failed: {exc}")
                continue
            self._after_token(seq, token)

    def _prefill(self, seq: _Sequence) -> int:
        # Worker thread: compile the grammar (a large one takes milliseconds, too long for the host's loop), restore
        # the longest cached prefix, then compute only the rest of the prompt.
        if seq.request.grammar is not None and self._grammars is not None:
            seq.constraint = self._grammars.constraint(seq.request.grammar)
        prompt = seq.request.prompt
        hit = self.prefix_cache.lookup(prompt)
        seq.state = self._executor.new_sequence(hit.snapshot if hit else None)
        start = seq.state.length
        logits = self._executor.prefill(seq.state, prompt[start:])
        if seq.constraint is None or self._masks is None:
            return seq.sampler.sample(logits)
        self._masks.compute([(0, seq.constraint)])
        return self._sample(seq, self._masks.apply(0, logits))

    async def _decode_step(self) -> None:
        batch = [s for s in self._live if s.state is not None and s.last_token is not None][: self._concurrency]
        self._last_batch = len(batch)
        if not batch:
            return
        try:
            tokens = await self._in_worker(lambda: self._decode(batch))
        except ContextOverflowError:
            for seq in batch:
                self._finish(seq, "length")
            return
        except Exception as exc:
            log.exception("decode step failed")
            for seq in batch:
                self._fail(seq, f"engine step failed: {exc}")
            return
        for seq, token in zip(batch, tokens, strict=True):
            if seq.request.id not in self._by_id:  # cancelled and released meanwhile
                continue
            if isinstance(token, GrammarError):
                self._fail(seq, f"constrained decoding failed: {token}")
            else:
                self._after_token(seq, token)

    def _decode(self, batch: list[_Sequence]) -> list[int | GrammarError]:
        # Worker thread: one batched step, then each row sampled by its own sequence's sampler, the constrained
        # rows from their masks (computed just before, or on the mask thread meanwhile where the box has a spare core).
        # A grammar fault ends that row only.
        states = [s.state for s in batch]
        constrained = [(row, s.constraint) for row, s in enumerate(batch) if s.constraint is not None]
        masking: Future[None] | None = None
        if constrained and self._masks is not None:
            if self._masks.overlap and self._mask_pool is not None:
                masking = self._mask_pool.submit(self._masks.compute, constrained)
            else:
                self._masks.compute(constrained)  # no spare core: beside the forward pass it would slow it down
        try:
            logits = self._executor.decode(states, [s.last_token for s in batch])  # type: ignore[arg-type, misc]
        finally:
            if masking is not None:
                masking.result()  # the mask buffer must not be written after this step
        tokens: list[int | GrammarError] = []
        for row, seq in enumerate(batch):
            if seq.constraint is None or self._masks is None:
                tokens.append(seq.sampler.sample(logits[row]))
                continue
            try:
                tokens.append(self._sample(seq, self._masks.apply(row, logits[row])))
            except GrammarError as exc:
                tokens.append(exc)
        return tokens

    def _sample(self, seq: _Sequence, masked: Logits) -> int:
        """Sample from masked logits and move the sequence's grammar past the token (a stop token ends it)."""
        token = seq.sampler.sample(masked)
        if seq.constraint is not None and token not in seq.request.stop_ids:
            seq.constraint.advance(token)
        return token

    # ------------------------------------------------------------- outcomes

    def _after_token(self, seq: _Sequence, token: int) -> None:
        if token in seq.request.stop_ids:
            self._finish(seq, "stop")
            return
        seq.generated_ids.append(token)
        scored = seq.sampler.last_logprob if seq.request.params.logprobs is not None else None
        self._emit(Tokens(seq.request.id, (token,), None if scored is None else (scored,)))
        if seq.constraint is not None and seq.constraint.finished:
            self._finish(seq, "stop")  # the grammar is complete: nothing but a stop token could follow
            return
        # Prompt plus completion never exceed the context (OpenAI's rule), so the last token fits too.
        if seq.generated >= seq.request.params.max_tokens or (
            len(seq.request.prompt) + seq.generated >= self._executor.max_context
        ):
            self._finish(seq, "length")

    def _finish(self, seq: _Sequence, reason: str) -> None:
        if seq.state is not None and reason != "cancelled":
            state = seq.state
            # Only the prompt's KV is kept: it was computed by prefill, exactly as a later prompt that starts
            # the same way would compute it. Generated tokens' KV came from decode steps, whose kernels round
            # differently, and reusing it would let a reused answer drift from a recomputed one.
            held = seq.request.prompt[: state.length]
            try:
                self.prefix_cache.offer(held, lambda n: self._executor.snapshot(state, n))
            except EngineError:
                log.exception("could not keep the prefix of request %s", seq.request.id)
        self._release(seq)
        self._emit(Done(seq.request.id, reason, len(seq.request.prompt), seq.generated))

    def _fail(self, seq: _Sequence, message: str, code: str = "engine_error") -> None:
        self._release(seq)
        self._emit(Failed(seq.request.id, code, message))

    def _release(self, seq: _Sequence) -> None:
        self._by_id.pop(seq.request.id, None)
        if seq in self._live:
            self._live.remove(seq)
        if seq in self._waiting:
            self._waiting.remove(seq)
        if seq.state is not None:
            self._executor.release(seq.state)
            seq.state = None
