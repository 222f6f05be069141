"""TI TPS25750 USB-PD controller over I2C (host interface, TRM SLVUC05): offers, request, contract.

Every register read is a block read whose first byte is the register's length; writes carry a byte count.
Offers come from the 'GSrC' task (Get Source Capabilities), which leaves them in RX_SOURCE_CAPS. The TPS25750
has no host command that requests a given PDO ('ANeg' exists only on the TPS25751/TPS26750), so a request
rewrites TX_SINK_CAPS to the 5 V PDO plus the wanted fixed PDO and issues 'GSrC': the source re-sends its offer
and the chip, bound to answer it with a Request, requests from the new sink capabilities. This is the method
TI's own example uses on the TPS25730; which PDO the TPS25750 then picks also depends on its Application
Configuration, so the contract is always confirmed from ACTIVE_CONTRACT_RDO/PDO, never assumed.

Bus errors are reported as the transport raises them and not retried here (the caller owns retry policy).
A block whose byte count no register has, or a PDO/RDO no device sends, is an ImplausibleReadingError.
"""

from __future__ import annotations

import asyncio

from drivers.base import (
    Contract,
    DeviceMismatchError,
    DriverStateError,
    ImplausibleReadingError,
    NegotiationError,
    Pdo,
    Rdo,
)
from drivers.i2c.transport import I2cBus
from drivers.power.pd_sink import I2cPdSink
from drivers.power.pdo import (
    decode_pdo,
    decode_rdo,
    decode_source_capabilities,
    describe,
    encode_fixed_pdo,
    fixed_request,
)

MODE = 0x03
CMD1 = 0x08
DATA1 = 0x09
STATUS = 0x1A
RX_SOURCE_CAPS = 0x30
TX_SINK_CAPS = 0x33
ACTIVE_CONTRACT_PDO = 0x34
ACTIVE_CONTRACT_RDO = 0x35

CAPS_LENGTH = 29  # header byte + seven 32-bit PDOs (RX_SOURCE_CAPS and TX_SINK_CAPS alike)
MAX_BLOCK = 64  # the longest register of the host interface (DATA1)
PLUG_PRESENT = 1 << 0
MODES = {"APP ": "application", "BOOT": "boot", "PTCH": "patch"}
TASK_RESULTS = {1: "timed out or aborted", 3: "rejected", 4: "rejected: RX buffer locked"}


# ----------------------------------------------------------------------------- host interface codec


def encode_block_write(register: int, payload: bytes) -> bytes:
    """One write message: register, byte count, data."""
    if len(payload) > MAX_BLOCK:
        raise ValueError(f"{len(payload)} bytes do not fit a host-interface register (at most {MAX_BLOCK})")
    return bytes([register, len(payload)]) + payload


def encode_command(command: str) -> bytes:
    """The CMD1 write for a 4-character command."""
    raw = command.encode("ascii")
    if len(raw) != 4:
        raise ValueError(f"4CC command {command!r} is not four ASCII characters")
    return encode_block_write(CMD1, raw)


def decode_block(register: int, data: bytes, length: int) -> bytes:
    """The first `length` content bytes of a block read; ValueError when the byte count cannot be right."""
    if not data:
        raise ValueError(f"register 0x{register:02x} returned nothing")
    count = data[0]
    if count > MAX_BLOCK:
        raise ValueError(f"register 0x{register:02x} reports {count} bytes; no register is longer than {MAX_BLOCK}")
    if count < length:
        raise ValueError(f"register 0x{register:02x} reports {count} bytes; expected at least {length}")
    return data[1 : 1 + length]


def decode_pdo_list(data: bytes) -> tuple[int, ...]:
    """RX_SOURCE_CAPS/TX_SINK_CAPS contents: bits 2..0 of byte 0 count the valid PDOs that follow."""
    count = data[0] & 0x07
    return tuple(int.from_bytes(data[1 + 4 * i : 5 + 4 * i], "little") for i in range(count))


def encode_sink_caps(pdos: tuple[int, ...]) -> bytes:
    """TX_SINK_CAPS contents for `pdos` (1 to 7), unused slots zero."""
    if not 1 <= len(pdos) <= 7:
        raise ValueError(f"TX_SINK_CAPS holds 1 to 7 PDOs, not {len(pdos)}")
    data = bytes([len(pdos)]) + b"".join(word.to_bytes(4, "little") for word in pdos)
    return data.ljust(CAPS_LENGTH, b"\x00")


# ----------------------------------------------------------------------------- the driver


class Tps25750(I2cPdSink):
    """A TPS25750 (application firmware loaded) at `address` on `bus`, used as a sink (PdController).

    It raises the port by offering more than 5 V in TX_SINK_CAPS.
    """

    _kind = "tps25750"

    def __init__(
        self, bus: I2cBus, address: int = 0x21, *, settle_timeout: float = 1.0, poll_interval: float = 0.005
    ) -> None:
        super().__init__(bus, address, settle_timeout=settle_timeout, poll_interval=poll_interval)
        self._commanding = asyncio.Lock()  # one 4CC task (and the registers it sets) at a time

    async def _identify(self) -> None:
        """Check MODE reads "APP " (DeviceMismatchError if this is not a TPS25750)."""
        data = await self._bus.read(self._address, bytes([MODE]), 5)
        try:
            mode = decode_block(MODE, data, 4).decode("ascii")
        except (ValueError, UnicodeDecodeError):
            raise DeviceMismatchError(
                f"{self.name}: MODE (0x03) reads {data.hex(' ')}, not a TPS25750 mode "
                "(APP , BOOT, PTCH); is another chip at this address?"
            ) from None
        if mode not in MODES:
            raise DeviceMismatchError(f"{self.name}: MODE (0x03) reads {mode!r}, not a TPS25750 mode")
        if mode != "APP ":
            raise DriverStateError(
                f"{self.name}: the chip is in {MODES[mode]} mode ({mode!r}), not running its "
                "application firmware; it needs its patch bundle (EEPROM or PBMs/PBMc)"
            )

    async def _read_attached(self) -> bool:
        """STATUS PlugPresent."""
        return bool((await self._read(STATUS, 5))[0] & PLUG_PRESENT)

    async def source_caps(self) -> tuple[Pdo, ...]:
        """Ask the source for its offer ('GSrC') and return RX_SOURCE_CAPS."""
        async with self._commanding:
            return await self._source_caps()

    async def _source_caps(self) -> tuple[Pdo, ...]:
        await self._require_attached("read source capabilities")
        await self._command("GSrC")
        self._caps = await self._read_caps()
        return self._caps

    async def request(self, pdo_index: int, operating_ma: int | None = None) -> Contract:
        """Request the fixed PDO at `pdo_index` (its full current unless `operating_ma`) and confirm the contract."""
        async with self._commanding:
            return await self._request(pdo_index, operating_ma)

    async def _request(self, pdo_index: int, operating_ma: int | None) -> Contract:
        caps = self._caps or await self._source_caps()
        try:
            pdo, current_ma = fixed_request(caps, pdo_index, operating_ma)
        except ValueError as exc:
            raise NegotiationError(f"{self.name}: {exc}") from None
        await self._require_attached(f"request {describe(pdo)}")
        await self._write_sink_caps((await self._default_sink_pdo(), encode_fixed_pdo(pdo.max_mv, current_ma)))
        self._raised = True
        await self._command("GSrC")
        self._caps = await self._read_caps()
        contract = await self._read_contract()
        selected = contract.selected
        if (
            contract.rdo is None
            or contract.rdo.object_position != pdo_index
            or contract.rdo.capability_mismatch
            or selected is None
            or selected.max_mv != pdo.max_mv
        ):
            raise NegotiationError(
                f"{self.name}: asked for {describe(pdo)} at {current_ma} mA, but the contract is "
                f"{_contract_text(contract)}"
            )
        return contract

    async def contract(self) -> Contract:
        """The contract as the chip reports it now (ACTIVE_CONTRACT_RDO/PDO; offers as last read)."""
        if not await self.attached():
            return Contract("detached")
        return await self._read_contract()

    async def reset_to_default(self) -> Contract:
        """TX_SINK_CAPS back to the 5 V PDO alone, and renegotiate; with nothing attached the next attach uses it."""
        async with self._commanding:
            return await self._reset_to_default()

    async def _reset_to_default(self) -> Contract:
        self._require_open()
        await self._write_sink_caps((await self._default_sink_pdo(),))
        if not await self.attached():
            self._raised = False
            return Contract("detached")
        await self._command("GSrC")
        self._caps = await self._read_caps()
        contract = await self._read_contract()
        if contract.rdo is None or contract.rdo.object_position != 1:
            raise NegotiationError(
                f"{self.name}: asked for the 5 V default contract, but the contract is {_contract_text(contract)}"
            )
        self._raised = False
        return contract

    # ------------------------------------------------------------------ tasks and registers

    async def _command(self, command: str) -> None:
        """Run a 4CC task to completion; NegotiationError when it fails or outlasts settle_timeout."""
        await self._bus.write(self._address, encode_command(command))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settle_timeout
        while True:
            state = await self._read(CMD1, 4)
            if state == b"!CMD":
                raise DeviceMismatchError(
                    f"{self.name}: the chip does not know 4CC {command!r} (CMD1 reads '!CMD'); "
                    "is this a TPS25750 running its application firmware?"
                )
            if state == bytes(4):
                break
            if loop.time() >= deadline:
                raise NegotiationError(
                    f"{self.name}: 4CC {command!r} still running after {self._settle_timeout:.2f} s "
                    f"(CMD1 reads {state!r})"
                )
            await asyncio.sleep(self._poll_interval)
        result = (await self._read(DATA1, 1))[0]
        if result != 0:
            meaning = TASK_RESULTS.get(result, "unknown result")
            raise NegotiationError(f"{self.name}: 4CC {command!r} failed: task result {result} ({meaning})")

    async def _read_caps(self) -> tuple[Pdo, ...]:
        words = decode_pdo_list(await self._read(RX_SOURCE_CAPS, CAPS_LENGTH))
        if not words:
            raise NegotiationError(
                f"{self.name}: the source sent no Source_Capabilities (RX_SOURCE_CAPS is empty); "
                "is it a Type-C source without USB PD?"
            )
        try:
            return decode_source_capabilities(words)
        except ValueError as exc:
            text = " ".join(f"0x{w:08x}" for w in words)
            raise ImplausibleReadingError(f"{self.name}: RX_SOURCE_CAPS [{text}] cannot be right: {exc}") from None

    async def _read_contract(self) -> Contract:
        raw = int.from_bytes(await self._read(ACTIVE_CONTRACT_RDO, 4), "little")
        try:
            rdo: Rdo = decode_rdo(raw)
        except ValueError as exc:
            raise ImplausibleReadingError(f"{self.name}: ACTIVE_CONTRACT_RDO: {exc}") from None
        if rdo.object_position == 0:
            return Contract("typec_only", self._caps)
        word = int.from_bytes(await self._read(ACTIVE_CONTRACT_PDO, 6), "little") & 0xFFFF_FFFF
        try:
            selected = decode_pdo(rdo.object_position, word)
        except ValueError as exc:
            raise ImplausibleReadingError(f"{self.name}: ACTIVE_CONTRACT_PDO: {exc}") from None
        return Contract("explicit", self._caps, selected, rdo)

    async def _default_sink_pdo(self) -> int:
        """The 5 V sink PDO the Application Configuration put first in TX_SINK_CAPS (flags kept)."""
        sinks = decode_pdo_list(await self._read(TX_SINK_CAPS, CAPS_LENGTH))
        if sinks and sinks[0] >> 30 == 0 and (sinks[0] >> 10 & 0x3FF) * 50 == 5000:
            return sinks[0]
        # No usable default: ask 5 V at what the source offers there (at most 3 A, the Type-C maximum).
        limit = min(self._caps[0].max_ma or 900, 3000) if self._caps else 900
        return encode_fixed_pdo(5000, limit)

    async def _write_sink_caps(self, pdos: tuple[int, ...]) -> None:
        await self._bus.write(self._address, encode_block_write(TX_SINK_CAPS, encode_sink_caps(pdos)))

    # ------------------------------------------------------------------ plumbing

    async def _read(self, register: int, length: int) -> bytes:
        data = await self._bus.read(self._address, bytes([register]), length + 1)
        try:
            return decode_block(register, data, length)
        except ValueError as exc:
            raise ImplausibleReadingError(f"{self.name}: {exc}") from None


def _contract_text(contract: Contract) -> str:
    rdo = contract.rdo
    if rdo is None:
        return f"{contract.state} (no RDO)"
    pdo = describe(contract.selected) if contract.selected is not None else "unknown PDO"
    return (
        f"RDO 0x{rdo.raw:08x} ({pdo}; object position {rdo.object_position}, operating {rdo.operating_ma} mA, "
        f"max {rdo.max_ma} mA, capability mismatch {'set' if rdo.capability_mismatch else 'clear'})"
    )
