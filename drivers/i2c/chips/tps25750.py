"""TI TPS25750 USB-PD controller as FakeSMBus sees it: the host interface at command level.

What follows TI's host interface (TPS25750 Technical Reference Manual SLVUC05, with register lengths as the
Zephyr and Linux `tipd` drivers use them):

- Every register read is a block read: the first byte is the register's length in bytes, then its contents
  (multi-byte fields little-endian). A host may stop reading early. A write is [register, byte count,
  data...]; bytes not written keep their value.
- 0x03 MODE (4 bytes) reads "APP " in application mode ("PTCH"/"BOOT" while waiting for a patch bundle).
- 0x08 CMD1 (4) takes a 4-character command (4CC); it reads back the command while the task runs, 0 when it is
  done, and "!CMD" when the command is not recognised. 0x09 DATA1 (64): byte 0 of the output is the task
  result (0 success, 3 rejected).
- 0x14 INT_EVENT1 / 0x16 INT_MASK1 / 0x18 INT_CLEAR1 (11 each): events set here are bit 3 PlugInsertOrRemoval,
  12 NewContractAsConsumer, 14 SourceCapMsgReceived, 30 Cmd1Complete; writing ones to INT_CLEAR1 clears them.
- 0x1A STATUS (5): bit 0 PlugPresent, bits 3..1 ConnState (6: connection present), bit 5 PortRole (0 sink),
  bits 21..20 VbusStatus (0 vSafe0V, 1 vSafe5V, 2 another PD voltage).
- 0x30 RX_SOURCE_CAPS (29): byte 0 bits 2..0 the number of valid PDOs, then seven 32-bit PDOs.
- 0x33 TX_SINK_CAPS (29, read/write): the same layout, the sink's own PDOs.
- 0x34 ACTIVE_CONTRACT_PDO (6): bytes 0..3 the source PDO of the contract (bytes 4..5 are not modelled: 0).
- 0x35 ACTIVE_CONTRACT_RDO (4): the RDO of the contract; 0 with no contract.

The one 4CC task modelled is 'GSrC' (PD Get Source Capabilities): the source re-sends its offer, which lands in
RX_SOURCE_CAPS, and (as a sink must answer every Source_Capabilities with a Request) the chip requests again.
Every other command reads back "!CMD", including real TPS25750 tasks this twin does not model (PR/DR swaps,
GSkC, SSrC, patch-bundle loading, I2C passthrough), so no test can pass on behaviour the twin lacks, and
'ANeg', which only the TPS25751/TPS26750 have. A task runs for `command_polls` reads of CMD1, then completes.

Our simplification: which PDO the chip requests is set on the real part by its Application Configuration
(patch bundle). The twin requests the highest-numbered TX_SINK_CAPS fixed PDO that a source fixed PDO meets
(same voltage, enough current), else the 5 V PDO with the capability-mismatch bit set, as the STUSB4500 does.
TI shows a host changing the requested voltage on the TPS25730 by rewriting TX_SINK_CAPS and issuing GSrC
(TexasInstruments/usb-pd, tps25730_usb_pd_change_voltage); that the TPS25750 reacts alike is unverified.
Attach negotiates at once and silently; a source that changes its offer while attached is seen at the next GSrC
(a real source would announce it by itself). A garbled read ("implausible") returns all ones.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

MODE = 0x03
CMD1 = 0x08
DATA1 = 0x09
INT_EVENT1 = 0x14
INT_MASK1 = 0x16
INT_CLEAR1 = 0x18
STATUS = 0x1A
RX_SOURCE_CAPS = 0x30
TX_SINK_CAPS = 0x33
ACTIVE_CONTRACT_PDO = 0x34
ACTIVE_CONTRACT_RDO = 0x35

LENGTHS: dict[int, int] = {
    MODE: 4,
    CMD1: 4,
    DATA1: 64,
    INT_EVENT1: 11,
    INT_MASK1: 11,
    INT_CLEAR1: 11,
    STATUS: 5,
    RX_SOURCE_CAPS: 29,
    TX_SINK_CAPS: 29,
    ACTIVE_CONTRACT_PDO: 6,
    ACTIVE_CONTRACT_RDO: 4,
}
_WRITABLE = frozenset({CMD1, DATA1, INT_MASK1, INT_CLEAR1, TX_SINK_CAPS})

EVENT_PLUG = 3
EVENT_NEW_CONTRACT_AS_CONSUMER = 12
EVENT_SOURCE_CAPS_RECEIVED = 14
EVENT_CMD1_COMPLETE = 30
TASK_SUCCESS = 0
TASK_REJECTED = 3
UNKNOWN_COMMAND = b"!CMD"


def _fixed_pdo(mv: int, ma: int) -> int:
    return (mv // 50) << 10 | ma // 10


class Tps25750Model:
    """A TPS25750 in application mode on the fake bus, sinking from whatever `source()` offers."""

    def __init__(
        self,
        source: Callable[[], Sequence[int] | None],
        *,
        sink_caps: Sequence[int] = (_fixed_pdo(5000, 3000),),
        mode: str = "APP ",
        command_polls: int = 1,
    ) -> None:
        self._source = source
        self._lock = threading.Lock()
        self.registers: dict[int, bytearray] = {register: bytearray(n) for register, n in LENGTHS.items()}
        self.registers[MODE][:] = mode.encode("ascii")[:4].ljust(4)
        self._set_pdos(TX_SINK_CAPS, sink_caps)
        self.pointer = 0
        self.command_polls = command_polls
        self.writes: list[bytes] = []  # every write message, for wire-level assertions in tests
        self.commands: list[str] = []  # every 4CC written to CMD1, recognised or not
        self.source_rejects = False
        self._attached = False
        self._offer: tuple[int, ...] = ()
        self._vbus_mv = 0
        self._pending: str | None = None
        self._polls_left = 0

    # ------------------------------------------------------------------ what the simulation reads

    @property
    def vbus_mv(self) -> int:
        """VBUS as the contract sets it: 0 detached, 5000 at the default contract, the negotiated voltage."""
        self._try_sync()
        return self._vbus_mv

    @property
    def contract_rdo(self) -> int:
        """ACTIVE_CONTRACT_RDO: 0 when there is no contract."""
        self._try_sync()
        return int.from_bytes(self.registers[ACTIVE_CONTRACT_RDO], "little")

    def _try_sync(self) -> None:
        # Never wait for the bus thread (this may run on the event loop); a transfer in flight syncs anyway.
        if self._lock.acquire(blocking=False):
            try:
                self._sync_attach()
            finally:
                self._lock.release()

    # ------------------------------------------------------------------ I2cTarget

    def on_write(self, data: bytes) -> None:
        """[register] selects a register to read; [register, count, data...] writes it."""
        with self._lock:
            self.writes.append(bytes(data))
            self._sync_attach()
            if not data:
                return
            self.pointer = data[0]
            if len(data) < 2 or self.pointer not in _WRITABLE:
                return
            payload = data[2 : 2 + data[1]][: LENGTHS[self.pointer]]
            if self.pointer == INT_CLEAR1:
                events = self.registers[INT_EVENT1]
                for i, value in enumerate(payload):
                    events[i] &= ~value
                return
            self.registers[self.pointer][: len(payload)] = payload
            if self.pointer == CMD1 and len(payload) == 4:
                self._start(bytes(payload))

    def on_read(self, length: int) -> bytes:
        """The byte count, then the register; reading CMD1 advances a running task."""
        with self._lock:
            self._sync_attach()
            if self.pointer == CMD1 and self._pending is not None:
                if self._polls_left > 0:
                    self._polls_left -= 1
                else:
                    self._finish()
            value = self.registers.get(self.pointer)
            block = bytes([len(value)]) + bytes(value) if value is not None else b"\x00"
            return block[:length].ljust(length, b"\x00")

    def implausible(self, length: int) -> bytes:
        """A garbled read: all ones (a byte count of 255, which no register has)."""
        return b"\xff" * length

    # ------------------------------------------------------------------ commands

    def _start(self, command: bytes) -> None:
        name = command.decode("ascii", errors="replace")
        self.commands.append(name)
        if name == "GSrC":
            self._pending, self._polls_left = name, self.command_polls
        else:
            self._pending = None
            self.registers[CMD1][:] = UNKNOWN_COMMAND

    def _finish(self) -> None:
        self._pending = None
        self.registers[DATA1][:] = bytes(LENGTHS[DATA1])
        if self._attached and self._offer:
            self._receive_caps()
            self.registers[DATA1][0] = TASK_SUCCESS
        else:
            self.registers[DATA1][0] = TASK_REJECTED  # no PD partner to ask
        self.registers[CMD1][:] = bytes(4)
        self._event(EVENT_CMD1_COMPLETE)

    # ------------------------------------------------------------------ attach and negotiation

    def _sync_attach(self) -> None:
        offer = self._source()
        if offer is not None and not self._attached:
            self._attached, self._offer = True, tuple(offer)
            self._event(EVENT_PLUG)
            self._receive_caps()
        elif offer is None and self._attached:
            self._attached, self._offer, self._vbus_mv = False, (), 0
            self._event(EVENT_PLUG)
            for register in (RX_SOURCE_CAPS, ACTIVE_CONTRACT_PDO, ACTIVE_CONTRACT_RDO):
                self.registers[register][:] = bytes(LENGTHS[register])
            self._update_status()
        elif offer is not None:
            self._offer = tuple(offer)

    def _receive_caps(self) -> None:
        """The source's Source_Capabilities arrive; the chip requests from TX_SINK_CAPS."""
        if not self._offer:  # a Type-C source without PD: nothing to request, vSafe5V at Type-C current
            self._vbus_mv = 5000
            self._update_status()
            return
        self._set_pdos(RX_SOURCE_CAPS, self._offer[:7])
        self._event(EVENT_SOURCE_CAPS_RECEIVED)
        position, rdo = self._evaluate()
        word = self._offer[position - 1] if position <= len(self._offer) else 0
        operating_ma = (rdo >> 10 & 0x3FF) * 10
        if self.source_rejects or word >> 30 != 0 or operating_ma > (word & 0x3FF) * 10:
            if not self._vbus_mv:
                self._vbus_mv = 5000  # no explicit contract: vSafe5V at Type-C current
        else:
            self.registers[ACTIVE_CONTRACT_PDO][:4] = word.to_bytes(4, "little")
            self.registers[ACTIVE_CONTRACT_RDO][:] = rdo.to_bytes(4, "little")
            self._vbus_mv = (word >> 10 & 0x3FF) * 50
            self._event(EVENT_NEW_CONTRACT_AS_CONSUMER)
        self._update_status()

    def _evaluate(self) -> tuple[int, int]:
        sinks = self._pdos(TX_SINK_CAPS)
        for sink in reversed(sinks[1:]):
            if sink >> 30 != 0:
                continue
            sink_mv, sink_ma = (sink >> 10 & 0x3FF) * 50, (sink & 0x3FF) * 10
            for position, word in enumerate(self._offer, start=1):
                if word >> 30 == 0 and (word >> 10 & 0x3FF) * 50 == sink_mv and (word & 0x3FF) * 10 >= sink_ma:
                    return position, _rdo(position, sink_ma, mismatch=False)
        sink_ma = (sinks[0] & 0x3FF) * 10 if sinks else 0
        source_ma = (self._offer[0] & 0x3FF) * 10
        mismatch = len(sinks) > 1 or sink_ma > source_ma
        return 1, _rdo(1, min(sink_ma, source_ma), mismatch=mismatch)

    def _update_status(self) -> None:
        status = self.registers[STATUS]
        status[:] = bytes(LENGTHS[STATUS])
        if self._attached:
            status[0] = 1 | 6 << 1  # PlugPresent, ConnState 6, PortRole sink, DataRole UFP
            status[2] = (1 if self._vbus_mv <= 5000 else 2) << 4

    # ------------------------------------------------------------------ helpers

    def _event(self, bit: int) -> None:
        self.registers[INT_EVENT1][bit // 8] |= 1 << bit % 8

    def _pdos(self, register: int) -> list[int]:
        value = self.registers[register]
        count = min(value[0] & 0x07, 7)
        return [int.from_bytes(value[1 + 4 * i : 5 + 4 * i], "little") for i in range(count)]

    def _set_pdos(self, register: int, pdos: Sequence[int]) -> None:
        data = bytes([len(pdos)]) + b"".join(word.to_bytes(4, "little") for word in pdos)
        self.registers[register][:] = data.ljust(LENGTHS[register], b"\x00")


def _rdo(position: int, ma: int, *, mismatch: bool) -> int:
    steps = ma // 10
    return position << 28 | int(mismatch) << 26 | steps << 10 | steps
