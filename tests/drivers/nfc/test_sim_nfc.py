"""SimNfc: the sim profile's NFC twin reads the stacked module through the NDEF codec and injects faults."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from drivers.base import DriverState, DriverStateError, JoinOffer
from drivers.nfc.ndef import NdefError, OfferTooLargeError
from drivers.sim.nfc import SimNfc
from tests.waiting import until

OFFER = JoinOffer("thox-mod1", "10.0.0.9:7443", "t0k", 1700000000, {"fp": "c0ffee"})


class Stack:
    """What is stacked on the box, as the sim world would answer it."""

    def __init__(self) -> None:
        self.offer: JoinOffer | None = None
        self.asked = 0

    def current(self) -> JoinOffer | None:
        self.asked += 1
        return self.offer


@pytest.fixture
def stack() -> Stack:
    return Stack()


@pytest.fixture
async def link(stack: Stack) -> AsyncIterator[SimNfc]:
    sim = SimNfc(stack.current, poll_interval=0.01)
    await sim.open()
    yield sim
    await sim.close()


async def test_read_returns_the_stacked_modules_offer(stack: Stack, link: SimNfc) -> None:
    stack.offer = OFFER
    assert link.state is DriverState.OPEN
    assert await link.read(timeout=1.0) == OFFER


async def test_read_returns_none_after_the_timeout_when_nothing_is_stacked(stack: Stack, link: SimNfc) -> None:
    started = time.monotonic()
    assert await link.read(timeout=0.15) is None
    assert 0.15 <= time.monotonic() - started < 0.5
    assert stack.asked > 2  # it kept polling the world, it did not just sleep


async def test_read_sees_a_module_stacked_while_it_waits(stack: Stack, link: SimNfc) -> None:
    reading = asyncio.create_task(link.read(timeout=2.0))
    await until(lambda: stack.asked > 0, "the read polling the world")
    stack.offer = OFFER
    started = time.monotonic()
    assert await reading == OFFER
    assert time.monotonic() - started < 0.5


async def test_read_goes_through_the_codec(stack: Stack, link: SimNfc) -> None:
    stack.offer = JoinOffer("thox-mod1", "10.0.0.9:7443", token="t" * 300)  # no real tag could carry it
    with pytest.raises(OfferTooLargeError):
        await link.read(timeout=0.1)


async def test_fault_no_tag_times_out_even_with_a_module_stacked(stack: Stack, link: SimNfc) -> None:
    stack.offer = OFFER
    link.set_fault("no_tag")
    started = time.monotonic()
    assert await link.read(timeout=0.1) is None
    assert time.monotonic() - started >= 0.1
    link.set_fault(None)
    assert await link.read(timeout=0.1) == OFFER


async def test_fault_corrupt_truncates_the_bytes(stack: Stack, link: SimNfc) -> None:
    stack.offer = OFFER
    link.set_fault("corrupt")
    with pytest.raises(NdefError, match=r"\(urn:nfc:ext:thox.ai:join\) at offset 0 is truncated"):
        await link.read(timeout=0.1)
    assert link.state is DriverState.OPEN  # a bad transfer is not a broken reader


def test_unknown_fault_is_refused(link: SimNfc) -> None:
    with pytest.raises(ValueError, match="unknown NFC fault 'nack'"):
        link.set_fault("nack")  # type: ignore[arg-type]  # an unknown fault, on purpose


async def test_closed_twin_refuses_to_read(stack: Stack) -> None:
    sim = SimNfc(stack.current)
    with pytest.raises(DriverStateError, match="sim-nfc is closed; open it before read"):
        await sim.read(timeout=0.1)


async def test_offer_is_read_by_a_reader_tapping_the_box(link: SimNfc) -> None:
    offering = asyncio.create_task(link.offer(OFFER, timeout=2.0))
    assert await link.tap(timeout=1.0) == OFFER
    assert await offering is True


async def test_offer_nobody_reads_returns_false_after_the_timeout(link: SimNfc) -> None:
    started = time.monotonic()
    assert await link.offer(OFFER, timeout=0.1) is False
    assert time.monotonic() - started >= 0.1
    assert await link.tap() is None  # no longer presented


async def test_offer_faults(link: SimNfc) -> None:
    link.set_fault("no_tag")
    offering = asyncio.create_task(link.offer(OFFER, timeout=0.2))
    assert await link.tap(timeout=0.1) is None
    assert await offering is False
    link.set_fault("corrupt")
    offering = asyncio.create_task(link.offer(OFFER, timeout=1.0))
    with pytest.raises(NdefError, match="truncated"):
        await link.tap(timeout=0.5)
    assert await offering is True  # the tag served its blocks; the reader lost the end


async def test_offer_refuses_an_offer_too_large_for_a_tag(link: SimNfc) -> None:
    with pytest.raises(OfferTooLargeError):
        await link.offer(JoinOffer("n", "h:1", token="t" * 300), timeout=0.1)


async def test_close_ends_a_running_offer(link: SimNfc) -> None:
    offering = asyncio.create_task(link.offer(OFFER, timeout=5.0))
    await asyncio.sleep(0)  # one loop turn: the offer runs up to presenting (it never suspends before)
    await link.close()
    assert await asyncio.wait_for(offering, 0.5) is False
