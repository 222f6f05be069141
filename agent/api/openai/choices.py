"""`n` > 1: several independent answers to one request, generated side by side in the engine's batch.

Choice i samples with seed + i when the request has a seed, so a seeded request with n > 1 is as reproducible as
one with n = 1. The prompt is counted once in `usage`, the completions of every choice added up (as OpenAI does).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Coroutine
from contextlib import aclosing
from dataclasses import replace
from typing import Any, TypeVar

from agent.api.openai.logprobs import Scored
from agent.api.openai.serving import Answer, Finish, OpenAIServing, Prepared

_T = TypeVar("_T")


def variants(prepared: Prepared, n: int) -> list[Prepared]:
    """The n generations of one request."""
    seed = prepared.params.seed
    return [
        replace(prepared, params=replace(prepared.params, seed=None if seed is None else seed + i)) for i in range(n)
    ]


def usage(finishes: list[Finish]) -> Finish:
    """One Finish whose usage covers every choice (the prompt once)."""
    return Finish(finishes[0].finish_reason, finishes[0].prompt_tokens, sum(f.completion_tokens for f in finishes))


async def _all(coroutines: list[Coroutine[Any, Any, _T]]) -> list[_T]:
    """Await every coroutine; when one fails (or the caller is cancelled) the others are cancelled, not orphaned."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def complete_all(serving: OpenAIServing, preparations: list[Prepared]) -> list[Answer]:
    """Every choice's whole answer, in choice order."""
    return await _all([serving.complete(p) for p in preparations])


async def merged(
    serving: OpenAIServing, preparations: list[Prepared]
) -> AsyncGenerator[tuple[int, str | Scored | Finish], None]:
    """The text pieces (with logprobs, when requested) and Finish of every choice as they come, tagged with the
    choice's index."""
    if len(preparations) == 1:
        async with aclosing(serving.generate_text(preparations[0])) as stream:
            async for item in stream:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, str | Scored | Finish] | Exception] = asyncio.Queue()

    async def pump(index: int, prepared: Prepared) -> None:
        try:
            async with aclosing(serving.generate_text(prepared)) as stream:
                async for item in stream:
                    queue.put_nowait((index, item))
        except Exception as exc:  # reported to the consumer, which fails the whole response
            queue.put_nowait(exc)

    tasks = [asyncio.ensure_future(pump(i, p)) for i, p in enumerate(preparations)]
    try:
        finished = 0
        while finished < len(tasks):
            got = await queue.get()
            if isinstance(got, Exception):
                raise got
            finished += isinstance(got[1], Finish)
            yield got
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
