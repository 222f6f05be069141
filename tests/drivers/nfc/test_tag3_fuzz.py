"""Fuzzing the Type 3 Tag attribute block and the emulated NDEF area: a block parses or is a Tag3Error."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from drivers.nfc.tag3 import BLOCK_SIZE, MAPPING_VERSION, AttributeInfo, NdefArea, Tag3Error

_infos = st.builds(
    AttributeInfo,
    nbr=st.integers(0, 0xFF),
    nbw=st.integers(0, 0xFF),
    nmaxb=st.integers(0, 0xFFFF),
    ln=st.integers(0, 0xFFFFFF),
    writef=st.integers(0, 0xFF),
    rwflag=st.integers(0, 0xFF),
    version=st.integers(0x10, 0x1F),
)


@given(st.binary(max_size=2 * BLOCK_SIZE))
@example(bytes(BLOCK_SIZE))  # all zeros: a checksum that matches, and mapping version 0
@example(b"\x10" + bytes(13) + b"\x00\x10")
def test_any_block_decodes_or_is_refused(block: bytes) -> None:
    try:
        info = AttributeInfo.decode(block)
    except Tag3Error as exc:
        refusal = str(exc)
    else:
        refusal = ""
    if refusal:
        assert "attribute block" in refusal or "mapping version" in refusal, refusal
        return
    assert len(block) == BLOCK_SIZE and info.version >> 4 == MAPPING_VERSION >> 4
    # Whatever decoded encodes again, with the same fields (reserved bytes 5-8 come back as zero).
    assert AttributeInfo.decode(info.encode()) == info


@given(_infos)
def test_any_attribute_info_round_trips(info: AttributeInfo) -> None:
    block = info.encode()
    assert len(block) == BLOCK_SIZE
    assert AttributeInfo.decode(block) == info


@given(_infos, st.integers(0, BLOCK_SIZE - 1), st.integers(1, 255))
def test_a_damaged_block_is_refused_or_still_self_consistent(info: AttributeInfo, at: int, flip: int) -> None:
    block = bytearray(info.encode())
    block[at] ^= flip
    try:
        decoded = AttributeInfo.decode(bytes(block))
    except Tag3Error:
        return
    assert decoded.encode()[:14] == bytes(block[:5]) + bytes(4) + bytes(block[9:14])


@given(st.binary(min_size=1, max_size=200), st.integers(1, 15), st.lists(st.integers(-(2**70), 2**70), max_size=20))
def test_ndef_area_answers_any_block_number(message: bytes, nbr: int, reads: list[int]) -> None:
    area = NdefArea(message, nbr)
    for number in reads:
        block = area.block(number)
        assert block is None or len(block) == BLOCK_SIZE
    assert AttributeInfo.decode(area.block(0) or b"").ln == len(message)
    data = b"".join(area.block(i) or b"" for i in range(1, area.data_blocks + 1))
    assert data[: len(message)] == message and area.fully_read
