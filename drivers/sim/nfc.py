"""SimNfc: an API-level twin of NfcLink for the sim profile.

Reading returns the join offer of the module stacked on the box, but only after a round trip through the real
NDEF codec (encode_join_offer, then decode_join_offer), so the bytes a real tag would carry are exercised. Offering
presents our offer until a simulated reader taps the box (`tap()`), the way an emulated tag waits for a reader.
Below this level the faithful twin is an nfcpy `udp` peer (see drivers/nfc/nfcpy_link.py and its tests).

Faults: "no_tag" (nothing answers: read() times out with None, offer() is never read), "corrupt" (the transfer
stops halfway: the reader decodes truncated bytes and gets NdefError), or None.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Literal

from common.aio import wait_for
from drivers.base import DriverState, DriverStateError, JoinOffer
from drivers.nfc.ndef import decode_join_offer, encode_join_offer

NfcFault = Literal["no_tag", "corrupt"]
_FAULTS = ("no_tag", "corrupt")


class SimNfc:
    """NfcLink twin: reads the stacked module's offer through the NDEF codec; fault injection with set_fault()."""

    def __init__(self, current_offer: Callable[[], JoinOffer | None], *, poll_interval: float = 0.05) -> None:
        self._current_offer = current_offer
        self._poll_interval = poll_interval
        self._state = DriverState.CLOSED
        self._fault: NfcFault | None = None
        self._lock = asyncio.Lock()
        self._presented: bytes | None = None  # the NDEF message offer() is presenting right now
        self._presented_changed = asyncio.Event()
        self._was_read = asyncio.Event()

    @property
    def name(self) -> str:
        return "sim-nfc"

    @property
    def state(self) -> DriverState:
        return self._state

    @property
    def fault(self) -> NfcFault | None:
        return self._fault

    async def open(self) -> None:
        """Open the twin."""
        self._state = DriverState.OPEN

    async def close(self) -> None:
        """Close the twin; a running offer() stops being presented."""
        self._state = DriverState.CLOSED
        self._presented = None

    def set_fault(self, kind: NfcFault | None) -> None:
        """Inject a fault ("no_tag", "corrupt") or clear it (None)."""
        if kind is not None and kind not in _FAULTS:
            raise ValueError(f"unknown NFC fault {kind!r}; expected one of {_FAULTS} or None")
        self._fault = kind

    async def read(self, timeout: float) -> JoinOffer | None:
        """The stacked module's offer, decoded from its NDEF bytes; None when no module shows up within `timeout`."""
        async with self._lock:
            self._check_open("read")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                offer = self._current_offer() if self._fault != "no_tag" else None
                if offer is not None:
                    return decode_join_offer(self._on_air(encode_join_offer(offer)))
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                await asyncio.sleep(min(self._poll_interval, remaining))

    async def offer(self, offer: JoinOffer, timeout: float) -> bool:
        """Present `offer` until a simulated reader taps the box (True) or `timeout` passes (False)."""
        message = encode_join_offer(offer)  # NdefError (too large, bad fields) before anything is presented
        async with self._lock:
            self._check_open("offer")
            self._was_read.clear()
            self._presented = message
            self._presented_changed.set()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            try:
                while not self._was_read.is_set():
                    remaining = deadline - loop.time()
                    if remaining <= 0 or self._state is not DriverState.OPEN:
                        return False
                    with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                        await wait_for(self._was_read.wait(), min(self._poll_interval, remaining))
            finally:
                self._presented = None
            return True

    async def tap(self, timeout: float = 0.0) -> JoinOffer | None:
        """A simulated reader held to the box: the offer being presented (waiting up to `timeout`), else None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._presented is None or self._fault == "no_tag":
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            self._presented_changed.clear()
            try:
                await wait_for(self._presented_changed.wait(), min(self._poll_interval, remaining))
            except (TimeoutError, asyncio.TimeoutError):
                continue
        message = self._on_air(self._presented)
        self._was_read.set()  # the emulated tag served its blocks; what arrives may still be corrupt
        return decode_join_offer(message)

    def _on_air(self, message: bytes) -> bytes:
        # "corrupt": the reader lost the tag halfway through the transfer.
        return message[: len(message) // 2] if self._fault == "corrupt" else message

    def _check_open(self, what: str) -> None:
        if self._state is not DriverState.OPEN:
            raise DriverStateError(f"{self.name} is {self._state.value}; open it before {what}")
