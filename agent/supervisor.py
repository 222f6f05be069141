"""Starts subsystems in order, runs until asked to stop (or one fails), then stops them in reverse order.

A subsystem is an async context manager: entering it starts it (returns once it is usable), leaving it stops it.
Background work it owns is registered with `Supervisor.spawn`, so a crash there stops the whole agent loudly
instead of leaving a half-working service.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any

import structlog

from agent.errors import ThoxError

log = structlog.get_logger("agent.supervisor")


class SubsystemFailed(ThoxError):
    """A supervised background task ended with an error."""


class Supervisor:
    """Ordered start, reverse-order stop, and one place that notices failures and stop signals."""

    def __init__(self) -> None:
        self._stop = asyncio.Event()
        self._failure: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def request_stop(self) -> None:
        """Ask for an orderly shutdown (signal handlers call this)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT ask for an orderly shutdown."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("stop_requested", signal=sig.name)
        self.request_stop()

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        """Run background work; its failure (not its cancellation) stops the agent."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._on_task_done)
        return task

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("subsystem_failed", task=task.get_name(), error=repr(exc), exc_info=exc)
            self._failure = self._failure or exc
            self._stop.set()

    async def cancel_task(self, task: asyncio.Task[None]) -> None:
        """Cancel one spawned task and wait for it to finish its cleanup."""
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def run(self, subsystems: list[tuple[str, AbstractAsyncContextManager[Any]]]) -> None:
        """Enter subsystems in order, wait for a stop, leave them in reverse order."""
        async with AsyncExitStack() as stack:
            for name, subsystem in subsystems:
                log.info("subsystem_starting", subsystem=name)
                await stack.enter_async_context(subsystem)
                if self._stop.is_set():
                    break
            else:
                await self._stop.wait()
            log.info("stopping")
        for task in list(self._tasks):
            await self.cancel_task(task)
        if self._failure is not None:
            raise SubsystemFailed(str(self._failure)) from self._failure
