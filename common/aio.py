"""asyncio helpers the drivers and the agent need alike.

`wait_for` exists because asyncio.wait_for on Python 3.10 and 3.11 (JetPack 6 ships 3.10) loses a cancellation
that arrives in the same loop iteration as the awaited result: it returns the result and the task carries on
as if never cancelled. A poller then survives shutdown forever. This version always lets the cancellation win.

It also tells the caller's own cancellation apart from the awaited operation being cancelled by someone else: a
grpc call whose channel is closed under it ends in CancelledError, and passing that on would make the caller look
cancelled (an API handler then drops its connection without an answer). That case raises `Interrupted` instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

_T = TypeVar("_T")


class Interrupted(TimeoutError):
    """The awaited operation was cancelled by someone other than the caller (e.g. its grpc channel was closed).

    A TimeoutError because to the caller it is the same outcome, no answer within the time it waited, and every
    caller already handles that one (retry, or report the service unavailable).
    """


async def wait_for(awaitable: Awaitable[_T], timeout: float | None) -> _T:
    """Await with a time limit: TimeoutError when it runs out, Interrupted when the operation is cancelled by
    another; a cancellation of the caller always propagates."""
    future = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({future}, timeout=timeout)
    except asyncio.CancelledError:
        future.cancel()
        raise
    if not done:
        future.cancel()
        # Let it finish cancelling (a stream read must be over before the next one starts); an outer
        # cancellation arriving meanwhile propagates from here.
        await asyncio.wait({future})
        raise TimeoutError
    if future.cancelled():
        raise Interrupted("the operation was cancelled under its caller (its connection closed?)")
    return future.result()
