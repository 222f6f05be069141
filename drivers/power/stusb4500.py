"""ST STUSB4500 USB-PD sink controller over I2C: read the source's offers, request one, confirm the contract.

The sequence follows ST's sample code as research/hardware.md section 2 records it: unmask the protocol
alert, send a PD soft reset (TX_HEADER=0x0D then PD_COMMAND_CTRL=0x26; both registers are absent from the
datasheet), and read the messages the source sends back out of RX_HEADER/RX_DATA_OBJ. To request a PDO the
driver copies it, as a fixed sink PDO with the wanted current, into DPM_SNK_PDO2, makes two sink PDOs active
(PDO1 stays the 5 V default the chip falls back to) and soft-resets again; the chip then requests the
highest-numbered sink PDO the source meets. The contract is confirmed from RDO_REG_STATUS, never assumed.
The offer read last is kept until a detach is seen; request() uses it and checks the offer the source sends
during the exchange against what it asked for.

Bus errors (NotAcknowledgedError, BusTimeoutError, BusError) are reported as the transport raises them and not
retried here: several registers clear when read, so repeating a read could lose an event, and the caller owns
the retry policy. A message sequence that does not finish within `settle_timeout` is a NegotiationError.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from drivers.base import (
    Contract,
    DeviceMismatchError,
    ImplausibleReadingError,
    NegotiationError,
    NotAttachedError,
    Pdo,
    Rdo,
)
from drivers.i2c.transport import I2cBus
from drivers.power.pd_sink import I2cPdSink
from drivers.power.pdo import (
    CONTROL_ACCEPT,
    CONTROL_PS_RDY,
    CONTROL_REJECT,
    CONTROL_WAIT,
    DATA_SOURCE_CAPABILITIES,
    PdHeader,
    decode_header,
    decode_rdo,
    decode_source_capabilities,
    describe,
    encode_fixed_pdo,
    fixed_request,
)

ALERT_STATUS_1 = 0x0B
ALERT_STATUS_MASK = 0x0C
PORT_STATUS_1 = 0x0E
PRT_STATUS = 0x16
PD_COMMAND_CTRL = 0x1A
DEVICE_ID = 0x2F
RX_HEADER = 0x31
RX_DATA_OBJ = 0x33
TX_HEADER = 0x51
DPM_PDO_NUMB = 0x70
DPM_SNK_PDO2 = 0x89
RDO_REG_STATUS = 0x91

DEVICE_IDS = (0x25, 0x21)  # production silicon, early silicon
PRT_STATUS_AL = 1 << 1
MSG_RECEIVED = 1 << 2
ATTACH = 1 << 0
SOFT_RESET_HEADER = 0x0D  # control message type Soft_Reset
SEND_COMMAND = 0x26
# ALERT_STATUS_1 .. PRT_STATUS: one read of this block sees (and clears) every event, as ST's sample reads it.
ALERT_BLOCK_LENGTH = PRT_STATUS - ALERT_STATUS_1 + 1


# ----------------------------------------------------------------------------- register codec


@dataclass(frozen=True)
class AlertBlock:
    """The 12 registers from ALERT_STATUS_1, decoded."""

    alert: int
    mask: int
    attached: bool
    message_received: bool


def decode_alert_block(data: bytes) -> AlertBlock:
    """ALERT_STATUS_1 (0x0B) .. PRT_STATUS (0x16) as one read returns them."""
    if len(data) != ALERT_BLOCK_LENGTH:
        raise ValueError(f"expected {ALERT_BLOCK_LENGTH} bytes from ALERT_STATUS_1, got {len(data)}")
    alert, mask = data[0], data[1]
    attached = bool(data[PORT_STATUS_1 - ALERT_STATUS_1] & ATTACH)
    received = bool(data[PRT_STATUS - ALERT_STATUS_1] & MSG_RECEIVED) or bool(alert & PRT_STATUS_AL)
    return AlertBlock(alert, mask, attached, received)


def decode_u16(data: bytes) -> int:
    """A little-endian 16-bit register pair (RX_HEADER)."""
    return int.from_bytes(data[:2], "little")


def decode_u32(data: bytes) -> int:
    """A little-endian 32-bit register quad (RX_DATA_OBJx, DPM_SNK_PDOx, RDO_REG_STATUS)."""
    return int.from_bytes(data[:4], "little")


def encode_u32(value: int) -> bytes:
    """The four register bytes of a 32-bit value, least significant first."""
    return value.to_bytes(4, "little")


def decode_objects(data: bytes, count: int) -> tuple[int, ...]:
    """`count` little-endian 32-bit data objects from RX_DATA_OBJ1 on."""
    return tuple(decode_u32(data[4 * i : 4 * i + 4]) for i in range(count))


# ----------------------------------------------------------------------------- the driver


class Stusb4500(I2cPdSink):
    """A STUSB4500 sink controller at `address` on `bus` (PdController); it raises the port by DPM_PDO_NUMB > 1."""

    _kind = "stusb4500"

    def __init__(
        self, bus: I2cBus, address: int = 0x28, *, settle_timeout: float = 1.0, poll_interval: float = 0.005
    ) -> None:
        super().__init__(bus, address, settle_timeout=settle_timeout, poll_interval=poll_interval)
        # One soft-reset exchange at a time: a second would reset the first and read its messages.
        self._exchanging = asyncio.Lock()

    async def _identify(self) -> None:
        """Check DEVICE_ID (DeviceMismatchError if it is not a STUSB4500)."""
        device_id = (await self._read(DEVICE_ID, 1))[0]
        if device_id not in DEVICE_IDS:
            raise DeviceMismatchError(
                f"{self.name}: DEVICE_ID (0x2F) reads 0x{device_id:02x}, expected 0x25 or 0x21; "
                "is another chip at this address?"
            )

    async def _read_attached(self) -> bool:
        """PORT_STATUS_1 ATTACH."""
        return bool((await self._read(PORT_STATUS_1, 1))[0] & ATTACH)

    async def source_caps(self) -> tuple[Pdo, ...]:
        """Soft-reset the PD link and return the Source_Capabilities the source sends again.

        The chip answers the offer with a request of its own; that exchange is followed to its end, so the
        contract is settled when this returns.
        """
        async with self._exchanging:
            await self._require_attached("read source capabilities")
            await self._exchange(None)
            return self._caps

    async def request(self, pdo_index: int, operating_ma: int | None = None) -> Contract:
        """Request the fixed PDO at `pdo_index` (its full current unless `operating_ma`) and confirm the contract."""
        async with self._exchanging:
            return await self._request(pdo_index, operating_ma)

    async def _request(self, pdo_index: int, operating_ma: int | None) -> Contract:
        if not self._caps:
            await self._require_attached("read source capabilities")
            await self._exchange(None)
        caps = self._caps
        try:
            pdo, current_ma = fixed_request(caps, pdo_index, operating_ma)
        except ValueError as exc:
            raise NegotiationError(f"{self.name}: {exc}") from None
        await self._require_attached(f"request {describe(pdo)}")
        await self._write(DPM_SNK_PDO2, encode_u32(encode_fixed_pdo(pdo.max_mv, current_ma)))
        await self._write(DPM_PDO_NUMB, bytes([2]))
        self._raised = True
        what = f"{describe(pdo)} at {current_ma} mA"
        rdo = await self._renegotiate(what)
        selected = next((p for p in self._caps if p.index == rdo.object_position), None)
        if (
            rdo.object_position != pdo_index
            or rdo.capability_mismatch
            or selected is None
            or selected.max_mv != pdo.max_mv
        ):
            raise NegotiationError(f"{self.name}: asked for {what}, but the contract is {_rdo_text(rdo)}")
        return Contract("explicit", self._caps, selected, rdo)

    async def contract(self) -> Contract:
        """The contract as the chip reports it now (RDO_REG_STATUS; offers as last read)."""
        if not await self.attached():
            return Contract("detached")
        rdo = await self._read_rdo()
        if rdo.object_position == 0:
            return Contract("typec_only", self._caps)
        selected = next((p for p in self._caps if p.index == rdo.object_position), None)
        return Contract("explicit", self._caps, selected, rdo)

    async def reset_to_default(self) -> Contract:
        """Only sink PDO1 (5 V) active, and renegotiate; with nothing attached the next attach starts at 5 V."""
        async with self._exchanging:
            return await self._reset_to_default()

    async def _reset_to_default(self) -> Contract:
        self._require_open()
        await self._write(DPM_PDO_NUMB, bytes([1]))
        if not await self.attached():
            self._raised = False
            return Contract("detached")
        rdo = await self._renegotiate("the 5 V default contract")
        if rdo.object_position != 1:
            raise NegotiationError(
                f"{self.name}: asked for the 5 V default contract, but the contract is {_rdo_text(rdo)}"
            )
        self._raised = False
        return Contract("explicit", self._caps, self._caps[0], rdo)

    # ------------------------------------------------------------------ the message exchange

    async def _soft_reset(self) -> None:
        await self._write(ALERT_STATUS_MASK, bytes([0xFF & ~PRT_STATUS_AL]))
        # Clear what is latched, so only messages of this exchange are seen.
        await self._read(ALERT_STATUS_1, ALERT_BLOCK_LENGTH)
        await self._write(TX_HEADER, bytes([SOFT_RESET_HEADER]))
        await self._write(PD_COMMAND_CTRL, bytes([SEND_COMMAND]))

    async def _renegotiate(self, what: str) -> Rdo:
        """Soft reset and the exchange it starts; returns the RDO now in force."""
        await self._exchange(what)
        return await self._read_rdo()

    async def _exchange(self, what: str | None) -> None:
        """Soft reset, then Source_Capabilities, Accept (or Reject), PS_RDY.

        With `what` None the caller only wants the offer: the source refusing the chip's own request is then
        not an error (the previous contract stays, and the offer is still what was asked for).
        """
        await self._soft_reset()
        deadline = self._deadline()
        self._caps = await self._wait_for_caps(deadline)
        accepted = False
        while True:
            header, objects = await self._next_message(deadline, "PS_RDY" if accepted else "Accept")
            if header.message_type == DATA_SOURCE_CAPABILITIES and objects:
                # The source sent its offer again (it did not see our request): the exchange starts over.
                self._caps, accepted = self._decode_caps(objects), False
            elif header.is_control and header.message_type == CONTROL_ACCEPT:
                accepted = True
            elif header.is_control and header.message_type in (CONTROL_REJECT, CONTROL_WAIT):
                if what is None:
                    return
                verb = "rejected" if header.message_type == CONTROL_REJECT else "answered Wait to"
                raise NegotiationError(
                    f"{self.name}: the source {verb} the request for {what}; the previous contract stays"
                )
            elif header.is_control and header.message_type == CONTROL_PS_RDY and accepted:
                return

    async def _wait_for_caps(self, deadline: float) -> tuple[Pdo, ...]:
        while True:
            header, objects = await self._next_message(deadline, "Source_Capabilities")
            # Anything before the offer (the Accept answering our Soft_Reset) is not ours to act on.
            if header.message_type == DATA_SOURCE_CAPABILITIES and objects:
                return self._decode_caps(objects)

    async def _next_message(self, deadline: float, expected: str) -> tuple[PdHeader, tuple[int, ...]]:
        """Poll the alert block until a message arrives; read its header and objects."""
        loop = asyncio.get_running_loop()
        while True:
            # Checked before every poll, not only when idle: a source that keeps sending must not hold us forever.
            if loop.time() >= deadline:
                raise NegotiationError(
                    f"{self.name}: no {expected} from the source within {self._settle_timeout:.2f} s"
                )
            block = decode_alert_block(await self._read(ALERT_STATUS_1, ALERT_BLOCK_LENGTH))
            if not block.attached:
                self._caps = ()
                raise NotAttachedError(f"{self.name}: the source detached while waiting for {expected}")
            if block.message_received:
                raw = decode_u16(await self._read(RX_HEADER, 2))
                try:
                    header = decode_header(raw)
                except ValueError as exc:
                    raise ImplausibleReadingError(f"{self.name}: RX_HEADER reads 0x{raw:04x}: {exc}") from None
                objects: tuple[int, ...] = ()
                if header.data_objects:
                    count = header.data_objects
                    objects = decode_objects(await self._read(RX_DATA_OBJ, 4 * count), count)
                return header, objects
            await asyncio.sleep(self._poll_interval)

    def _decode_caps(self, objects: tuple[int, ...]) -> tuple[Pdo, ...]:
        try:
            return decode_source_capabilities(objects)
        except ValueError as exc:
            words = " ".join(f"0x{w:08x}" for w in objects)
            raise ImplausibleReadingError(
                f"{self.name}: Source_Capabilities [{words}] cannot be right: {exc}"
            ) from None

    async def _read_rdo(self) -> Rdo:
        raw = decode_u32(await self._read(RDO_REG_STATUS, 4))
        try:
            return decode_rdo(raw)
        except ValueError as exc:
            raise ImplausibleReadingError(f"{self.name}: RDO_REG_STATUS: {exc}") from None

    # ------------------------------------------------------------------ plumbing

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self._settle_timeout

    async def _read(self, register: int, length: int) -> bytes:
        return await self._bus.read(self._address, bytes([register]), length)

    async def _write(self, register: int, payload: bytes) -> None:
        await self._bus.write(self._address, bytes([register]) + payload)


def _rdo_text(rdo: Rdo) -> str:
    """RDO fields for error messages."""
    return (
        f"RDO 0x{rdo.raw:08x} (object position {rdo.object_position}, operating {rdo.operating_ma} mA, "
        f"max {rdo.max_ma} mA, capability mismatch {'set' if rdo.capability_mismatch else 'clear'})"
    )
