"""ST STUSB4500 USB-PD sink controller as FakeSMBus sees it: a flat byte register file plus a PD event model.

Register semantics this twin implements (research/hardware.md section 2; addresses from ST's register header
as used by public drivers):

- The first byte of a write sets the register pointer; further bytes write consecutive registers (the pointer
  auto-increments). A read returns consecutive registers from the pointer. Multi-byte values are little-endian.
- 0x0B ALERT_STATUS_1: bit 1 PRT_STATUS_AL (a PD message arrived), bit 6 PORT_STATUS_AL (attach changed).
  The whole register clears when it is read. 0x0C ALERT_STATUS_MASK: read/write, 1 masks the ALERT pin only
  (the pin is not modelled; status bits latch regardless, as ST's sample code reads status & ~mask).
- 0x0D PORT_STATUS_0: bit 0 ATTACH_TRANS, set on attach and detach, cleared on read.
  0x0E PORT_STATUS_1: bit 0 ATTACH (only this bit is modelled).
- 0x11 CC_STATUS: 0x03 attached (CC1 sees the source's 3 A Rp; orientation is not modelled), 0x00 detached.
- 0x16 PRT_STATUS: bit 2 MSG_RECEIVED, cleared on read.
- 0x23 RESET_CTRL: bit 0 set holds the port in reset (the source sees a detach, VBUS drops); clearing it
  re-attaches and negotiates again from the sink PDOs.
- 0x2F DEVICE_ID: 0x25 (0x21 on early silicon; a constructor argument).
- 0x31-0x32 RX_HEADER: the last received message's 16-bit header. 0x33-0x4E RX_DATA_OBJ1..7: its objects.
- 0x70 DPM_PDO_NUMB: bits 2..0, how many sink PDOs are active (1..3). 0x85-0x90 DPM_SNK_PDO1..3: the sink's
  fixed PDOs. 0x91-0x94 RDO_REG_STATUS: the RDO of the current contract (0 with no contract). Read-only.
- 0x51 TX_HEADER and 0x1A PD_COMMAND_CTRL are not in ST's datasheet; they are known only from ST's sample code
  (ported by Govish/Cube_Sandbox): TX_HEADER=0x0D (Soft_Reset) followed by PD_COMMAND_CTRL=0x26 sends a PD soft
  reset. That is the only command this twin knows; other command values are stored and do nothing.

Event model:

- Attach (the `source` callable starts returning PDO words): the chip negotiates at once, from its sink PDOs,
  without the host: the twin records the contract silently (no messages queued), like a chip whose host was not
  listening. Detach (`source` returns None) drops the contract: VBUS 0, RDO 0.
- Soft reset with a source attached: the source answers Accept (to the Soft_Reset; the PD spec requires it),
  then Source_Capabilities. Once the host has read the capabilities, the chip requests from its sink PDOs:
  the highest-numbered active sink PDO a source fixed PDO meets (same voltage, enough current), else PDO1 (5 V)
  with the capability-mismatch bit set. The source answers Accept (RDO_REG_STATUS now holds the request) and
  then PS_RDY (VBUS is at the new voltage). Each message sits in RX_HEADER/RX_DATA_OBJ with PRT_STATUS_AL and
  MSG_RECEIVED raised until the host has read it (its header, and its objects if any); only then does the next
  one arrive. Gating on reads is the twin's simplification: the chip receives them whether or not anyone
  reads; it makes every message observable to a polling driver, deterministically.
- `source_rejects` makes the source answer Reject to every request (the contract then stays as it was).
- A source that changes its offer while attached is seen at the next soft reset or attach; a real source
  would send the new Source_Capabilities by itself, which the twin does not model.

A read the chip garbles (the fault injector's "implausible") returns all ones, as a floating SDA line does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

ALERT_STATUS_1 = 0x0B
ALERT_STATUS_MASK = 0x0C
PORT_STATUS_0 = 0x0D
PORT_STATUS_1 = 0x0E
CC_STATUS = 0x11
PRT_STATUS = 0x16
PD_COMMAND_CTRL = 0x1A
RESET_CTRL = 0x23
DEVICE_ID = 0x2F
RX_HEADER = 0x31
RX_DATA_OBJ = 0x33
TX_HEADER = 0x51
DPM_PDO_NUMB = 0x70
DPM_SNK_PDO1 = 0x85
RDO_REG_STATUS = 0x91

PRT_STATUS_AL = 1 << 1
PORT_STATUS_AL = 1 << 6
MSG_RECEIVED = 1 << 2
SOFT_RESET_HEADER = 0x0D
SEND_COMMAND = 0x26

_WRITABLE = frozenset(
    {ALERT_STATUS_MASK, PD_COMMAND_CTRL, RESET_CTRL, TX_HEADER, DPM_PDO_NUMB, *range(DPM_SNK_PDO1, DPM_SNK_PDO1 + 12)}
)
_CLEAR_ON_READ = (ALERT_STATUS_1, PORT_STATUS_0, PRT_STATUS)

# Message types the source sends (USB PD 3.x); kept apart from drivers.power.pdo so a codec bug cannot hide.
_ACCEPT, _REJECT, _PS_RDY, _SOURCE_CAPABILITIES = 0x03, 0x04, 0x06, 0x01


def _fixed_pdo(mv: int, ma: int) -> int:
    return (mv // 50) << 10 | ma // 10


# ST's factory NVM: 5 V/1.5 A, 15 V/1.5 A, 20 V/1 A. The factory PDO count is 3; a board that must start at 5 V
# programs 1, which is the twin's default.
FACTORY_SINK_PDOS: tuple[int, int, int] = (_fixed_pdo(5000, 1500), _fixed_pdo(15000, 1500), _fixed_pdo(20000, 1000))


@dataclass(frozen=True)
class _Message:
    message_type: int
    objects: tuple[int, ...] = ()


class Stusb4500Model:
    """A STUSB4500 on the fake bus, sinking from whatever `source()` offers (raw PDO words, None = detached)."""

    def __init__(
        self,
        source: Callable[[], Sequence[int] | None],
        *,
        device_id: int = 0x25,
        sink_pdos: Sequence[int] = FACTORY_SINK_PDOS,
        pdo_count: int = 1,
    ) -> None:
        self._source = source
        self._lock = threading.Lock()
        self.registers = bytearray(256)
        self.registers[DEVICE_ID] = device_id
        self.registers[ALERT_STATUS_MASK] = 0xFF
        self.registers[DPM_PDO_NUMB] = pdo_count
        for slot, word in enumerate(sink_pdos[:3]):
            self._put32(DPM_SNK_PDO1 + 4 * slot, word)
        self.pointer = 0
        self.writes: list[bytes] = []  # every write message, for wire-level assertions in tests
        self.source_rejects = False
        self._attached = False
        self._offer: tuple[int, ...] = ()
        self._vbus_mv = 0
        self._queue: list[_Message] = []
        self._current: _Message | None = None
        self._header_read = False
        self._message_id = 0
        self._pending_rdo = 0
        self._pending_mv = 0

    # ------------------------------------------------------------------ what the simulation reads

    @property
    def vbus_mv(self) -> int:
        """VBUS as the contract sets it: 0 detached, 5000 at the default contract, the negotiated voltage."""
        self._try_sync()
        return self._vbus_mv

    @property
    def contract_rdo(self) -> int:
        """RDO_REG_STATUS: the RDO of the current contract, 0 when there is none."""
        self._try_sync()
        return self._get32(RDO_REG_STATUS)

    def _try_sync(self) -> None:
        # Never wait for the bus thread (this may run on the event loop); a transfer in flight syncs anyway.
        if self._lock.acquire(blocking=False):
            try:
                self._sync_attach()
            finally:
                self._lock.release()

    # ------------------------------------------------------------------ I2cTarget

    def on_write(self, data: bytes) -> None:
        """Pointer byte, then bytes for consecutive registers."""
        with self._lock:
            self.writes.append(bytes(data))
            self._sync_attach()
            if not data:
                return
            self.pointer = data[0]
            written: dict[int, int] = {}
            for offset, value in enumerate(data[1:]):
                register = (self.pointer + offset) & 0xFF
                if register in _WRITABLE:
                    self.registers[register] = value
                    written[register] = value
            if RESET_CTRL in written:
                self._sync_attach()
            if written.get(PD_COMMAND_CTRL) == SEND_COMMAND and self.registers[TX_HEADER] == SOFT_RESET_HEADER:
                self._soft_reset()

    def on_read(self, length: int) -> bytes:
        """Consecutive registers from the pointer; event registers clear, a fully read message is consumed."""
        with self._lock:
            self._sync_attach()
            start = self.pointer
            registers = [(start + offset) & 0xFF for offset in range(length)]
            answer = bytes(self.registers[r] for r in registers)
            for register in _CLEAR_ON_READ:
                if register in registers:
                    self.registers[register] = 0
            self._note_rx_read(set(registers))
            return answer

    def implausible(self, length: int) -> bytes:
        """A garbled read: all ones."""
        return b"\xff" * length

    # ------------------------------------------------------------------ attach, reset, negotiation

    def _sync_attach(self) -> None:
        offer = None if self.registers[RESET_CTRL] & 1 else self._source()
        if offer is not None and not self._attached:
            self._attached, self._offer = True, tuple(offer)
            self._port_changed(attached=True)
            rdo, mv = self._evaluate()
            # The chip negotiates on its own at attach; the source's acceptance is what the contract needs.
            if self._source_accepts(rdo):
                self._put32(RDO_REG_STATUS, rdo)
                self._vbus_mv = mv
            else:
                self._vbus_mv = 5000  # implicit contract: vSafe5V at Type-C current
        elif offer is None and self._attached:
            self._attached, self._offer = False, ()
            self._port_changed(attached=False)
            self._put32(RDO_REG_STATUS, 0)
            self._vbus_mv, self._pending_rdo = 0, 0
            self._queue, self._current = [], None
        elif offer is not None:
            self._offer = tuple(offer)  # the same source may change its offer; the next negotiation sees it

    def _port_changed(self, *, attached: bool) -> None:
        self.registers[PORT_STATUS_0] |= 1
        self.registers[PORT_STATUS_1] = int(attached)
        self.registers[CC_STATUS] = 0x03 if attached else 0x00
        self.registers[ALERT_STATUS_1] |= PORT_STATUS_AL

    def _soft_reset(self) -> None:
        if not self._attached or not self._offer:
            return  # no PD partner (nothing attached, or a Type-C-only source): nobody acknowledges it
        self._message_id, self._pending_rdo = 0, 0
        self._queue = [_Message(_ACCEPT), _Message(_SOURCE_CAPABILITIES, self._offer)]
        self._current = None
        self._deliver_next()

    def _evaluate(self) -> tuple[int, int]:
        """The RDO the chip sends for the current offer, and the voltage it would bring."""
        count = min(max(self.registers[DPM_PDO_NUMB] & 0x07, 1), 3)
        sinks = [self._get32(DPM_SNK_PDO1 + 4 * slot) for slot in range(count)]
        for sink in reversed(sinks[1:]):
            sink_mv, sink_ma = (sink >> 10 & 0x3FF) * 50, (sink & 0x3FF) * 10
            for position, word in enumerate(self._offer, start=1):
                if word >> 30 == 0 and (word >> 10 & 0x3FF) * 50 == sink_mv and (word & 0x3FF) * 10 >= sink_ma:
                    return _rdo(position, sink_ma, mismatch=False), sink_mv
        sink_ma = (sinks[0] & 0x3FF) * 10
        source_ma = (self._offer[0] & 0x3FF) * 10 if self._offer else 0
        mismatch = count > 1 or sink_ma > source_ma
        return _rdo(1, min(sink_ma, source_ma), mismatch=mismatch), 5000

    def _source_accepts(self, rdo: int) -> bool:
        position, operating_ma = rdo >> 28 & 0x7, (rdo >> 10 & 0x3FF) * 10
        if self.source_rejects or not 1 <= position <= len(self._offer):
            return False
        word = self._offer[position - 1]
        return word >> 30 == 0 and operating_ma <= (word & 0x3FF) * 10

    # ------------------------------------------------------------------ the RX buffer

    def _deliver_next(self) -> None:
        if not self._queue:
            return
        message = self._queue.pop(0)
        self._current, self._header_read = message, False
        header = len(message.objects) << 12 | self._message_id << 9 | 1 << 8 | 2 << 6 | 1 << 5 | message.message_type
        self._message_id = (self._message_id + 1) % 8
        self.registers[RX_HEADER : RX_HEADER + 2] = header.to_bytes(2, "little")
        data = b"".join(word.to_bytes(4, "little") for word in message.objects)
        self.registers[RX_DATA_OBJ : RX_DATA_OBJ + 28] = data.ljust(28, b"\x00")
        self.registers[PRT_STATUS] |= MSG_RECEIVED
        self.registers[ALERT_STATUS_1] |= PRT_STATUS_AL
        if message.message_type == _ACCEPT and not message.objects and self._pending_rdo:
            self._put32(RDO_REG_STATUS, self._pending_rdo)
        elif message.message_type == _PS_RDY and not message.objects and self._pending_rdo:
            self._vbus_mv, self._pending_rdo = self._pending_mv, 0

    def _note_rx_read(self, registers: set[int]) -> None:
        message = self._current
        if message is None:
            return
        if RX_HEADER in registers or RX_HEADER + 1 in registers:
            self._header_read = True
        last = RX_DATA_OBJ + 4 * len(message.objects) - 1
        if not self._header_read or (message.objects and last not in registers):
            return
        self._current = None
        if message.message_type == _SOURCE_CAPABILITIES and message.objects:
            rdo, mv = self._evaluate()
            if self._source_accepts(rdo):
                self._pending_rdo, self._pending_mv = rdo, mv
                self._queue += [_Message(_ACCEPT), _Message(_PS_RDY)]
            else:
                self._queue.append(_Message(_REJECT))
        self._deliver_next()

    # ------------------------------------------------------------------ helpers

    def _get32(self, register: int) -> int:
        return int.from_bytes(self.registers[register : register + 4], "little")

    def _put32(self, register: int, value: int) -> None:
        self.registers[register : register + 4] = value.to_bytes(4, "little")


def _rdo(position: int, ma: int, *, mismatch: bool) -> int:
    steps = ma // 10
    return position << 28 | int(mismatch) << 26 | steps << 10 | steps
