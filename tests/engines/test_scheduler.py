"""The continuous-batching scheduler over a scripted executor: batching, limits, cancellation, prefix reuse."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from engines.base import (
    ContextOverflowError,
    Done,
    EngineError,
    Failed,
    GenerationEvent,
    GenerationRequest,
    Logits,
    Logits2D,
    PrefixSnapshot,
    SamplingParams,
    SequenceState,
    Tokens,
)
from engines.runtime.scheduler import Scheduler, SchedulerLimits
from tests.waiting import until

VOCAB = 64
STOP = 0


@dataclass
class ScriptedSequence:
    history: list[int] = field(default_factory=list)
    prompt_len: int = 0  # set by prefill

    @property
    def length(self) -> int:
        return len(self.history)


@dataclass(frozen=True)
class ScriptedSnapshot:
    tokens: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return 8 * len(self.tokens)


def next_token(history: Sequence[int]) -> int:
    """The scripted model: a deterministic function of everything the sequence has seen."""
    return (sum(history) * 7 + len(history)) % (VOCAB - 1) + 1  # never the stop id


class ScriptedExecutor:
    """Greedy output depends on the whole history, so a wrongly restored prefix changes the text."""

    def __init__(
        self,
        *,
        max_context: int = 256,
        max_batch: int = 16,
        stop_after: dict[int, int] | None = None,
        fail_prefill_on: int | None = None,
        fail_decode: bool = False,
    ) -> None:
        self.live: list[ScriptedSequence] = []
        self.decode_batches: list[int] = []
        self.prefilled: list[int] = []  # tokens computed per prefill call
        self.restored: list[int] = []  # prefix lengths restored by new_sequence
        self._max_context = max_context
        self._max_batch = max_batch
        self._stop_after = stop_after or {}  # first prompt token -> emit STOP after this many tokens
        self._fail_prefill_on = fail_prefill_on
        self._fail_decode = fail_decode

    vocab_size = VOCAB
    kv_bytes_per_token = 8

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @staticmethod
    def _own(seq: SequenceState) -> ScriptedSequence:
        assert isinstance(seq, ScriptedSequence), seq
        return seq

    def new_sequence(self, prefix: PrefixSnapshot | None = None) -> ScriptedSequence:
        assert prefix is None or isinstance(prefix, ScriptedSnapshot), prefix
        if len(self.live) >= self._max_batch:
            raise EngineError("no free slot")
        seq = ScriptedSequence(list(prefix.tokens) if prefix else [])
        self.restored.append(prefix.length if prefix else 0)
        self.live.append(seq)
        return seq

    def _logits(self, seq: ScriptedSequence, prompt_len: int) -> Logits:
        logits = np.zeros(VOCAB, dtype=np.float32)
        limit = self._stop_after.get(seq.history[0])
        generated = len(seq.history) - prompt_len
        logits[STOP if limit is not None and generated >= limit else next_token(seq.history)] = 10.0
        return logits

    def prefill(self, state: SequenceState, token_ids: Sequence[int]) -> Logits:
        seq = self._own(state)
        if seq.length + len(token_ids) > self._max_context:
            raise ContextOverflowError("full")
        if self._fail_prefill_on is not None and self._fail_prefill_on in token_ids:
            raise RuntimeError("device fault")
        seq.history.extend(token_ids)
        self.prefilled.append(len(token_ids))
        seq.prompt_len = seq.length
        return self._logits(seq, seq.length)

    def decode(self, seqs: Sequence[SequenceState], token_ids: Sequence[int]) -> Logits2D:
        if self._fail_decode:
            raise RuntimeError("device fault")
        self.decode_batches.append(len(seqs))
        rows = []
        for state, token in zip(seqs, token_ids, strict=True):
            seq = self._own(state)
            seq.history.append(token)
            rows.append(self._logits(seq, seq.prompt_len))
        return np.stack(rows)

    def snapshot(self, seq: SequenceState, length: int) -> ScriptedSnapshot:
        return ScriptedSnapshot(tuple(self._own(seq).history[:length]))

    def release(self, seq: SequenceState) -> None:
        if seq in self.live:
            self.live.remove(seq)

    def close(self) -> None:
        self.live.clear()


def request(rid: int, prompt: list[int], max_tokens: int = 10) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0), frozenset({STOP}))


async def run_until_done(scheduler: Scheduler, frames: list[GenerationEvent], count: int) -> None:
    task = asyncio.create_task(scheduler.run())
    try:
        await until(
            lambda: sum(isinstance(f, (Done, Failed)) for f in frames) >= count,
            f"{count} requests ended",
            interval=0.001,
        )
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def tokens_of(frames: list[GenerationEvent], rid: int) -> list[int]:
    return [t for f in frames if isinstance(f, Tokens) and f.id == rid for t in f.ids]


def end_of(frames: list[GenerationEvent], rid: int) -> Done | Failed:
    [end] = [f for f in frames if isinstance(f, (Done, Failed)) and f.id == rid]
    return end


def done_of(frames: list[GenerationEvent], rid: int) -> Done:
    end = end_of(frames, rid)
    assert isinstance(end, Done), end
    return end


def failure_of(frames: list[GenerationEvent], rid: int) -> Failed:
    end = end_of(frames, rid)
    assert isinstance(end, Failed), end
    return end


def alone(prompt: list[int], max_tokens: int = 10) -> list[int]:
    """What the scripted model says for a prompt, computed directly."""
    history, out = list(prompt), []
    for _ in range(max_tokens):
        out.append(next_token(history))
        history.append(out[-1])
    return out


async def test_stop_id_ends_the_sequence_and_is_not_emitted() -> None:
    executor = ScriptedExecutor(stop_after={1: 2})
    frames: list[GenerationEvent] = []
    scheduler = Scheduler(executor, frames.append)
    scheduler.submit(request(1, [1, 2, 3]))
    await run_until_done(scheduler, frames, 1)
    assert tokens_of(frames, 1) == alone([1, 2, 3], 2)
    assert end_of(frames, 1) == Done(id=1, finish_reason="stop", prompt_tokens=3, completion_tokens=2)
    assert executor.live == []


async def test_requests_share_decode_steps_and_outputs_do_not_depend_on_company() -> None:
    executor = ScriptedExecutor()
    frames: list[GenerationEvent] = []
    scheduler = Scheduler(executor, frames.append)
    prompts = {rid: [rid, rid + 1, rid * 3] for rid in range(1, 9)}
    for rid, prompt in prompts.items():
        scheduler.submit(request(rid, prompt, max_tokens=5 + rid))
    await run_until_done(scheduler, frames, 8)
    for rid, prompt in prompts.items():
        assert tokens_of(frames, rid) == alone(prompt, 5 + rid)
        assert done_of(frames, rid).finish_reason == "length"
    assert max(executor.decode_batches) == 8  # all eight decoded together
    assert executor.decode_batches == sorted(executor.decode_batches, reverse=True)  # finished ones leave
    assert executor.live == []


async def test_new_requests_join_a_running_batch() -> None:
    executor = ScriptedExecutor()
    frames: list[GenerationEvent] = []
    scheduler = Scheduler(executor, frames.append)
    scheduler.submit(request(1, [1], max_tokens=200))
    task = asyncio.create_task(scheduler.run())
    await until(lambda: len(tokens_of(frames, 1)) >= 5, "five tokens of request 1", interval=0.001)
    scheduler.submit(request(2, [2], max_tokens=3))
    await until(lambda: any(isinstance(f, Done) and f.id == 2 for f in frames), "request 2 done", interval=0.001)
    assert len(tokens_of(frames, 1)) < 200  # request 2 finished while request 1 was still running
    assert tokens_of(frames, 2) == alone([2], 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert 2 in executor.decode_batches


async def test_max_batch_makes_requests_wait_their_turn() -> None:
    executor = ScriptedExecutor()
    frames: list[GenerationEvent] = []
    scheduler = Scheduler(executor, frames.append, SchedulerLimits(max_batch=2))
    for rid in range(1, 5):
        scheduler.submit(request(rid, [rid], max_tokens=4))
    await run_until_done(scheduler, frames, 4)
    assert max(executor.decode_batches) == 2
    assert all(tokens_of(frames, rid) == alone([rid], 4) for rid in range(1, 5))


async def test_kv_budget_limits_the_batch() -> None:
    executor = ScriptedExecutor()
    frames: list[GenerationEvent] = []
    # Each request reserves 1 + 9 = 10 tokens; a budget of 25 fits two of them, not three.
    scheduler = Scheduler(executor, frames.append, SchedulerLimits(kv_budget_tokens=25))
    for rid in range(1, 4):
        scheduler.submit(request(rid, [rid], max_tokens=9))
    await run_until_done(scheduler, frames, 3)
    assert max(executor.decode_batches) == 2


async def test_a_full_queue_refuses_with_overloaded() -> None:
    executor = ScriptedExecutor()
    frames: list[GenerationEvent] = []
    # Two in the batch plus one waiting fill it; the fourth is refused at once.
    scheduler = Scheduler(executor, frames.append, SchedulerLimits(max_batch=2, max_queue=1))
    for rid in range(1, 5):
        scheduler.submit(request(rid, [rid]))
    [refusal] = frames
    assert isinstance(refusal, Failed) and refusal.code == "overloaded" and refusal.id == 4


async def test_max_tokens_and_context_give_length() -> None:
    executor = ScriptedExecutor(max_context=8)
    frames: list[GenerationEvent] = []
    scheduler = Scheduler(executor, frames.append)
    scheduler.submit(request(1, [1, 1, 1], max_tokens=100))
    scheduler.submit(request(2, [2], max_tokens=3))
    scheduler.submit(request(3, [3] * 8))
    await run_until_done(scheduler, frames, 3)
    assert done_of(frames, 1).finish_reason == "length"
    assert done_of(frames, 1).completion_tokens == 5  # 3 + 5 fill the 8-token context exactly
    assert done_of(frames, 2).completion_tokens == 3
    assert failure_of(frames, 3).code == "context_length_exceeded"


async def test_cancel_frees_the_slot_at_the_next_token() -> None:
    executor = ScriptedExecutor()
    frames: list[GenerationEvent] = []
    scheduler = Scheduler(executor, frames.append)
    scheduler.submit(request(1, [1], max_tokens=200))
    scheduler.submit(request(2, [2], max_tokens=200))
    task = asyncio.create_task(scheduler.run())
    await until(lambda: len(tokens_of(frames, 1)) >= 3, "three tokens of request 1", interval=0.001)
    scheduler.cancel(1)
    await until(lambda: any(isinstance(f, Done) and f.id == 1 for f in frames), "request 1 done", interval=0.001)
    assert done_of(frames, 1).finish_reason == "cancelled"
    assert len(executor.live) == 1  # request 2 goes on, request 1's KV is gone
    assert scheduler.stats()["live"] == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancel_while_waiting() -> None:
    executor = ScriptedExecutor()
    frames: list[GenerationEvent] = []
    scheduler = Scheduler(executor, frames.append, SchedulerLimits(max_batch=1))
    scheduler.submit(request(1, [1], max_tokens=50))
    scheduler.submit(request(2, [2], max_tokens=50))
    scheduler.cancel(2)
    await run_until_done(scheduler, frames, 2)
    assert done_of(frames, 2).finish_reason == "cancelled"
    assert tokens_of(frames, 2) == []


async def test_a_prefill_fault_fails_only_that_request() -> None:
    executor = ScriptedExecutor(fail_prefill_on=13)
    frames: list[GenerationEvent] = []
    scheduler = Scheduler(executor, frames.append)
    scheduler.submit(request(1, [13, 1]))
    scheduler.submit(request(2, [2], max_tokens=3))
    await run_until_done(scheduler, frames, 2)
    assert "device fault" in failure_of(frames, 1).message
    assert tokens_of(frames, 2) == alone([2], 3)
    assert executor.live == []


async def test_a_decode_fault_fails_the_batch_cleanly() -> None:
    executor = ScriptedExecutor(fail_decode=True)
    frames: list[GenerationEvent] = []
    scheduler = Scheduler(executor, frames.append)
    scheduler.submit(request(1, [1]))
    scheduler.submit(request(2, [2]))
    await run_until_done(scheduler, frames, 2)
    assert {failure_of(frames, r).code for r in (1, 2)} == {"engine_error"}
    assert executor.live == []


async def test_bad_requests_are_refused_without_harm() -> None:
    executor = ScriptedExecutor()
    frames: list[GenerationEvent] = []
    scheduler = Scheduler(executor, frames.append)
    scheduler.submit(request(1, [1], max_tokens=2))
    scheduler.submit(request(1, [1]))
    scheduler.submit(request(2, []))
    scheduler.submit(GenerationRequest(3, [1], SamplingParams(max_tokens=2, temperature=-1), frozenset()))
    assert [f.code for f in frames if isinstance(f, Failed)] == ["bad_request"] * 3 and len(frames) == 3
    await run_until_done(scheduler, frames, 4)
    assert [f.finish_reason for f in frames if isinstance(f, Done)] == ["length"]


async def test_next_chat_turn_reuses_the_previous_kv() -> None:
    executor = ScriptedExecutor()
    frames: list[GenerationEvent] = []
    scheduler = Scheduler(executor, frames.append)
    first = list(range(1, 30))
    scheduler.submit(request(1, first, max_tokens=6))
    await run_until_done(scheduler, frames, 1)
    answer = tokens_of(frames, 1)
    # The next turn: the whole previous exchange, then the new user message.
    second = first + answer + [40, 41, 42]
    scheduler.submit(request(2, second, max_tokens=6))
    await run_until_done(scheduler, frames, 2)
    assert tokens_of(frames, 2) == alone(second, 6)  # identical to computing everything
    # The first prompt's KV is reused; the answer is recomputed by prefill, as a fresh request would.
    assert executor.restored[-1] == len(first)
    assert executor.prefilled[-1] == len(second) - len(first)
    assert scheduler.stats()["prefix_hits"] == 1


async def test_a_shared_system_prompt_is_reused_across_conversations() -> None:
    executor = ScriptedExecutor()
    frames: list[GenerationEvent] = []
    scheduler = Scheduler(executor, frames.append, SchedulerLimits(max_batch=1))
    system = list(range(100, 140))
    for rid, user in enumerate(([1, 2, 3], [4, 5, 6], [7, 8, 9]), start=1):
        scheduler.submit(request(rid, system + user, max_tokens=3))
    await run_until_done(scheduler, frames, 3)
    # The second conversation finds nothing; when it finishes the shared part is kept; the third reuses it.
    assert executor.restored == [0, 0, len(system)]
    assert tokens_of(frames, 3) == alone(system + [7, 8, 9], 3)


async def test_prefix_reuse_can_be_turned_off() -> None:
    executor = ScriptedExecutor()
    frames: list[GenerationEvent] = []
    scheduler = Scheduler(executor, frames.append, SchedulerLimits(prefix_cache_tokens=0))
    prompt = list(range(1, 30))
    scheduler.submit(request(1, prompt, max_tokens=2))
    await run_until_done(scheduler, frames, 1)
    scheduler.submit(request(2, prompt + [5], max_tokens=2))
    await run_until_done(scheduler, frames, 2)
    assert executor.restored == [0, 0]
