"""USB PD codec: PDO/RDO/header words against hand-computed bit patterns of real chargers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from drivers.base import Pdo
from drivers.power.pdo import (
    PdHeader,
    choose_pdo,
    decode_header,
    decode_pdo,
    decode_rdo,
    decode_source_capabilities,
    describe,
    encode_battery_pdo,
    encode_fixed_pdo,
    encode_header,
    encode_pps_apdo,
    encode_rdo,
    encode_variable_pdo,
    fixed_request,
)

# A USB-C laptop charger: 5 V/3 A, 9 V/3 A, 15 V/3 A, 20 V/2.25 A (fixed supplies, no flags).
LAPTOP_WORDS = (0x0001912C, 0x0002D12C, 0x0004B12C, 0x000640E1)
# A phone charger's PPS APDO: 3.3-11 V at 5 A.
PPS_WORD = 0xC0DC2164


@pytest.mark.parametrize(
    ("raw", "mv", "ma"),
    [
        (0x0001912C, 5000, 3000),
        (0x0002D12C, 9000, 3000),
        (0x0004B12C, 15000, 3000),
        (0x000640E1, 20000, 2250),
        (0x0C01912C, 5000, 3000),  # unconstrained power + USB communications capable flags
        (0x00019096, 5000, 1500),
    ],
)
def test_fixed_pdo_round_trips(raw: int, mv: int, ma: int) -> None:
    pdo = decode_pdo(2, raw)
    assert pdo == Pdo(2, "fixed", mv, mv, ma, None, raw)
    flags = raw >> 20 & 0x3FF
    encoded = encode_fixed_pdo(mv, ma, unconstrained_power=bool(flags & 0x80), usb_communications=bool(flags & 0x40))
    assert encoded == raw


@pytest.mark.parametrize(
    ("flags", "raw"),
    [
        ({"dual_role_power": True}, 0x2001912C),
        ({"usb_suspend": True}, 0x1001912C),
        ({"unconstrained_power": True}, 0x0801912C),
        ({"usb_communications": True}, 0x0401912C),
        ({"dual_role_data": True}, 0x0201912C),
        ({"unchunked_extended": True}, 0x0101912C),
        ({"peak_current": 3}, 0x0031912C),
    ],
)
def test_fixed_pdo_flag_bits(flags: dict[str, Any], raw: int) -> None:
    assert encode_fixed_pdo(5000, 3000, **flags) == raw
    assert decode_pdo(1, raw).max_mv == 5000


def test_pps_apdo_3v3_to_11v_5a() -> None:
    assert encode_pps_apdo(3300, 11000, 5000) == PPS_WORD
    assert encode_pps_apdo(3300, 11000, 5000, power_limited=True) == PPS_WORD | 1 << 27
    assert decode_pdo(5, PPS_WORD) == Pdo(5, "augmented", 3300, 11000, 5000, None, PPS_WORD)


def test_battery_and_variable_pdos() -> None:
    assert encode_battery_pdo(5000, 20000, 60000) == 0x590190F0
    assert decode_pdo(3, 0x590190F0) == Pdo(3, "battery", 5000, 20000, None, 60000, 0x590190F0)
    assert encode_variable_pdo(5000, 12000, 2000) == 0x8F0190C8
    assert decode_pdo(4, 0x8F0190C8) == Pdo(4, "variable", 5000, 12000, 2000, None, 0x8F0190C8)
    assert decode_pdo(3, 0x590190F0).power_mw == 60000
    assert decode_pdo(2, 0x0002D12C).power_mw == 27000


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: encode_fixed_pdo(5025, 3000), "multiple of 50"),
        (lambda: encode_fixed_pdo(5000, 10240), "exceeds"),
        (lambda: encode_fixed_pdo(5000, -10), "non-negative"),
        (lambda: encode_variable_pdo(12000, 5000, 1000), "above maximum"),
        (lambda: encode_pps_apdo(3300, 11000, 6400), "exceeds"),
        (lambda: encode_rdo(0, 1000, 1000), "object position"),
        (lambda: decode_pdo(1, 1 << 32), "32-bit"),
    ],
)
def test_encoders_refuse_what_the_fields_cannot_hold(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_apdos_other_than_pps_are_refused_alone_and_skipped_in_an_offer() -> None:
    spr_avs = 0xE0000000 | 150 << 17 | 90 << 8 | 45  # APDO type 2 in bits 29..28
    with pytest.raises(ValueError, match="not SPR PPS"):
        decode_pdo(3, spr_avs)
    pdos = decode_source_capabilities([LAPTOP_WORDS[0], LAPTOP_WORDS[1], spr_avs, PPS_WORD])
    assert [(p.index, p.kind) for p in pdos] == [(1, "fixed"), (2, "fixed"), (4, "augmented")]


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ([], "0 objects"),
        ([LAPTOP_WORDS[0]] * 8, "8 objects"),
        ([LAPTOP_WORDS[1], LAPTOP_WORDS[0]], "5 V fixed supply"),
        ([0xFFFFFFFF], "APDO of type 3"),
    ],
)
def test_source_capabilities_that_no_source_sends(words: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_source_capabilities(words)


@pytest.mark.parametrize(
    ("raw", "position", "operating", "maximum", "mismatch"),
    [
        (0x2004B12C, 2, 3000, 3000, False),
        (0x2404B12C, 2, 3000, 3000, True),
        (0x10025896, 1, 1500, 1500, False),
        (0x400320E1, 4, 2000, 2250, False),
        (0x00000000, 0, 0, 0, False),
    ],
)
def test_rdo_round_trips(raw: int, position: int, operating: int, maximum: int, mismatch: bool) -> None:
    rdo = decode_rdo(raw)
    assert (rdo.object_position, rdo.operating_ma, rdo.max_ma, rdo.capability_mismatch, rdo.raw) == (
        position,
        operating,
        maximum,
        mismatch,
        raw,
    )
    if position:
        assert encode_rdo(position, operating, maximum, capability_mismatch=mismatch) == raw


def test_rdo_flag_bits_and_epr_bit() -> None:
    assert (
        encode_rdo(1, 100, 100, give_back=True, usb_communications=True, no_usb_suspend=True, unchunked_extended=True)
        == 0x1B80280A
    )
    with pytest.raises(ValueError, match="bit 31"):
        decode_rdo(0xFFFFFFFF)


@pytest.mark.parametrize(
    ("raw", "header"),
    [
        (0x41A1, PdHeader(0x01, data_objects=4)),  # Source_Capabilities, 4 PDOs, from a PD 3.0 source/DFP
        (0x03A3, PdHeader(0x03, message_id=1)),  # Accept
        (0x05A6, PdHeader(0x06, message_id=2)),  # PS_RDY
        (0x1042, PdHeader(0x02, data_objects=1, source=False, dfp=False, spec_revision=1)),  # a PD 2.0 sink's Request
    ],
)
def test_header_round_trips(raw: int, header: PdHeader) -> None:
    assert decode_header(raw) == header
    assert encode_header(header) == raw
    assert header.is_control == (header.data_objects == 0)


def test_header_with_reserved_revision_is_refused() -> None:
    with pytest.raises(ValueError, match="reserved"):
        decode_header(0xFFFF)


def _offer() -> tuple[Pdo, ...]:
    return decode_source_capabilities([*LAPTOP_WORDS, PPS_WORD])


@pytest.mark.parametrize(
    ("with_pps", "kwargs", "index"),
    [
        (False, {"min_mv": 9000, "max_mv": 9000, "min_ma": 3000}, 2),
        (False, {"min_mv": 9000, "max_mv": 9000, "min_ma": 3001}, None),
        (True, {"min_mv": 9000, "max_mv": 9000, "min_ma": 3001}, 5),  # PPS can be set to 9 V and gives 5 A
        (True, {"min_mv": 12000, "max_mv": 20000, "min_ma": 2500}, 3),  # 15 V/3 A: 20 V offers only 2.25 A
        (True, {"min_mv": 12000, "max_mv": 20000}, 3),  # 15 V and 20 V both 45 W: the lower voltage wins the tie
        (True, {"min_mv": 4000, "max_mv": 6000, "min_ma": 4000}, 5),  # only the PPS range reaches 5 V at 4 A
        (True, {}, 5),  # 11 V x 5 A = 55 W
        (True, {"min_mv": 21000}, None),
    ],
)
def test_choose_pdo_highest_power(with_pps: bool, kwargs: dict[str, Any], index: int | None) -> None:
    offer = _offer() if with_pps else decode_source_capabilities(LAPTOP_WORDS)
    chosen = choose_pdo(offer, **kwargs)
    assert index_of(chosen) == index


def index_of(chosen: Pdo | None) -> int | None:
    return chosen.index if chosen else None


def test_choose_pdo_by_voltage_and_variable_window() -> None:
    assert index_of(choose_pdo(_offer(), max_mv=20000, prefer="highest_voltage")) == 4
    laptop = decode_source_capabilities(LAPTOP_WORDS)
    assert index_of(choose_pdo(laptop, min_mv=6000, prefer="lowest_voltage")) == 2
    # The PPS range is programmable: within a 9-10 V window it counts from 9 V, so it beats nothing lower.
    assert index_of(choose_pdo(_offer(), min_mv=9000, max_mv=10000, prefer="lowest_voltage")) == 5
    variable = decode_source_capabilities([LAPTOP_WORDS[0], 0x8F0190C8])
    # A variable supply picks its own voltage in 5..12 V, so the sink's window must contain all of it.
    assert index_of(choose_pdo(variable, min_mv=5000, max_mv=12000)) == 2
    assert index_of(choose_pdo(variable, min_mv=5000, max_mv=11000)) == 1


def test_choose_pdo_limited_to_what_a_controller_can_request() -> None:
    # At 9 V the PPS range offers 5 A against the fixed supply's 3 A; a fixed-only controller must get PDO 2.
    assert index_of(choose_pdo(_offer(), min_mv=9000, max_mv=9000)) == 5
    assert index_of(choose_pdo(_offer(), min_mv=9000, max_mv=9000, kinds=("fixed",))) == 2
    assert choose_pdo(_offer(), min_mv=4000, max_mv=6000, min_ma=4000, kinds=("fixed",)) is None


def test_fixed_request_names_what_is_offered() -> None:
    offer = _offer()
    assert fixed_request(offer, 2, None) == (offer[1], 3000)
    assert fixed_request(offer, 4, 1234) == (offer[3], 1230)
    with pytest.raises(ValueError, match=r"does not offer PDO 7 \(it offers PDO 1: fixed 5000 mV 3000 mA;"):
        fixed_request(offer, 7, None)
    with pytest.raises(ValueError, match="PDO 5: augmented 3300-11000 mV 5000 mA is not a fixed supply"):
        fixed_request(offer, 5, None)
    with pytest.raises(ValueError, match="10..2250 mA"):
        fixed_request(offer, 4, 3000)
    assert describe(offer[3]) == "PDO 4: fixed 20000 mV 2250 mA"
