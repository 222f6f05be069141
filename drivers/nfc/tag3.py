"""The memory of an emulated NFC Forum Type 3 Tag holding one NDEF message (T3T 1.0 NDEF mapping).

Block 0 of the NDEF service is the attribute information block; blocks 1..Nmaxb hold the message, zero-padded:

    byte  0     Ver      0x10 (mapping 1.0)
    byte  1     Nbr      blocks a reader may read in one Read Without Encryption command
    byte  2     Nbw      blocks per write; 0 with RWFlag 0 makes the tag read-only
    bytes 3-4   Nmaxb    data blocks available (big-endian)
    bytes 5-8   0
    byte  9     WriteF   0x00 (no write in progress)
    byte  10    RWFlag   0x00 read-only
    bytes 11-13 Ln       NDEF message length in bytes (big-endian)
    bytes 14-15 Check    sum of bytes 0-13 (big-endian)

Pure code: the nfcpy emulation in nfcpy_link.py serves these blocks and asks `NdefArea` whether a reader got them all.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from drivers.base import LinkError

SYSTEM_CODE_NDEF = 0x12FC
SERVICE_NDEF_READ = 0x000B  # service 0, attribute 0b001011: random access, read-only, no key
BLOCK_SIZE = 16
MAPPING_VERSION = 0x10
# A Read Without Encryption response is 13 + 16 * n bytes; a PN532 emulates Type 3 with a 64-byte frame, so 3.
DEFAULT_NBR = 3
# PMm bytes 0-1 are the IC code: 0xFF is no Sony product, so readers treat us as a plain Type3Tag. Bytes 2-7 are
# the maximum response times per command class (request service, request response, authenticate, read, write,
# other); 0xFF is the longest (about 0.15 s per block read), which a Python emulator behind a UART needs. With
# 0x00 a reader waits 0.6 ms for a read and gives up on an emulator that is merely busy.
DEFAULT_PMM = bytes.fromhex("00FFFFFFFFFFFFFF")
# IDm prefix 02FE: an NFC Forum Type 3 Tag that is not NFC-DEP (01FE would make readers try peer-to-peer).
IDM_PREFIX = bytes.fromhex("02FE")


class Tag3Error(LinkError):
    """A Type 3 Tag attribute block is malformed, or a message does not fit the tag."""


@dataclass(frozen=True)
class AttributeInfo:
    """The attribute information block (block 0) of a Type 3 Tag NDEF service."""

    nbr: int
    nbw: int
    nmaxb: int
    ln: int
    writef: int = 0x00
    rwflag: int = 0x00
    version: int = MAPPING_VERSION

    def encode(self) -> bytes:
        """The 16 bytes of block 0, checksum included."""
        body = bytearray(14)
        body[0], body[1], body[2] = self.version, self.nbr, self.nbw
        body[3:5] = self.nmaxb.to_bytes(2, "big")
        body[9], body[10] = self.writef, self.rwflag
        body[11:14] = self.ln.to_bytes(3, "big")
        return bytes(body) + (sum(body) & 0xFFFF).to_bytes(2, "big")

    @classmethod
    def decode(cls, block: bytes) -> AttributeInfo:
        """Parse block 0; Tag3Error when its length, checksum or mapping version is wrong."""
        if len(block) != BLOCK_SIZE:
            raise Tag3Error(f"a Type 3 Tag attribute block is {BLOCK_SIZE} bytes, got {len(block)}")
        check = int.from_bytes(block[14:16], "big")
        if sum(block[0:14]) != check:
            raise Tag3Error(
                f"attribute block checksum 0x{check:04x} does not match its bytes (0x{sum(block[0:14]):04x})"
            )
        if block[0] >> 4 != MAPPING_VERSION >> 4:
            raise Tag3Error(f"unsupported Type 3 Tag NDEF mapping version 0x{block[0]:02x}; expected 1.x")
        return cls(
            nbr=block[1],
            nbw=block[2],
            nmaxb=int.from_bytes(block[3:5], "big"),
            ln=int.from_bytes(block[11:14], "big"),
            writef=block[9],
            rwflag=block[10],
            version=block[0],
        )


class NdefArea:
    """A read-only NDEF service holding one message; remembers which data blocks a reader has fetched."""

    def __init__(self, message: bytes, nbr: int = DEFAULT_NBR) -> None:
        if not message:
            raise Tag3Error("an emulated Type 3 Tag needs a non-empty NDEF message")
        if not 1 <= nbr <= 15:
            raise Tag3Error(f"Nbr must be 1..15 blocks per read, got {nbr}")
        self.message = bytes(message)
        self.data_blocks = -(-len(message) // BLOCK_SIZE)
        if self.data_blocks > 0xFFFF:
            raise Tag3Error(f"a {len(message)}-byte message does not fit a Type 3 Tag")
        self.attributes = AttributeInfo(nbr=nbr, nbw=0, nmaxb=self.data_blocks, ln=len(message))
        padded = self.message + bytes(self.data_blocks * BLOCK_SIZE - len(message))
        self._blocks = [self.attributes.encode()] + [
            padded[i : i + BLOCK_SIZE] for i in range(0, len(padded), BLOCK_SIZE)
        ]
        self._unread = set(range(1, self.data_blocks + 1))

    def block(self, number: int) -> bytes | None:
        """Block `number` (0 = attributes) as the tag answers a read; None past the end (the tag reports an error)."""
        if not 0 <= number < len(self._blocks):
            return None
        self._unread.discard(number)
        return self._blocks[number]

    @property
    def fully_read(self) -> bool:
        """True once a reader has fetched every data block, i.e. it has the whole message."""
        return not self._unread


def sensf_res(idm: bytes, pmm: bytes = DEFAULT_PMM, system_code: int = SYSTEM_CODE_NDEF) -> bytes:
    """The SENSF_RES a listening Type 3 Tag answers polling with: 01h, IDm, PMm, system code."""
    if len(idm) != 8 or len(pmm) != 8:
        raise Tag3Error(f"IDm and PMm are 8 bytes each, got {len(idm)} and {len(pmm)}")
    return b"\x01" + idm + pmm + system_code.to_bytes(2, "big")


def random_idm() -> bytes:
    """A fresh IDm (02FE + 6 random bytes), so two offering boxes are told apart by readers."""
    return IDM_PREFIX + secrets.token_bytes(6)
