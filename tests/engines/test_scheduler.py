"""The scheduler with a scripted executor: interleaving, stop ids, limits, cancellation and faults."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from engines.base import ContextOverflowError, Logits, SamplingParams
from engines.runtime.scheduler import GenerationRequest, Scheduler
from engines.wire import Frame

VOCAB = 16


@dataclass
class ScriptedSequence:
    length: int = 0


class ScriptedExecutor:
    """Greedy output follows `script[prompt[0]]`: the next token is script[...][number of tokens generated]."""

    def __init__(self, scripts: dict[int, list[int]], max_context: int = 64, fail_on: int | None = None) -> None:
        self.scripts = scripts
        self.live: set[int] = set()
        self.calls: list[int] = []
        self._max_context = max_context
        self._fail_on = fail_on
        self._prompt_of: dict[int, int] = {}
        self._steps: dict[int, int] = {}

    @property
    def vocab_size(self) -> int:
        return VOCAB

    @property
    def max_context(self) -> int:
        return self._max_context

    def new_sequence(self) -> ScriptedSequence:
        seq = ScriptedSequence()
        self.live.add(id(seq))
        return seq

    def _logits(self, seq: ScriptedSequence) -> Logits:
        script = self.scripts[self._prompt_of[id(seq)]]
        step = self._steps[id(seq)]
        self._steps[id(seq)] += 1
        if script[min(step, len(script) - 1)] == self._fail_on:
            raise RuntimeError("device fault")
        logits = np.zeros(VOCAB, dtype=np.float32)
        logits[script[min(step, len(script) - 1)]] = 10.0
        return logits

    def prefill(self, seq: ScriptedSequence, token_ids: Sequence[int]) -> Logits:  # type: ignore[override]
        if seq.length + len(token_ids) > self._max_context:
            raise ContextOverflowError("full")
        self._prompt_of[id(seq)] = token_ids[0]
        self._steps[id(seq)] = 0
        seq.length += len(token_ids)
        self.calls.append(token_ids[0])
        return self._logits(seq)

    def decode(self, seq: ScriptedSequence, token_id: int) -> Logits:  # type: ignore[override]
        if seq.length + 1 > self._max_context:
            raise ContextOverflowError("full")
        seq.length += 1
        self.calls.append(self._prompt_of[id(seq)])
        return self._logits(seq)

    def release(self, seq: ScriptedSequence) -> None:  # type: ignore[override]
        self.live.discard(id(seq))

    def close(self) -> None:
        self.live.clear()


def request(rid: int, prompt: list[int], max_tokens: int = 10, stop: frozenset[int] = frozenset({0})
            ) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0), stop)


async def run_until(frames: list[Frame], scheduler: Scheduler, finished: int) -> None:
    task = asyncio.create_task(scheduler.run())
    try:
        for _ in range(500):
            if sum(f["op"] in ("done", "error") for f in frames) >= finished:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"not finished: {frames}")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(5000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never became true")


def tokens_of(frames: list[Frame], rid: int) -> list[int]:
    return [t for f in frames if f["op"] == "tokens" and f["id"] == rid for t in f["ids"]]


def done_of(frames: list[Frame], rid: int) -> Frame:
    [done] = [f for f in frames if f["op"] in ("done", "error") and f["id"] == rid]
    return done


async def test_stop_id_ends_the_sequence_and_is_not_emitted() -> None:
    executor = ScriptedExecutor({1: [5, 6, 0, 7]})
    frames: list[Frame] = []
    scheduler = Scheduler(executor, frames.append)
    scheduler.submit(request(1, [1, 2, 3]))
    await run_until(frames, scheduler, 1)
    assert tokens_of(frames, 1) == [5, 6]
    assert done_of(frames, 1) == {"op": "done", "id": 1, "finish_reason": "stop", "prompt_tokens": 3,
                                  "completion_tokens": 2}
    assert executor.live == set()


async def test_max_tokens_gives_length() -> None:
    executor = ScriptedExecutor({1: [5, 6, 7, 8, 9]})
    frames: list[Frame] = []
    scheduler = Scheduler(executor, frames.append)
    scheduler.submit(request(1, [1], max_tokens=3))
    await run_until(frames, scheduler, 1)
    assert tokens_of(frames, 1) == [5, 6, 7]
    assert done_of(frames, 1)["finish_reason"] == "length"


async def test_sequences_take_turns_token_by_token() -> None:
    executor = ScriptedExecutor({1: [5] * 20, 2: [6] * 20})
    frames: list[Frame] = []
    scheduler = Scheduler(executor, frames.append, max_active=2)
    scheduler.submit(request(1, [1], max_tokens=4))
    scheduler.submit(request(2, [2], max_tokens=4))
    await run_until(frames, scheduler, 2)
    assert executor.calls == [1, 2, 1, 2, 1, 2, 1, 2]
    assert tokens_of(frames, 1) == [5] * 4 and tokens_of(frames, 2) == [6] * 4


async def test_requests_beyond_max_active_wait_their_turn() -> None:
    executor = ScriptedExecutor({1: [5] * 20, 2: [6] * 20})
    frames: list[Frame] = []
    scheduler = Scheduler(executor, frames.append, max_active=1)
    scheduler.submit(request(1, [1], max_tokens=3))
    scheduler.submit(request(2, [2], max_tokens=3))
    await run_until(frames, scheduler, 2)
    assert executor.calls == [1, 1, 1, 2, 2, 2]


async def test_cancel_frees_the_kv_cache_at_the_next_token() -> None:
    executor = ScriptedExecutor({1: [5] * 1000})
    frames: list[Frame] = []
    scheduler = Scheduler(executor, frames.append)
    scheduler.submit(request(1, [1], max_tokens=1000))
    task = asyncio.create_task(scheduler.run())
    await until(lambda: len(tokens_of(frames, 1)) >= 3)
    assert len(executor.live) == 1
    scheduler.cancel(1)
    await until(lambda: any(f["op"] == "done" for f in frames))
    task.cancel()
    assert done_of(frames, 1)["finish_reason"] == "cancelled"
    assert executor.live == set()
    assert len(tokens_of(frames, 1)) < 1000


async def test_context_limit_gives_length_and_oversized_prompts_are_refused() -> None:
    executor = ScriptedExecutor({1: [5] * 100, 2: [5]}, max_context=8)
    frames: list[Frame] = []
    scheduler = Scheduler(executor, frames.append)
    scheduler.submit(request(1, [1, 1, 1], max_tokens=100))
    scheduler.submit(request(2, [2] * 8))
    await run_until(frames, scheduler, 2)
    assert done_of(frames, 1)["finish_reason"] == "length"
    assert done_of(frames, 1)["completion_tokens"] == 5  # 3 prompt + 5 = the 8-token context
    assert done_of(frames, 2)["op"] == "error" and done_of(frames, 2)["code"] == "context_length_exceeded"


async def test_an_executor_fault_fails_only_that_request() -> None:
    executor = ScriptedExecutor({1: [5, 13], 2: [6, 6, 6]}, fail_on=13)
    frames: list[Frame] = []
    scheduler = Scheduler(executor, frames.append)
    scheduler.submit(request(1, [1]))
    scheduler.submit(request(2, [2], max_tokens=3))
    await run_until(frames, scheduler, 2)
    assert done_of(frames, 1)["op"] == "error" and "device fault" in done_of(frames, 1)["message"]
    assert done_of(frames, 2)["finish_reason"] == "length" and tokens_of(frames, 2) == [6, 6, 6]
    assert executor.live == set()


async def test_duplicate_and_empty_requests_are_refused() -> None:
    executor = ScriptedExecutor({1: [5] * 5})
    frames: list[Frame] = []
    scheduler = Scheduler(executor, frames.append)
    scheduler.submit(request(1, [1], max_tokens=2))
    scheduler.submit(request(1, [1]))
    scheduler.submit(request(2, []))
    assert [f["code"] for f in frames] == ["bad_request", "bad_request"]


async def test_bad_sampling_parameters_fail_only_that_request() -> None:
    executor = ScriptedExecutor({1: [5] * 5})
    frames: list[Frame] = []
    scheduler = Scheduler(executor, frames.append)
    scheduler.submit(GenerationRequest(1, [1], SamplingParams(max_tokens=2, temperature=-1), frozenset()))
    assert frames[0]["op"] == "error" and frames[0]["code"] == "bad_request"
    scheduler.submit(request(2, [1], max_tokens=2))
    await run_until(frames, scheduler, 2)
    assert done_of(frames, 2)["finish_reason"] == "length"
