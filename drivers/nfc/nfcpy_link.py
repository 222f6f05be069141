"""NfcLink over nfcpy: read a module's join offer as a reader, or present ours as an emulated Type 3 Tag.

nfcpy blocks (`ContactlessFrontend.connect` runs until a tag is handled or its `terminate` callable says stop), so
the link owns one worker thread for its lifetime: it opens the frontend, runs every connect, and closes it. Each
operation gets its own stop event and deadline, both checked by `terminate`; a timed-out or cancelled operation
returns (or re-raises CancelledError) at once while the thread winds the connect down at nfcpy's next check (well
under a second on hardware, up to one second on the `udp` driver, whose polls wait 1 s for an answer).

Type 3 is the only tag type nfcpy emulates. We run the emulated tag's command loop ourselves instead of letting
`connect` do it: nfcpy's loop waits for the next command without a timeout, which would ignore `terminate`, and we
want to finish as soon as a reader has fetched every NDEF block.

On the `udp` driver the emulating side binds 0.0.0.0:<port> for each listen and the reader sends to <host>:<port>
from an ephemeral port: a reader and an emulator meet on the same path, and one port carries one emulated tag.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import structlog

from drivers.base import DriverConfigError, DriverError, DriverState, DriverStateError, JoinOffer, LinkError
from drivers.nfc.ndef import NdefError, NoJoinOfferError, decode_join_offer, encode_join_offer
from drivers.nfc.tag3 import SERVICE_NDEF_READ, NdefArea, random_idm, sensf_res

log = structlog.get_logger("drivers.nfc")

_T = TypeVar("_T")
_PATH_PREFIXES = ("usb", "tty:", "com:", "udp")
# A module on the box emulates Type 3 (212F); stickers and phones answer at 106A/106B. The udp driver only
# carries what the peer emulates (Type 3), and every extra technology costs a 1 s unanswered poll there.
HARDWARE_TARGETS = ("212F", "106A", "106B")
UDP_TARGETS = ("212F",)
_LISTEN_SLICE = 0.5  # seconds one listen or one wait for a reader command lasts before `terminate` is checked
_RESCAN_PAUSE = 0.2  # after a tag without our record, before polling again (it may still be on the reader)
_LAST_RESPONSE_WAIT = 0.05  # lets the last block's response leave the chip before the connect ends
_CLOSE_TIMEOUT = 5.0


class ReaderError(LinkError):
    """The reader stopped working: nfcpy reported an I/O error, or the device cannot do what was asked."""


class _Worker:
    """One thread running blocking jobs in order; each result goes back to the loop on an asyncio Future."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, fn: Callable[[], _T]) -> asyncio.Future[_T]:
        """Queue `fn`; the future settles on the loop (cancelling it only abandons the result)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()

        def job() -> None:
            outcome: tuple[bool, Any] = (False, LinkError("the NFC worker thread died"))
            try:
                outcome = (True, fn())
            except Exception as exc:
                outcome = (False, exc)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                    loop.call_soon_threadsafe(_settle, future, outcome)

        self._jobs.put(job)
        return future

    def stop(self) -> None:
        """Let the thread exit after the jobs already queued."""
        self._jobs.put(None)

    async def wait_stopped(self, timeout: float) -> bool:
        """Wait (without blocking the loop) until the thread has exited; False when it is still running."""
        deadline = time.monotonic() + timeout
        while self.thread.is_alive():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def _main(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()


def _settle(future: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    if future.done():  # abandoned after a timeout or a cancellation
        return
    ok, value = outcome
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class NfcpyLink:
    """NfcLink on an nfcpy reader: "usb", "usb:054c:06c3", "tty:S0:pn532", "udp:localhost:54321", ..."""

    def __init__(self, path: str, *, targets: Sequence[str] | None = None) -> None:
        if not path.startswith(_PATH_PREFIXES):
            raise DriverConfigError(
                f"{path!r} is not an nfcpy device path; expected usb[:vendor[:product]], "
                f"tty:<port>:<driver>, com:<port>:<driver> or udp[:host][:port]"
            )
        self._path = path
        self._targets = tuple(targets) if targets else (UDP_TARGETS if path.startswith("udp") else HARDWARE_TARGETS)
        self._state = DriverState.CLOSED
        self._worker: _Worker | None = None
        self._clf: Any = None  # nfc.ContactlessFrontend; only the worker thread touches it
        self._lock = asyncio.Lock()
        self._stop: threading.Event | None = None  # stop event of the operation running on the worker

    @property
    def name(self) -> str:
        return f"nfcpy:{self._path}"

    @property
    def state(self) -> DriverState:
        return self._state

    async def open(self) -> None:
        """Start the worker thread and open the frontend on it; LinkError names the path when there is no reader."""
        if self._state is DriverState.OPEN:
            return
        if self._worker is not None:  # faulted: start over with a fresh frontend
            await self.close()
        worker = _Worker(f"nfc-{self._path}")
        worker.start()
        self._worker = worker
        try:
            await worker.submit(self._open_blocking)
        except BaseException:
            await self.close()
            raise
        self._state = DriverState.OPEN
        log.info("nfc_opened", driver=self.name)

    async def close(self) -> None:
        """End any running connect, close the frontend and stop the worker thread."""
        worker, self._worker = self._worker, None
        self._state = DriverState.CLOSED
        if worker is None:
            return
        if self._stop is not None:
            self._stop.set()
        closed = worker.submit(self._close_blocking)
        worker.stop()
        done, _ = await asyncio.wait({closed}, timeout=_CLOSE_TIMEOUT)
        if not done or not await worker.wait_stopped(_CLOSE_TIMEOUT):
            closed.cancel()
            log.warning("nfc_close_timeout", driver=self.name, seconds=_CLOSE_TIMEOUT)
        elif (error := closed.exception()) is not None:
            log.warning("nfc_close_failed", driver=self.name, error=str(error))

    async def read(self, timeout: float) -> JoinOffer | None:
        """The join offer of the first tag carrying one within `timeout`; None when none showed up.

        Tags without a thox.ai:join record are skipped and polling goes on; a join record that is ours but
        malformed raises NdefError.
        """
        return await self._operate("read", timeout, self._read_blocking, None)

    async def offer(self, offer: JoinOffer, timeout: float) -> bool:
        """Emulate a Type 3 Tag carrying `offer`; True once a reader has read the whole NDEF message."""
        return await self.present(encode_join_offer(offer), timeout)  # NdefError before anything is emulated

    async def present(self, message: bytes, timeout: float) -> bool:
        """Emulate a read-only Type 3 Tag holding any NDEF `message`; True once a reader has read all of it."""
        area = NdefArea(message)
        return await self._operate(
            "offer", timeout, lambda stop, deadline: self._offer_blocking(area, stop, deadline), False
        )

    async def _operate(
        self, what: str, timeout: float, blocking: Callable[[threading.Event, float], _T], on_timeout: _T
    ) -> _T:
        async with self._lock:
            worker = self._worker
            if worker is None or self._state is not DriverState.OPEN:
                raise DriverStateError(f"{self.name} is {self._state.value}; open it before {what}")
            stop = threading.Event()
            deadline = time.monotonic() + timeout
            self._stop = stop
            future = worker.submit(lambda: blocking(stop, deadline))
            try:
                done, _ = await asyncio.wait({future}, timeout=max(0.0, timeout))
            except asyncio.CancelledError:
                stop.set()
                future.cancel()
                raise
            if not done:
                stop.set()
                future.cancel()
                return on_timeout
            try:
                return future.result()
            except NdefError:
                raise
            except DriverError:
                self._state = DriverState.FAULTED
                raise

    # ------------------------------------------------------------------ worker thread

    def _open_blocking(self) -> None:
        import nfc

        try:
            self._clf = nfc.ContactlessFrontend(self._path)
        except OSError as exc:
            raise LinkError(f"no NFC reader at {self._path!r}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise DriverConfigError(f"nfcpy cannot open {self._path!r}: {exc}{self._udp_port_hint()}") from exc

    def _udp_port_hint(self) -> str:
        # nfcpy's udp driver resolves the port with getnameinfo and int()s the result: a port that /etc/services
        # names (9 is "discard") comes back as a name and fails.
        port = self._path.split(":")[-1]
        if not self._path.startswith("udp") or not port.isdigit():
            return ""
        try:
            service = socket.getservbyport(int(port), "udp")
        except (OSError, OverflowError):
            return ""
        return f" (port {port} is the {service!r} service; nfcpy's udp driver needs an unnamed port)"

    def _close_blocking(self) -> None:
        clf, self._clf = self._clf, None
        if clf is not None:
            clf.close()

    def _connect(self, what: str, **options: Any) -> Any:
        try:
            result = self._clf.connect(**options)
        except DriverError:
            raise
        except Exception as exc:
            raise ReaderError(f"{self.name}: nfcpy failed during {what}: {exc!r}") from exc
        if result is False:  # nfcpy's answer to IOError and UnsupportedTargetError; it has logged the cause
            raise ReaderError(
                f"{self.name}: the reader stopped during {what} (device gone, or it cannot {what}; "
                f"nfcpy's log names the cause)"
            )
        return result

    def _read_blocking(self, stop: threading.Event, deadline: float) -> JoinOffer | None:
        def terminate() -> bool:
            return stop.is_set() or time.monotonic() >= deadline

        found: list[JoinOffer | NdefError | None] = []

        def on_connect(tag: Any) -> bool:
            found.append(self._read_tag(tag))
            return False  # hand the tag back at once instead of waiting for it to leave

        rdwr = {"targets": list(self._targets), "on-connect": on_connect, "iterations": 1, "beep-on-connect": False}
        while not terminate():
            found.clear()
            self._connect("read", rdwr=rdwr, terminate=terminate)
            if not found:  # terminated
                return None
            outcome = found[0]
            if isinstance(outcome, NdefError):
                raise outcome
            if outcome is not None:
                return outcome
            stop.wait(_RESCAN_PAUSE)
        return None

    def _read_tag(self, tag: Any) -> JoinOffer | NdefError | None:
        import nfc.clf
        import nfc.tag

        try:
            ndef = tag.ndef
            octets = bytes(ndef.octets) if ndef is not None else None
        except (nfc.tag.TagCommandError, nfc.clf.CommunicationError) as exc:
            log.debug("nfc_tag_read_failed", driver=self.name, tag=str(tag), error=str(exc))
            return None  # it left mid-read; poll again
        if octets is None:
            log.debug("nfc_tag_without_ndef", driver=self.name, tag=str(tag))
            return None
        try:
            return decode_join_offer(octets)
        except NoJoinOfferError as exc:
            log.debug("nfc_tag_not_a_join_offer", driver=self.name, tag=str(tag), reason=str(exc))
            return None
        except NdefError as exc:
            log.warning("nfc_join_offer_malformed", driver=self.name, tag=str(tag), error=str(exc), octets=octets.hex())
            return exc

    def _offer_blocking(self, area: NdefArea, stop: threading.Event, deadline: float) -> bool:
        idm = random_idm()

        def terminate() -> bool:
            return stop.is_set() or time.monotonic() >= deadline

        def on_startup(target: Any) -> Any:
            target.brty = "212F"
            target.sensf_res = bytearray(sensf_res(idm))
            return target

        def on_connect(emulation: Any) -> bool:
            # Read-only NDEF service only: a reader's write gets the tag's "service not found" error.
            emulation.add_service(SERVICE_NDEF_READ, lambda block, _rb, _re: area.block(block), None)
            return False  # we run the command loop ourselves (see the module docstring)

        card = {"on-startup": on_startup, "on-connect": on_connect, "timeout": _LISTEN_SLICE}
        while not terminate():
            emulation = self._connect("offer", card=card, terminate=terminate)
            if emulation is None:  # terminated
                return False
            log.debug("nfc_offer_activated", driver=self.name, emulation=str(emulation))
            if self._serve(emulation, area, terminate):
                log.info("nfc_offer_read", driver=self.name, idm=idm.hex())
                return True
        return False

    def _serve(self, emulation: Any, area: NdefArea, terminate: Callable[[], bool]) -> bool:
        """Answer reader commands until it has every NDEF block (True) or leaves or time is up (False)."""
        import nfc.clf

        response = emulation.process_command(emulation.cmd)
        while True:
            if area.fully_read:
                with contextlib.suppress(nfc.clf.CommunicationError):
                    emulation.send_response(response, _LAST_RESPONSE_WAIT)
                return True
            if terminate():
                return False
            try:
                command = emulation.send_response(response, _LISTEN_SLICE)
            except nfc.clf.BrokenLinkError:
                return False  # the reader switched its field off before reading everything
            except nfc.clf.CommunicationError:
                response = None  # nothing (or garbage) yet: keep listening without answering
                continue
            response = emulation.process_command(command) if command else None
