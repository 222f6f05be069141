"""common.aio.wait_for: a time limit, the caller's cancellation always wins, and an operation cancelled by someone
else is reported as Interrupted (it must not make the caller look cancelled)."""

from __future__ import annotations

import asyncio
import socket

import aetcd
import pytest

from common.aio import Interrupted, wait_for


async def test_an_operation_that_runs_out_of_time_raises_timeout_and_is_cancelled() -> None:
    operation = asyncio.ensure_future(asyncio.sleep(30))
    with pytest.raises(TimeoutError) as raised:
        await wait_for(operation, 0.05)
    assert not isinstance(raised.value, Interrupted)
    assert operation.cancelled()


async def test_the_callers_cancellation_propagates_and_cancels_the_operation() -> None:
    operation = asyncio.ensure_future(asyncio.sleep(30))
    caller = asyncio.ensure_future(wait_for(operation, 30))
    await asyncio.sleep(0)  # let the caller start waiting
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert operation.cancelled()


async def test_an_operation_cancelled_by_another_is_interrupted_and_the_caller_carries_on() -> None:
    operation = asyncio.ensure_future(asyncio.sleep(30))
    caller = asyncio.ensure_future(wait_for(operation, 30))
    await asyncio.sleep(0)
    operation.cancel()  # someone else's doing: the caller was not cancelled
    with pytest.raises(Interrupted):
        await caller
    assert not caller.cancelled()


async def test_a_grpc_call_whose_channel_is_closed_under_it_is_interrupted() -> None:
    """The case that dropped cluster API requests: an etcd read on a client that another task closes."""
    loop = asyncio.get_running_loop()
    with socket.socket() as silent:  # accepts, never answers: the read stays in flight
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.setblocking(False)
        client = aetcd.Client("127.0.0.1", silent.getsockname()[1], timeout=30)
        read = asyncio.ensure_future(wait_for(client.get(b"/key"), 30))
        connection, _ = await asyncio.wait_for(loop.sock_accept(silent), 10)
        try:
            await client.close()
            with pytest.raises(Interrupted):
                await read
        finally:
            connection.close()
