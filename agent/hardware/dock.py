"""Dock pipeline: a module snapped onto the box -> read its NFC tag -> a join offer for the cluster layer.

The dock switch says *that* something arrived; the NFC tag says *who* (research/hardware.md section 4). The offer
is only a hint to the cluster layer, which authenticates the join itself. Offers go to every subscriber's queue
(bounded: a subscriber that does not keep up loses the oldest offers, never blocks the dock).

The other direction: while nothing is docked, the box presents its own join offer (from the cluster layer) in
short windows, so a box docked onto it reads it. One antenna cannot read and present at once: a dock cancels the
window at once, the read goes first, and presenting resumes when the box is undocked again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from drivers.base import DockEvent, DockSensor, DriverError, DriverState, JoinOffer, NfcLink

log = structlog.get_logger("agent.hardware.dock")

_REOPEN_DELAY_S = 5.0
_NFC_ATTEMPTS = 3
_QUEUE_SIZE = 16
_PRESENT_WINDOW_S = 2.0
_PRESENT_RETRY_S = 5.0

# The cluster layer's join offer for this box; `fresh` asks for a new token (the last one was read).
OfferSource = Callable[[bool], Awaitable[JoinOffer | None]]


@dataclass(frozen=True)
class JoinOfferEvent:
    """A join offer read from the module that was just docked."""

    offer: JoinOffer
    docked_at: float  # loop time the dock was confirmed
    read_at: float  # loop time the offer was read


class DockPipeline:
    """Follows the dock switch, reads NFC on every dock, and publishes the offers."""

    def __init__(self, dock: DockSensor, nfc: NfcLink | None, read_timeout: float) -> None:
        self.dock = dock
        self.nfc = nfc
        self.read_timeout = read_timeout
        self.docked: bool | None = None
        self.offer: JoinOffer | None = None
        self.offer_read_at: float | None = None
        self.last_error: str | None = None
        self._subscribers: list[asyncio.Queue[JoinOfferEvent]] = []
        self._own_offer: OfferSource | None = None
        self._may_present = asyncio.Event()
        self._window: asyncio.Task[bool] | None = None

    def subscribe(self) -> asyncio.Queue[JoinOfferEvent]:
        """A queue that receives every join offer read from now on."""
        queue: asyncio.Queue[JoinOfferEvent] = asyncio.Queue(_QUEUE_SIZE)
        self._subscribers.append(queue)
        return queue

    def present_own_offers(self, source: OfferSource) -> None:
        """Present this box's join offer from `source` whenever nothing is docked."""
        self._own_offer = source
        if self.docked is False:
            self._may_present.set()

    async def run(self) -> None:
        """Follow the dock (and present this box's offer between docks) until cancelled."""
        await asyncio.gather(self._follow(), self._present())

    async def _present(self) -> None:
        if self.nfc is None:
            return
        nfc, fresh = self.nfc, True
        while True:
            await self._may_present.wait()
            source = self._own_offer
            offer = await source(fresh) if source is not None else None
            if offer is None:
                await asyncio.sleep(_PRESENT_RETRY_S)
                continue
            fresh = False
            try:
                if nfc.state is not DriverState.OPEN:
                    await nfc.open()
                window = self._window = asyncio.ensure_future(nfc.offer(offer, _PRESENT_WINDOW_S))
                try:
                    await asyncio.wait({window})
                finally:
                    window.cancel()
                    self._window = None
                if window.cancelled():
                    continue  # a dock took the antenna
                if window.result():
                    log.info("own_join_offer_read", node=offer.node_id)
                    fresh = True  # its token is the reader's now
            except DriverError as exc:
                log.warning("nfc_offer_failed", driver=nfc.name, error=str(exc))
                await asyncio.sleep(_PRESENT_RETRY_S)

    async def _follow(self) -> None:
        """Follow the dock until cancelled; a failing dock driver is reopened every few seconds."""
        while True:
            try:
                if self.dock.state is not DriverState.OPEN:
                    await self.dock.open()
                if self.docked is None:
                    loop_now = asyncio.get_running_loop().time()
                    await self._on_event(DockEvent(docked=await self.dock.present(), at=loop_now))
                async for event in self.dock.events():
                    await self._on_event(event)
            except DriverError as exc:
                if self.last_error is None:
                    log.warning("dock_unavailable", driver=self.dock.name, error=str(exc))
                self.last_error = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(_REOPEN_DELAY_S)

    async def _on_event(self, event: DockEvent) -> None:
        if self.last_error is not None:
            log.info("dock_recovered", driver=self.dock.name)
            self.last_error = None
        if not event.docked:
            if self.docked:
                log.info("module_undocked", offer_node=self.offer.node_id if self.offer else None)
            self.docked, self.offer, self.offer_read_at = False, None, None
            if self._own_offer is not None:
                self._may_present.set()
            return
        self.docked = True
        self._may_present.clear()
        if self._window is not None:  # reading the docked module comes first
            self._window.cancel()
        log.info("module_docked")
        offer = await self._read_offer()
        if offer is None or not self.docked:
            return
        self.offer = offer
        read_at = asyncio.get_running_loop().time()
        self.offer_read_at = time.time()
        log.info(
            "join_offer_read",
            node=offer.node_id,
            endpoint=offer.endpoint,
            dock_to_offer_ms=round((read_at - event.at) * 1000, 1),
        )
        for queue in self._subscribers:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(JoinOfferEvent(offer, event.at, read_at))

    async def _read_offer(self) -> JoinOffer | None:
        if self.nfc is None:
            return None
        for attempt in range(1, _NFC_ATTEMPTS + 1):
            try:
                if self.nfc.state is not DriverState.OPEN:
                    await self.nfc.open()
                offer = await self.nfc.read(self.read_timeout)
            except DriverError as exc:
                log.warning("nfc_read_failed", attempt=attempt, driver=self.nfc.name, error=str(exc))
                continue
            if offer is not None:
                return offer
            log.info("nfc_no_offer", attempt=attempt)
        return None

    def report(self) -> dict[str, Any]:
        """The dock part of /v1/health."""
        offer = self.offer
        return {
            "driver": self.dock.name,
            "available": self.last_error is None and self.dock.state is DriverState.OPEN,
            "docked": bool(self.docked),
            "last_error": self.last_error,
            "nfc": None if self.nfc is None else {"driver": self.nfc.name, "state": self.nfc.state.value},
            "join_offer": None
            if offer is None
            else {
                "node_id": offer.node_id,
                "endpoint": offer.endpoint,
                "has_token": bool(offer.token),
                "expires_at": offer.expires_at or None,
                "read_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.offer_read_at or 0)),
            },
        }
