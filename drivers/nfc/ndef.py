"""The join-offer NDEF record: our own codec, so the bytes on the tag are ours and tested exactly.

A module announces itself with an NDEF message holding one NFC Forum external type record,
`urn:nfc:ext:thox.ai:join` (TNF 0x04, TYPE "thox.ai:join"), whose payload is a compact UTF-8 JSON object:

    D4 0C <len> "thox.ai:join" {"v":1,"node":"...","ep":"host:port","tok":"...","exp":1700000000,...}
    |  |  |
    |  |  payload length (short record: one byte)
    |  type length (12)
    MB | ME | SR | TNF=4

Extra string fields follow the five fixed keys in sorted order. The payload is capped at MAX_PAYLOAD bytes so the
whole message stays within 16 blocks of a Type 3 Tag: NFC carries only a short, signed, expiring offer; the join
itself happens over IP. The record walker reads any well-formed message (short and long records, IDs, chunks) and
takes the first join record, so a tag may carry other records (a URI, a text) next to ours.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from drivers.base import JoinOffer, LinkError

# Type Name Formats (NFC Forum NDEF 1.0, section 3.2.6)
TNF_EMPTY = 0x00
TNF_WELL_KNOWN = 0x01
TNF_MEDIA = 0x02
TNF_ABSOLUTE_URI = 0x03
TNF_EXTERNAL = 0x04
TNF_UNKNOWN = 0x05
TNF_UNCHANGED = 0x06
TNF_RESERVED = 0x07

# Record header flags
MB, ME, CF, SR, IL = 0x80, 0x40, 0x20, 0x10, 0x08

JOIN_TYPE = b"thox.ai:join"
JOIN_RECORD_URN = "urn:nfc:ext:thox.ai:join"
JOIN_VERSION = 1
MAX_PAYLOAD = 240  # 3 + 12 + 240 = 255 bytes: 16 Type 3 Tag blocks, and always a short record
_FIXED_KEYS = ("v", "node", "ep", "tok", "exp")
_URN_PREFIX = ("empty", "urn:nfc:wkt:", "", "", "urn:nfc:ext:", "unknown", "unchanged", "reserved:")


class NdefError(LinkError):
    """An NDEF message or join-offer record is malformed, or an offer cannot be encoded."""


class NoJoinOfferError(NdefError):
    """A well-formed NDEF message that holds no thox.ai:join record (some other tag)."""


class OfferTooLargeError(NdefError):
    """The offer's JSON payload is larger than MAX_PAYLOAD bytes."""


@dataclass(frozen=True)
class NdefRecord:
    """One NDEF record as it sits in a message."""

    tnf: int
    type: bytes
    payload: bytes
    id: bytes = b""
    chunked: bool = False

    def describe(self) -> str:
        """The record type as a URN-ish name for messages ("urn:nfc:wkt:U", "text/plain", ...)."""
        name = self.type.decode("latin-1")
        if self.tnf == TNF_MEDIA or self.tnf == TNF_ABSOLUTE_URI:
            return name
        return _URN_PREFIX[self.tnf] + name


# ----------------------------------------------------------------------------- records


def encode_record(record: NdefRecord, *, mb: bool = True, me: bool = True) -> bytes:
    """One record: a short record (SR) when the payload is under 256 bytes, a long record otherwise."""
    if not 0 <= record.tnf <= TNF_UNCHANGED:
        raise NdefError(f"TNF 0x{record.tnf:02x} is reserved; use 0x00..0x06")
    if len(record.type) > 255 or len(record.id) > 255:
        raise NdefError(f"record type ({len(record.type)} bytes) and id ({len(record.id)} bytes) must be <= 255 bytes")
    short = len(record.payload) < 256
    header = record.tnf | (MB if mb else 0) | (ME if me else 0) | (CF if record.chunked else 0)
    header |= (SR if short else 0) | (IL if record.id else 0)
    out = bytearray([header, len(record.type)])
    out += bytes([len(record.payload)]) if short else len(record.payload).to_bytes(4, "big")
    if record.id:
        out.append(len(record.id))
    out += record.type + record.id + record.payload
    return bytes(out)


def iter_records(message: bytes) -> Iterator[NdefRecord]:
    """Walk the records of a message up to the one flagged ME; NdefError names the record and offset that is bad."""
    offset, index, size = 0, 0, len(message)
    while offset < size:
        start = offset
        header = message[offset]
        tnf = header & 0x07
        if tnf == TNF_RESERVED:
            raise NdefError(f"NDEF record {index} at offset {start} uses the reserved TNF 0x07")
        fixed = 2 + (1 if header & SR else 4) + (1 if header & IL else 0)
        if size - offset < fixed:
            raise NdefError(
                f"NDEF record {index} at offset {start} is truncated: its header needs {fixed} bytes, "
                f"{size - offset} left"
            )
        type_length = message[offset + 1]
        if header & SR:
            payload_length = message[offset + 2]
            offset += 3
        else:
            payload_length = int.from_bytes(message[offset + 2 : offset + 6], "big")
            offset += 6
        id_length = 0
        if header & IL:
            id_length = message[offset]
            offset += 1
        if size - offset < type_length:
            raise NdefError(
                f"NDEF record {index} at offset {start} is truncated: its type needs {type_length} bytes, "
                f"{size - offset} left"
            )
        record_type = bytes(message[offset : offset + type_length])
        offset += type_length
        what = f"NDEF record {index} ({NdefRecord(tnf, record_type, b'').describe()}) at offset {start}"
        if size - offset < id_length + payload_length:
            raise NdefError(
                f"{what} is truncated: id and payload need {id_length + payload_length} bytes, {size - offset} left"
            )
        record_id = bytes(message[offset : offset + id_length])
        offset += id_length
        payload = bytes(message[offset : offset + payload_length])
        offset += payload_length
        yield NdefRecord(tnf, record_type, payload, record_id, bool(header & CF))
        index += 1
        if header & ME:
            return


def decode_message(message: bytes) -> list[NdefRecord]:
    """All records of a message (NdefError when it is malformed)."""
    return list(iter_records(message))


# ----------------------------------------------------------------------------- the join offer


def encode_join_payload(offer: JoinOffer) -> bytes:
    """The compact JSON payload of a join offer; NdefError when a field cannot be carried."""
    if not offer.node_id:
        raise NdefError("a join offer needs a node_id")
    if not offer.endpoint:
        raise NdefError(f"join offer of {offer.node_id!r} needs an endpoint (host:port)")
    if offer.expires_at < 0:
        raise NdefError(f"join offer of {offer.node_id!r} has a negative expires_at ({offer.expires_at})")
    body: dict[str, Any] = {
        "v": JOIN_VERSION,
        "node": offer.node_id,
        "ep": offer.endpoint,
        "tok": offer.token,
        "exp": offer.expires_at,
    }
    for key in sorted(offer.extra):
        if key in body:
            raise NdefError(f"join offer extra field {key!r} collides with a fixed field {_FIXED_KEYS}")
        if not isinstance(offer.extra[key], str) or not offer.extra[key]:
            # The decoder refuses these, so a tag written with one could never be read back.
            raise NdefError(f"join offer extra field {key!r} must be a non-empty string, got {offer.extra[key]!r}")
        body[key] = offer.extra[key]
    try:
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate in a field: no UTF-8 for it, so no tag can carry it
        raise NdefError(
            f"join offer of {offer.node_id!r} has text that is not valid Unicode "
            f"({exc.object[exc.start : exc.end]!r}); send well-formed strings"
        ) from None
    if len(payload) > MAX_PAYLOAD:
        raise OfferTooLargeError(
            f"join offer of {offer.node_id!r} is {len(payload)} bytes of JSON; the most an NFC "
            f"offer carries is {MAX_PAYLOAD} (shorten the token or the extra fields)"
        )
    return payload


def encode_join_offer(offer: JoinOffer) -> bytes:
    """The NDEF message of one thox.ai:join record (MB|ME|SR) carrying the offer."""
    return encode_record(NdefRecord(TNF_EXTERNAL, JOIN_TYPE, encode_join_payload(offer)))


def decode_join_payload(payload: bytes) -> JoinOffer:
    """Parse the JSON payload of a join record; NdefError names the field that is wrong."""
    # Checked before parsing: within MAX_PAYLOAD bytes JSON cannot nest deep enough to exhaust the parser's
    # recursion, nor hold a number too long for int(), so json.loads can only fail with JSONDecodeError.
    if len(payload) > MAX_PAYLOAD:
        raise OfferTooLargeError(
            f"join offer payload is {len(payload)} bytes; the most an NFC offer carries is "
            f"{MAX_PAYLOAD}, so this tag was not written by a Thox module"
        )
    try:
        body = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise NdefError(f"join offer payload is not UTF-8 (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise NdefError(f"join offer payload is not valid JSON: {exc.msg} at byte {exc.pos}") from exc
    if not isinstance(body, dict):
        raise NdefError(f"join offer payload must be a JSON object, got {type(body).__name__}")
    if "v" not in body:
        raise NdefError("join offer has no 'v' (version) field")
    version = body["v"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise NdefError(f"join offer version must be an integer, got {version!r}")
    if version != JOIN_VERSION:
        raise NdefError(f"unsupported join offer version {version}; this agent reads version {JOIN_VERSION}")
    node = _string(body, "node", required=True)
    endpoint = _string(body, "ep", required=True)
    token = _string(body, "tok", required=False)
    expires = body.get("exp", 0)
    if not isinstance(expires, int) or isinstance(expires, bool) or expires < 0:
        raise NdefError(f"join offer field 'exp' must be a non-negative integer (unix seconds), got {expires!r}")
    extra = {
        _unicode(key, f"join offer field name {key!r}"): _string(body, key, required=True)
        for key in body
        if key not in _FIXED_KEYS
    }
    return JoinOffer(node_id=node, endpoint=endpoint, token=token, expires_at=expires, extra=extra)


def _string(body: dict[str, Any], key: str, *, required: bool) -> str:
    if key not in body:
        if required:
            raise NdefError(f"join offer has no {key!r} field")
        return ""
    value = body[key]
    if not isinstance(value, str):
        raise NdefError(f"join offer field {key!r} must be a string, got {value!r}")
    if required and not value:
        raise NdefError(f"join offer field {key!r} is empty")
    return _unicode(value, f"join offer field {key!r}")


def _unicode(text: str, what: str) -> str:
    # JSON's \ud800 escapes decode to lone surrogates, which are not Unicode text: nothing could log, store or
    # re-encode the offer, so it is refused here rather than failing wherever it is used.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise NdefError(
            f"{what} holds a lone UTF-16 surrogate ({text[exc.start : exc.end]!r} at character "
            f"{exc.start}); it is not valid Unicode"
        ) from None
    return text


def decode_join_offer(message: bytes) -> JoinOffer:
    """The offer in the first thox.ai:join record of a message.

    NoJoinOfferError when the message is well formed but has no join record; NdefError when the message or the
    join record is malformed (truncated, wrong TNF, chunked, bad JSON, missing fields, unsupported version).
    """
    seen: list[str] = []
    for index, record in enumerate(iter_records(message)):
        if record.type.lower() != JOIN_TYPE:  # external type names compare case-insensitively
            seen.append(record.describe())
            continue
        if record.tnf != TNF_EXTERNAL:
            raise NdefError(
                f"NDEF record {index} has type 'thox.ai:join' with TNF 0x{record.tnf:02x}; "
                f"a join offer is an NFC Forum external type (TNF 0x04)"
            )
        if record.chunked:
            raise NdefError(f"NDEF record {index} is a chunked thox.ai:join record; join offers are never chunked")
        return decode_join_payload(record.payload)
    if not seen:
        raise NoJoinOfferError("the NDEF message is empty; it holds no thox.ai:join record")
    raise NoJoinOfferError(f"the NDEF message holds no thox.ai:join record (found {', '.join(seen)})")
