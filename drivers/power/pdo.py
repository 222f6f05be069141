"""USB Power Delivery codec: power data objects (PDOs), request data objects (RDOs) and message headers.

Pure functions over 32-bit (PDO, RDO) and 16-bit (header) words, after the USB PD 3.x specification:

- PDO type in bits 31..30: 0 fixed, 1 battery, 2 variable, 3 augmented (APDO; bits 29..28 = 0 is SPR PPS).
- Fixed: voltage bits 19..10 (50 mV), maximum current bits 9..0 (10 mA), capability flags in bits 29..20.
- Battery: maximum voltage 29..20 and minimum voltage 19..10 (50 mV), maximum power 9..0 (250 mW).
- Variable: maximum voltage 29..20 and minimum voltage 19..10 (50 mV), maximum current 9..0 (10 mA).
- PPS APDO: maximum voltage 24..17 and minimum voltage 15..8 (100 mV), maximum current 6..0 (50 mA).
- Fixed/variable RDO: object position 30..28, capability mismatch 26, operating current 19..10 and maximum
  operating current 9..0 (10 mA). Bit 31 carries EPR object positions in PD 3.1, which no SPR sink sends.
- Message header: type 4..0, data role 5, spec revision 7..6, power role 8, message ID 11..9, data objects
  14..12, extended 15.

Decoders raise ValueError for words no conforming device sends; drivers turn that into ImplausibleReadingError
naming the chip. Encoders raise ValueError for values the fields cannot hold, never round silently.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from drivers.base import Pdo, PdoKind, Rdo

# Message types (USB PD 3.x tables 6-5 and 6-6).
CONTROL_GOODCRC = 0x01
CONTROL_ACCEPT = 0x03
CONTROL_REJECT = 0x04
CONTROL_PS_RDY = 0x06
CONTROL_GET_SOURCE_CAP = 0x07
CONTROL_WAIT = 0x0C
CONTROL_SOFT_RESET = 0x0D
DATA_SOURCE_CAPABILITIES = 0x01
DATA_REQUEST = 0x02
DATA_SINK_CAPABILITIES = 0x04

MAX_DATA_OBJECTS = 7
_KINDS: tuple[PdoKind, ...] = ("fixed", "battery", "variable", "augmented")

Preference = Literal["highest_power", "highest_voltage", "lowest_voltage"]


def _field(raw: int, high: int, low: int) -> int:
    return raw >> low & ((1 << (high - low + 1)) - 1)


def _units(value: int, unit: int, bits: int, what: str) -> int:
    """`value` in multiples of `unit`, checked to fit `bits` bits."""
    if value < 0 or value % unit:
        raise ValueError(f"{what} {value} is not a non-negative multiple of {unit}")
    steps = value // unit
    if steps >= 1 << bits:
        raise ValueError(f"{what} {value} exceeds the field's maximum {((1 << bits) - 1) * unit}")
    return steps


def _word(raw: int) -> int:
    if not 0 <= raw <= 0xFFFF_FFFF:
        raise ValueError(f"0x{raw:x} is not a 32-bit word")
    return raw


# ----------------------------------------------------------------------------- PDOs


def decode_pdo(index: int, raw: int) -> Pdo:
    """One PDO word at 1-based object position `index`; ValueError for APDO kinds other than SPR PPS."""
    raw = _word(raw)
    kind = _KINDS[raw >> 30]
    if kind == "fixed":
        mv = _field(raw, 19, 10) * 50
        return Pdo(index, kind, mv, mv, _field(raw, 9, 0) * 10, None, raw)
    if kind == "battery":
        return Pdo(index, kind, _field(raw, 19, 10) * 50, _field(raw, 29, 20) * 50, None, _field(raw, 9, 0) * 250, raw)
    if kind == "variable":
        return Pdo(index, kind, _field(raw, 19, 10) * 50, _field(raw, 29, 20) * 50, _field(raw, 9, 0) * 10, None, raw)
    apdo = _field(raw, 29, 28)
    if apdo != 0:
        raise ValueError(f"PDO {index} (0x{raw:08x}) is an APDO of type {apdo}, not SPR PPS")
    return Pdo(index, kind, _field(raw, 15, 8) * 100, _field(raw, 24, 17) * 100, _field(raw, 6, 0) * 50, None, raw)


def decode_source_capabilities(words: Sequence[int]) -> tuple[Pdo, ...]:
    """The PDOs of one Source_Capabilities message, checked as the spec requires of a source.

    The first object must be the vSafe5V fixed supply, and there are 1 to 7 objects. APDOs other than PPS
    (the EPR/SPR AVS kinds of PD 3.1/3.2) are left out, keeping every other PDO at its own object position.
    """
    if not 1 <= len(words) <= MAX_DATA_OBJECTS:
        raise ValueError(f"Source_Capabilities carries {len(words)} objects; 1 to {MAX_DATA_OBJECTS} are allowed")
    pdos: list[Pdo] = []
    for position, raw in enumerate(words, start=1):
        if raw >> 30 == 3 and _field(raw, 29, 28) in (1, 2):
            continue  # an AVS APDO: valid, but nothing this codec can request
        pdos.append(decode_pdo(position, raw))
    first = pdos[0] if pdos else None
    if first is None or first.index != 1 or first.kind != "fixed" or first.max_mv != 5000:
        raise ValueError(f"the first PDO (0x{words[0]:08x}) is not the 5 V fixed supply every source must offer")
    return tuple(pdos)


def encode_fixed_pdo(
    mv: int,
    ma: int,
    *,
    dual_role_power: bool = False,
    usb_suspend: bool = False,
    unconstrained_power: bool = False,
    usb_communications: bool = False,
    dual_role_data: bool = False,
    unchunked_extended: bool = False,
    peak_current: int = 0,
) -> int:
    """A fixed-supply PDO (source flags; a sink PDO uses bits 29..26 alike and leaves the rest 0)."""
    if not 0 <= peak_current <= 3:
        raise ValueError(f"peak current code {peak_current} is not 0..3")
    flags = (
        dual_role_power << 29
        | usb_suspend << 28
        | unconstrained_power << 27
        | usb_communications << 26
        | dual_role_data << 25
        | unchunked_extended << 24
        | peak_current << 20
    )
    return flags | _units(mv, 50, 10, "voltage (mV)") << 10 | _units(ma, 10, 10, "current (mA)")


def encode_battery_pdo(min_mv: int, max_mv: int, max_mw: int) -> int:
    """A battery-supply PDO."""
    _check_range(min_mv, max_mv)
    return (
        1 << 30
        | _units(max_mv, 50, 10, "maximum voltage (mV)") << 20
        | _units(min_mv, 50, 10, "minimum voltage (mV)") << 10
        | _units(max_mw, 250, 10, "power (mW)")
    )


def encode_variable_pdo(min_mv: int, max_mv: int, max_ma: int) -> int:
    """A variable-supply PDO."""
    _check_range(min_mv, max_mv)
    return (
        2 << 30
        | _units(max_mv, 50, 10, "maximum voltage (mV)") << 20
        | _units(min_mv, 50, 10, "minimum voltage (mV)") << 10
        | _units(max_ma, 10, 10, "current (mA)")
    )


def encode_pps_apdo(min_mv: int, max_mv: int, max_ma: int, *, power_limited: bool = False) -> int:
    """An SPR programmable power supply APDO."""
    _check_range(min_mv, max_mv)
    return (
        3 << 30
        | power_limited << 27
        | _units(max_mv, 100, 8, "maximum voltage (mV)") << 17
        | _units(min_mv, 100, 8, "minimum voltage (mV)") << 8
        | _units(max_ma, 50, 7, "current (mA)")
    )


def _check_range(min_mv: int, max_mv: int) -> None:
    if min_mv > max_mv:
        raise ValueError(f"minimum voltage {min_mv} mV is above maximum voltage {max_mv} mV")


def describe(pdo: Pdo) -> str:
    """A short human form: 'PDO 2: fixed 9000 mV 3000 mA'."""
    volts = f"{pdo.max_mv} mV" if pdo.min_mv == pdo.max_mv else f"{pdo.min_mv}-{pdo.max_mv} mV"
    amount = f"{pdo.max_mw} mW" if pdo.max_mw is not None else f"{pdo.max_ma} mA"
    return f"PDO {pdo.index}: {pdo.kind} {volts} {amount}"


# ----------------------------------------------------------------------------- choosing


def satisfies(pdo: Pdo, min_mv: int | None = None, max_mv: int | None = None, min_ma: int | None = None) -> bool:
    """Whether `pdo` can supply a sink that accepts min_mv..max_mv and needs min_ma.

    A fixed or variable supply sets the voltage itself, so its whole range must lie inside the window; a PPS
    supply is programmed by the sink, so overlapping the window is enough. A battery supply's current at its
    highest voltage is its power divided by that voltage.
    """
    low = min_mv if min_mv is not None else 0
    high = max_mv if max_mv is not None else 1 << 31
    if pdo.kind == "augmented":
        if pdo.max_mv < low or pdo.min_mv > high:
            return False
    elif pdo.min_mv < low or pdo.max_mv > high:
        return False
    if min_ma is None:
        return True
    if pdo.max_mw is not None:
        return pdo.max_mv > 0 and pdo.max_mw * 1000 // pdo.max_mv >= min_ma
    return (pdo.max_ma or 0) >= min_ma


def choose_pdo(
    pdos: Iterable[Pdo],
    min_mv: int | None = None,
    max_mv: int | None = None,
    min_ma: int | None = None,
    prefer: Preference = "highest_power",
    *,
    kinds: Collection[str] | None = None,
) -> Pdo | None:
    """The offered object that satisfies the window, by preference; ties go to the lower voltage, then position.

    A PPS range counts by the part of it inside the window (it can be programmed anywhere in its range).
    `kinds` limits the choice, e.g. ("fixed",) for the STUSB4500 and TPS25750 drivers, which request fixed
    supplies only.
    """
    candidates = [p for p in pdos if (kinds is None or p.kind in kinds) and satisfies(p, min_mv, max_mv, min_ma)]
    if not candidates:
        return None

    def low(p: Pdo) -> int:
        return max(p.min_mv, min_mv or 0) if p.kind == "augmented" else p.min_mv

    def high(p: Pdo) -> int:
        return min(p.max_mv, max_mv) if p.kind == "augmented" and max_mv is not None else p.max_mv

    if prefer == "highest_power":
        return min(candidates, key=lambda p: (-p.power_mw, high(p), p.index))
    if prefer == "highest_voltage":
        return min(candidates, key=lambda p: (-high(p), -p.power_mw, p.index))
    if prefer == "lowest_voltage":
        return min(candidates, key=lambda p: (low(p), -p.power_mw, p.index))
    raise ValueError(f"unknown preference {prefer!r}; use highest_power, highest_voltage or lowest_voltage")


def fixed_request(pdos: Sequence[Pdo], pdo_index: int, operating_ma: int | None) -> tuple[Pdo, int]:
    """The offered fixed PDO at `pdo_index` and the current to ask of it (rounded down to 10 mA).

    ValueError, with what is on offer, when the index is not offered, the PDO is not a fixed supply (the sink
    controllers here request fixed supplies only), or the current is not within 10 mA..its maximum.
    """
    pdo = next((p for p in pdos if p.index == pdo_index), None)
    if pdo is None:
        offered = "; ".join(describe(p) for p in pdos) or "nothing"
        raise ValueError(f"the source does not offer PDO {pdo_index} (it offers {offered})")
    if pdo.kind != "fixed":
        raise ValueError(f"{describe(pdo)} is not a fixed supply; only fixed supplies can be requested")
    limit = pdo.max_ma or 0
    current = limit if operating_ma is None else operating_ma // 10 * 10
    if not 10 <= current <= limit:
        raise ValueError(f"{operating_ma} mA cannot be requested from {describe(pdo)}: use 10..{limit} mA")
    return pdo, current


# ----------------------------------------------------------------------------- RDOs


def decode_rdo(raw: int) -> Rdo:
    """A fixed/variable-supply RDO; position 0 means no contract. ValueError when bit 31 (EPR) is set."""
    raw = _word(raw)
    if raw >> 31:
        raise ValueError(f"RDO 0x{raw:08x} sets bit 31 (an EPR object position), which no SPR sink sends")
    return Rdo(
        object_position=_field(raw, 30, 28),
        operating_ma=_field(raw, 19, 10) * 10,
        max_ma=_field(raw, 9, 0) * 10,
        capability_mismatch=bool(raw >> 26 & 1),
        raw=raw,
    )


def encode_rdo(
    object_position: int,
    operating_ma: int,
    max_ma: int,
    *,
    capability_mismatch: bool = False,
    give_back: bool = False,
    usb_communications: bool = False,
    no_usb_suspend: bool = False,
    unchunked_extended: bool = False,
) -> int:
    """A fixed/variable-supply RDO."""
    if not 1 <= object_position <= MAX_DATA_OBJECTS:
        raise ValueError(f"object position {object_position} is not 1..{MAX_DATA_OBJECTS}")
    return (
        object_position << 28
        | give_back << 27
        | capability_mismatch << 26
        | usb_communications << 25
        | no_usb_suspend << 24
        | unchunked_extended << 23
        | _units(operating_ma, 10, 10, "operating current (mA)") << 10
        | _units(max_ma, 10, 10, "maximum current (mA)")
    )


# ----------------------------------------------------------------------------- message headers


@dataclass(frozen=True)
class PdHeader:
    """A USB PD message header."""

    message_type: int
    data_objects: int = 0
    message_id: int = 0
    source: bool = True  # port power role of the sender
    dfp: bool = True  # port data role of the sender
    spec_revision: int = 2  # 0 = 1.0, 1 = 2.0, 2 = 3.x
    extended: bool = False

    @property
    def is_control(self) -> bool:
        """Control messages carry no data objects."""
        return self.data_objects == 0 and not self.extended


def decode_header(raw: int) -> PdHeader:
    """A 16-bit header; ValueError for the reserved spec revision 11b."""
    if not 0 <= raw <= 0xFFFF:
        raise ValueError(f"0x{raw:x} is not a 16-bit header")
    revision = _field(raw, 7, 6)
    if revision == 3:
        raise ValueError(f"header 0x{raw:04x} has the reserved specification revision 11b")
    return PdHeader(
        message_type=_field(raw, 4, 0),
        data_objects=_field(raw, 14, 12),
        message_id=_field(raw, 11, 9),
        source=bool(raw >> 8 & 1),
        dfp=bool(raw >> 5 & 1),
        spec_revision=revision,
        extended=bool(raw >> 15),
    )


def encode_header(header: PdHeader) -> int:
    """The 16-bit form of `header`."""
    if not 0 <= header.message_type <= 0x1F or not 0 <= header.data_objects <= MAX_DATA_OBJECTS:
        raise ValueError(f"{header} does not fit a header")
    if not 0 <= header.message_id <= 7 or not 0 <= header.spec_revision <= 2:
        raise ValueError(f"{header} has a message ID or revision out of range")
    return (
        header.extended << 15
        | header.data_objects << 12
        | header.message_id << 9
        | header.source << 8
        | header.spec_revision << 6
        | header.dfp << 5
        | header.message_type
    )
