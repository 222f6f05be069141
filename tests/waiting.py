"""Waiting for conditions in tests: poll until true or fail naming what did not happen (never a fixed sleep).

Polling is the point here (the conditions are other processes' states, HTTP answers, counters), so ASYNC110 does
not apply. Deadlines are generous bounds for a loaded machine, not expectations of speed.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


@overload
async def until(
    condition: Callable[[], Awaitable[T]], what: str, timeout: float = 30.0, interval: float = 0.01
) -> T: ...


@overload
async def until(condition: Callable[[], T], what: str, timeout: float = 30.0, interval: float = 0.01) -> T: ...


async def until(condition: Callable[[], Any], what: str, timeout: float = 30.0, interval: float = 0.01) -> Any:
    """Await until `condition()` (plain or awaitable) is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        await asyncio.sleep(interval)  # noqa: ASYNC110


def eventually(check: Callable[[], Any], what: str, timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Call `check()` until it returns something truthy (an AssertionError counts as not yet); returns it."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except AssertionError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)  # the poll interval (this is the wait for a condition)
    raise AssertionError(f"not within {timeout:g} s: {what}; last: {last}")
