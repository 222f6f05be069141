"""The join-offer NDEF codec: exact bytes out, every malformation named, and ndeflib agreeing with us both ways."""

from __future__ import annotations

import ndef
import pytest

from drivers.base import JoinOffer, LinkError
from drivers.nfc.ndef import (
    JOIN_RECORD_URN,
    MAX_PAYLOAD,
    TNF_EXTERNAL,
    TNF_UNCHANGED,
    TNF_WELL_KNOWN,
    NdefError,
    NdefRecord,
    NoJoinOfferError,
    OfferTooLargeError,
    decode_join_offer,
    decode_message,
    encode_join_offer,
    encode_record,
)

TYPE = b"thox.ai:join"

# (offer, exact NDEF message): header D4 = MB|ME|SR|TNF 4, type length 0C, payload length, type, JSON payload.
ENCODED = [
    pytest.param(
        JoinOffer("thox-abc123", "10.0.0.2:7443", "t0k", 1700000000),
        b"\xd4\x0c\x4e" + TYPE + b'{"v":1,"node":"thox-abc123","ep":"10.0.0.2:7443","tok":"t0k","exp":1700000000}',
        id="full",
    ),
    pytest.param(
        JoinOffer("n", "h:1"), b"\xd4\x0c\x2e" + TYPE + b'{"v":1,"node":"n","ep":"h:1","tok":"","exp":0}', id="minimal"
    ),
    pytest.param(
        JoinOffer("thox-\u00fc", "[fe80::1]:7443", extra={"z": "1", "fp": "ab"}),
        b"\xd4\x0c\x51"
        + TYPE
        + b'{"v":1,"node":"thox-\xc3\xbc","ep":"[fe80::1]:7443","tok":"","exp":0,"fp":"ab","z":"1"}',
        id="utf8-and-sorted-extras",
    ),
]


@pytest.mark.parametrize(("offer", "message"), ENCODED)
def test_encode_join_offer_writes_exact_bytes(offer: JoinOffer, message: bytes) -> None:
    assert encode_join_offer(offer) == message


@pytest.mark.parametrize(("offer", "message"), ENCODED)
def test_decode_join_offer_reads_what_we_write(offer: JoinOffer, message: bytes) -> None:
    assert decode_join_offer(message) == offer


@pytest.mark.parametrize(
    ("record", "mb", "me", "encoded"),
    [
        pytest.param(NdefRecord(TNF_WELL_KNOWN, b"T", b"\x02enhi"), True, True, b"\xd1\x01\x05T\x02enhi", id="short"),
        pytest.param(
            NdefRecord(TNF_EXTERNAL, TYPE, b"x", id=b"r1"),
            True,
            False,
            b"\x9c\x0c\x01\x02" + TYPE + b"r1x",
            id="id-not-last",
        ),
        pytest.param(
            NdefRecord(TNF_EXTERNAL, TYPE, bytes(255)),
            False,
            True,
            b"\x54\x0c\xff" + TYPE + bytes(255),
            id="255-still-short",
        ),
        pytest.param(
            NdefRecord(TNF_EXTERNAL, TYPE, bytes(256)),
            True,
            True,
            b"\xc4\x0c\x00\x00\x01\x00" + TYPE + bytes(256),
            id="256-is-long",
        ),
        pytest.param(NdefRecord(TNF_UNCHANGED, b"", b"ab", chunked=True), False, False, b"\x36\x00\x02ab", id="chunk"),
    ],
)
def test_encode_record_header_flags_and_lengths(record: NdefRecord, mb: bool, me: bool, encoded: bytes) -> None:
    assert encode_record(record, mb=mb, me=me) == encoded
    assert decode_message(encoded) == [record]


def test_decode_walks_past_other_records_to_the_first_join_record() -> None:
    offer = JoinOffer("thox-b", "10.0.0.3:7443")
    uri = encode_record(NdefRecord(TNF_WELL_KNOWN, b"U", b"\x04thox.ai"), me=False)
    long_text = encode_record(NdefRecord(TNF_WELL_KNOWN, b"T", b"\x02en" + b"a" * 300), mb=False, me=False)
    ours = encode_record(NdefRecord(TNF_EXTERNAL, b"Thox.AI:Join", encode_join_offer(offer)[15:]), mb=False, me=False)
    second = encode_record(NdefRecord(TNF_EXTERNAL, TYPE, encode_join_offer(JoinOffer("other", "h:2"))[15:]), mb=False)
    assert decode_join_offer(uri + long_text + ours + second) == offer


def test_decode_stops_at_the_message_end_flag() -> None:
    message = encode_join_offer(JoinOffer("n", "h:1"))
    assert decode_join_offer(message + b"\x00\xff\xfe") == JoinOffer("n", "h:1")  # tag padding after ME


def _ours(payload: bytes, header: int = 0xD4, record_type: bytes = TYPE) -> bytes:
    return bytes([header, len(record_type), len(payload)]) + record_type + payload


GOOD = encode_join_offer(JoinOffer("n", "h:1"))

MALFORMED = [
    pytest.param(b"\xd4", "header needs 3 bytes, 1 left", id="truncated-header"),
    pytest.param(b"\xc4\x0c\x00\x00", "header needs 6 bytes, 4 left", id="truncated-long-header"),
    pytest.param(GOOD[:10], "its type needs 12 bytes, 7 left", id="truncated-type"),
    pytest.param(
        GOOD[:-5],
        "(urn:nfc:ext:thox.ai:join) at offset 0 is truncated: id and payload need 46 bytes, 41 left",
        id="truncated-payload",
    ),
    pytest.param(
        b"\x91\x01\x01U\x00" + GOOD[:20],
        "NDEF record 1 (urn:nfc:ext:thox.ai:join) at offset 5 is truncated",
        id="truncated-second-record",
    ),
    pytest.param(b"\xd7\x00\x00", "reserved TNF 0x07", id="reserved-tnf"),
    pytest.param(_ours(b"{}", header=0xD1), "type 'thox.ai:join' with TNF 0x01", id="wrong-tnf"),
    pytest.param(_ours(b'{"v":1', header=0xB4), "chunked thox.ai:join record", id="chunked"),
    pytest.param(
        _ours(b'{"v":1,'), "not valid JSON: Expecting property name enclosed in double quotes at byte 7", id="bad-json"
    ),
    pytest.param(_ours(b'{"v":1,"node":"\xff"}'), "not UTF-8 (byte 15)", id="not-utf8"),
    pytest.param(_ours(b"[1]"), "must be a JSON object, got list", id="not-an-object"),
    pytest.param(_ours(b'{"node":"n","ep":"h:1"}'), "no 'v' (version) field", id="no-version"),
    pytest.param(
        _ours(b'{"v":2,"node":"n","ep":"h:1"}'),
        "unsupported join offer version 2; this agent reads version 1",
        id="version-2",
    ),
    pytest.param(_ours(b'{"v":"1","node":"n","ep":"h:1"}'), "version must be an integer, got '1'", id="version-str"),
    pytest.param(_ours(b'{"v":true,"node":"n","ep":"h:1"}'), "version must be an integer, got True", id="version-bool"),
    pytest.param(_ours(b'{"v":1,"ep":"h:1"}'), "has no 'node' field", id="no-node"),
    pytest.param(_ours(b'{"v":1,"node":"n"}'), "has no 'ep' field", id="no-endpoint"),
    pytest.param(_ours(b'{"v":1,"node":"","ep":"h:1"}'), "field 'node' is empty", id="empty-node"),
    pytest.param(_ours(b'{"v":1,"node":7,"ep":"h:1"}'), "field 'node' must be a string, got 7", id="node-int"),
    pytest.param(
        _ours(b'{"v":1,"node":"n","ep":"h:1","tok":null}'), "field 'tok' must be a string, got None", id="token-null"
    ),
    pytest.param(
        _ours(b'{"v":1,"node":"n","ep":"h:1","exp":-1}'), "'exp' must be a non-negative integer", id="expiry-negative"
    ),
    pytest.param(
        _ours(b'{"v":1,"node":"n","ep":"h:1","exp":1.5}'), "'exp' must be a non-negative integer", id="expiry-float"
    ),
    pytest.param(
        _ours(b'{"v":1,"node":"n","ep":"h:1","fp":[1]}'), "field 'fp' must be a string, got [1]", id="extra-not-string"
    ),
]


@pytest.mark.parametrize(("message", "reason"), MALFORMED)
def test_decode_names_what_is_malformed(message: bytes, reason: str) -> None:
    with pytest.raises(NdefError) as caught:
        decode_join_offer(message)
    assert reason in str(caught.value)
    assert not isinstance(caught.value, NoJoinOfferError)  # malformed is not "some other tag"


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        pytest.param(b"", "the NDEF message is empty", id="empty"),
        pytest.param(b"\xd0\x00\x00", "no thox.ai:join record (found empty)", id="empty-record"),
        pytest.param(
            b"\x91\x01\x01U\x00\x51\x01\x03T\x02en", "(found urn:nfc:wkt:U, urn:nfc:wkt:T)", id="uri-and-text"
        ),
        pytest.param(b"\xd2\x0a\x02text/plainhi", "(found text/plain)", id="media"),
    ],
)
def test_a_well_formed_message_without_our_record_is_no_join_offer(message: bytes, reason: str) -> None:
    with pytest.raises(NoJoinOfferError) as caught:
        decode_join_offer(message)
    assert reason in str(caught.value)


def test_ndef_errors_are_link_errors_callers_can_catch() -> None:
    assert issubclass(NdefError, LinkError)
    assert issubclass(NoJoinOfferError, NdefError)
    assert issubclass(OfferTooLargeError, NdefError)


def test_payload_of_exactly_max_bytes_is_a_short_record_and_one_more_is_refused() -> None:
    base = len(b'{"v":1,"node":"n","ep":"h:1","tok":"","exp":0}')
    fits = JoinOffer("n", "h:1", token="t" * (MAX_PAYLOAD - base))
    message = encode_join_offer(fits)
    assert message[:3] == b"\xd4\x0c\xf0" and len(message) == 3 + 12 + MAX_PAYLOAD
    assert decode_join_offer(message) == fits
    with pytest.raises(OfferTooLargeError, match=r"'n' is 241 bytes of JSON; the most an NFC offer carries is 240"):
        encode_join_offer(JoinOffer("n", "h:1", token="t" * (MAX_PAYLOAD - base + 1)))


@pytest.mark.parametrize(
    ("offer", "reason"),
    [
        pytest.param(JoinOffer("", "h:1"), "needs a node_id", id="no-node"),
        pytest.param(JoinOffer("n", ""), "needs an endpoint", id="no-endpoint"),
        pytest.param(JoinOffer("n", "h:1", expires_at=-5), "negative expires_at (-5)", id="negative-expiry"),
        pytest.param(JoinOffer("n", "h:1", extra={"tok": "x"}), "extra field 'tok' collides", id="extra-collides"),
    ],
)
def test_encode_refuses_offers_the_decoder_would_reject(offer: JoinOffer, reason: str) -> None:
    with pytest.raises(NdefError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        encode_join_offer(offer)


# ----------------------------------------------------------------------------- ndeflib cross-check


@pytest.mark.parametrize(("offer", "message"), ENCODED)
def test_ndeflib_decodes_what_we_encode(offer: JoinOffer, message: bytes) -> None:
    records = list(ndef.message_decoder(message, errors="strict"))
    assert len(records) == 1
    assert records[0].type == JOIN_RECORD_URN
    assert records[0].name == ""
    assert bytes(records[0].data) == message[15:]


def test_we_decode_what_ndeflib_encodes() -> None:
    offer = JoinOffer("thox-c", "10.0.0.4:7443", "tok", 42, {"fp": "00ff"})
    payload = encode_join_offer(offer)[15:]
    records = [
        ndef.TextRecord("a" * 300),
        ndef.UriRecord("https://thox.ai/"),
        ndef.Record(JOIN_RECORD_URN, "join-1", payload),
    ]
    message = b"".join(ndef.message_encoder(records))
    assert message[0] & 0x10 == 0  # ndeflib chose a long record for the text: we walk across it
    assert decode_join_offer(message) == offer


def test_ndeflib_decodes_our_long_records() -> None:
    record = NdefRecord(TNF_EXTERNAL, TYPE, b"z" * 400, id=b"big")
    decoded = list(ndef.message_decoder(encode_record(record), errors="strict"))
    assert [(r.type, r.name, bytes(r.data)) for r in decoded] == [(JOIN_RECORD_URN, "big", b"z" * 400)]
