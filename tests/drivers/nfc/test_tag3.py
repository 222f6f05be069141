"""The emulated Type 3 Tag memory: exact attribute block, block layout, and the frames nfcpy answers with."""

from __future__ import annotations

import nfc.clf
import nfc.tag.tt3
import pytest

from drivers.base import JoinOffer
from drivers.nfc.ndef import encode_join_offer
from drivers.nfc.tag3 import (
    DEFAULT_PMM,
    SERVICE_NDEF_READ,
    AttributeInfo,
    NdefArea,
    Tag3Error,
    random_idm,
    sensf_res,
)


@pytest.mark.parametrize(
    ("info", "block"),
    [
        # Ver Nbr Nbw Nmaxb     (0)     WriteF RWFlag  Ln        Check
        pytest.param(
            AttributeInfo(nbr=3, nbw=0, nmaxb=4, ln=61),
            "10 03 00 0004 00000000 00 00 00003D 0054",
            id="61-byte-message",
        ),
        pytest.param(
            AttributeInfo(nbr=1, nbw=1, nmaxb=0x0100, ln=0x001001, writef=0x0F, rwflag=0x01),
            "10 01 01 0100 00000000 0F 01 001001 0034",
            id="all-fields",
        ),
    ],
)
def test_attribute_block_bytes(info: AttributeInfo, block: str) -> None:
    assert info.encode() == bytes.fromhex(block)
    assert AttributeInfo.decode(bytes.fromhex(block)) == info


@pytest.mark.parametrize(
    ("block", "reason"),
    [
        pytest.param(
            "10 03 00 0004 00000000 00 00 00003D 0055",
            "checksum 0x0055 does not match its bytes (0x0054)",
            id="checksum",
        ),
        pytest.param("20 03 00 0004 00000000 00 00 00003D 0064", "mapping version 0x20", id="version-2"),
        pytest.param("10 03 00 0004 00000000 00 00 00003D", "16 bytes, got 14", id="short"),
    ],
)
def test_attribute_block_errors(block: str, reason: str) -> None:
    with pytest.raises(Tag3Error, match=reason.replace("(", r"\(").replace(")", r"\)")):
        AttributeInfo.decode(bytes.fromhex(block))


def test_ndef_area_lays_the_message_out_in_zero_padded_blocks() -> None:
    message = bytes(range(1, 34))  # 33 bytes: three data blocks, the last holding one byte
    area = NdefArea(message)
    assert area.block(0) == bytes.fromhex("10 03 00 0003 00000000 00 00 000021 0037")
    assert area.block(1) == message[0:16]
    assert area.block(2) == message[16:32]
    assert area.block(3) == b"\x21" + bytes(15)
    assert area.block(4) is None
    assert area.block(-1) is None


def test_fully_read_needs_every_data_block_in_any_order() -> None:
    area = NdefArea(bytes(40))
    area.block(0)
    area.block(3)
    area.block(1)
    assert not area.fully_read
    area.block(2)
    assert area.fully_read


@pytest.mark.parametrize(
    ("message", "nbr", "reason"),
    [
        pytest.param(b"", 3, "non-empty NDEF message", id="empty"),
        pytest.param(b"x", 0, "Nbr must be 1..15", id="nbr-0"),
        pytest.param(b"x", 16, "Nbr must be 1..15", id="nbr-16"),
    ],
)
def test_ndef_area_refuses_what_a_tag_cannot_hold(message: bytes, nbr: int, reason: str) -> None:
    with pytest.raises(Tag3Error, match=reason):
        NdefArea(message, nbr)


def test_sensf_res_and_idm() -> None:
    idm = bytes.fromhex("02FE010203040506")
    assert sensf_res(idm) == bytes.fromhex("01 02FE010203040506 00FFFFFFFFFFFFFF 12FC")
    first, second = random_idm(), random_idm()
    assert len(first) == 8 and first[:2] == b"\x02\xfe" and first != second
    with pytest.raises(Tag3Error, match="8 bytes each, got 7 and 8"):
        sensf_res(idm[:7], DEFAULT_PMM)


def _emulation(area: NdefArea, idm: bytes) -> nfc.tag.tt3.Type3TagEmulation:
    # The same set-up NfcpyLink's on-connect does, without a frontend: only process_command() is exercised.
    target = nfc.clf.LocalTarget("212F", sensf_res=bytearray(sensf_res(idm)), tt3_cmd=bytearray(b"\x00"))
    emulation = nfc.tag.tt3.Type3TagEmulation(None, target)
    emulation.add_service(SERVICE_NDEF_READ, lambda block, _rb, _re: area.block(block), None)
    return emulation


def test_nfcpy_emulation_answers_reads_with_our_blocks_on_the_wire() -> None:
    idm = bytes.fromhex("02FE0A0B0C0D0E0F")
    message = encode_join_offer(JoinOffer("n", "h:1"))  # 61 bytes: 4 data blocks
    area = NdefArea(message)
    emulation = _emulation(area, idm)
    # Read Without Encryption (06), IDm, 1 service 0x000B (little-endian), 1 block: 80 00 = block 0
    response = emulation.process_command(bytearray.fromhex("10 06") + idm + bytearray.fromhex("01 0B00 01 8000"))
    assert bytes(response) == bytes.fromhex("1D 07") + idm + bytes.fromhex("0000 01") + area.attributes.encode()
    # blocks 1-3 in one command (Nbr = 3): 13 + 48 = 61 bytes, inside a PN532's 64-byte frame
    response = emulation.process_command(
        bytearray.fromhex("14 06") + idm + bytearray.fromhex("01 0B00 03 8001 8002 8003")
    )
    assert bytes(response) == bytes.fromhex("3D 07") + idm + bytes.fromhex("0000 03") + message[0:48]
    assert not area.fully_read
    response = emulation.process_command(bytearray.fromhex("10 06") + idm + bytearray.fromhex("01 0B00 01 8004"))
    assert bytes(response) == bytes.fromhex("1D 07") + idm + bytes.fromhex("0000 01") + message[48:] + bytes(3)
    assert area.fully_read


def test_nfcpy_emulation_is_read_only_and_bounded() -> None:
    idm = bytes.fromhex("02FE0A0B0C0D0E0F")
    emulation = _emulation(NdefArea(b"\xd0\x00\x00"), idm)
    # Write Without Encryption (08) to the write service 0x0009: status FF A1, no such service
    write = bytearray.fromhex("20 08") + idm + bytearray.fromhex("01 0900 01 8001") + bytearray(16)
    assert bytes(emulation.process_command(write)) == bytes.fromhex("0C 09") + idm + bytes.fromhex("FFA1")
    # block 2 does not exist (one data block): status 01 A2
    read = bytearray.fromhex("10 06") + idm + bytearray.fromhex("01 0B00 01 8002")
    assert bytes(emulation.process_command(read)) == bytes.fromhex("0C 07") + idm + bytes.fromhex("01A2")
